"""The analyzer's gRPC server: serves a store's SAEs, their analyses and dataset images to the
explorer (or any client) under the contract in ``proto/vitscope/v2/analyzer.proto``.

Everything it serves is read from the store and cached in memory by id. Ids are content hashes,
so a cached SAE, analysis or activation set never goes stale; only "which analysis belongs to
this SAE" is looked up again until one is found.

An SAE's analysis is the one over the SAE's own activation set (largest k, then newest), so
that image indices in latent examples and in ``GetImage`` always refer to the same images.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import dataclasses
import functools
import hmac
import importlib
import io
import ipaddress
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha import reflection
from PIL import Image

from vitscope.hashing import content_id
from vitscope.metrics import FrequencyRange, frequency_histogram, scalar_metrics
from vitscope.proto import SERVICE, ResourceNameError, names, pb, rpc
from vitscope.sae_format import SaeRecord, list_saes, load_record
from vitscope.shard_format import Manifest, load_manifest
from vitscope.store import InvalidKey, NotFound, Store, open_store

from .config import ServeConfig
from .labels import LabelBook, LabelConflict, LabelError, LabelRevision
from .results import (
    AnalysisManifest,
    LatentTable,
    list_analyses,
    load_analysis,
    load_analysis_manifest,
    load_frequency,
)

# torch and what needs it (the SAEs' models, the activation rows, the ViT, the datasets) are
# imported by the calls that run them: the listings the explorer opens with are answered from
# JSON and numpy alone, without waiting seconds for torch.
if TYPE_CHECKING:
    import torch

    from vitscope.models import ViT
    from vitscope.sae import Sae
    from vitscope.shards import ActivationSet

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_TOP_IMAGES = 16
DEFAULT_TOP_LATENTS = 8
MAX_TOP_LATENTS = 64
LIVE_ENCODES = 2
"""Uploaded images encoded at once (each holds a ViT's activations); more wait, up to their deadline."""
LIVE_WAIT_S = 30.0
"""How long an upload waits for its turn when its call has no deadline."""
MAX_IMAGE_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 20
"""The longest side of an upload over its shortest: resizing the shortest side to the model's
input scales the longest one with it, so a 5000x1 strip of 94 bytes would take gigabytes."""
MAX_SEARCH_EXAMPLES = 32
DEFAULT_SEARCH_LATENTS = 20
MAX_SEARCH_LATENTS = 200
DEFAULT_SIMILAR_LATENTS = 10
MAX_SIMILAR_LATENTS = 100
MAX_STEERED_LATENTS = 64
MAX_STEER_FACTOR = 100.0
STEER_CLASSES = 10
"""Zero-shot classes SteerLatents reports, the most probable before steering first."""
COFIRING_IMAGES = 64
"""Images of the first SAE's set that FindSimilarLatents encodes with both SAEs when they read
different spaces: enough to rank clear matches, few enough to encode live through a ViT."""
MAX_PAGE_TOKEN_LENGTH = 512  # the tokens this server issues are under 100 characters
WARM_UP_IDLE_S = 1.0
"""Once the server has answered calls and then had none for this long, it imports torch and the
modules the latent calls run (seconds of CPU on a small machine) in the background: not as it
starts, where that import slowed the explorer's first page, whose Streamlit and browser share the
CPUs, and not on the first latent page, which would wait for it. ``math.inf``: never."""
MAX_STRING_LENGTH = 4096
"""The longest string any request field may hold, whatever the RPC (ids and tokens have their own,
shorter limits): nothing longer is a real id, path or name."""

T = TypeVar("T")


def _models():
    """``vitscope.models``, imported on first use: it imports torchvision (1.5 s here), which
    neither the listings the explorer opens with nor the stored-rows calls need."""
    import vitscope.models

    return vitscope.models


class RequestError(Exception):
    """A request the server cannot answer as asked, with the status code to answer instead."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _shown(value: str, limit: int = 60) -> str:
    """``value`` quoted for a message, cut short: a hostile 10,000-character id must neither come
    back whole in the status details (grpc limits their size) nor fill the log."""
    quoted = repr(value)
    return quoted if len(quoted) <= limit else f"{quoted[:limit]}... ({len(value)} characters)"


class _RateLimitedLog:
    """Logs at most ``per_second`` lines a second and drops the rest, counting them in the next
    line it lets through: a flood of bad requests costs a few log lines, not one each."""

    def __init__(self, logger: logging.Logger, per_second: int):
        self._logger = logger
        self._per_second = per_second
        self._lock = threading.Lock()
        self._window_start = -math.inf
        self._lines = self._dropped = 0

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        """``logger.log(level, msg, *args)``, unless this second's lines are used up."""
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= 1.0:
                self._window_start, self._lines = now, 0
            if self._lines >= self._per_second:
                self._dropped += 1
                return
            self._lines += 1
            dropped, self._dropped = self._dropped, 0
        if dropped:
            msg, args = f"{msg} (%d similar lines dropped before this one)", (*args, dropped)
        self._logger.log(level, msg, *args, exc_info=exc_info)


_rejections = _RateLimitedLog(log, per_second=10)
_failures = _RateLimitedLog(log, per_second=5)  # apart, so that rejections cannot hide a failure


def _refuse(context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code``: a client's mistake, logged as one rate-limited line, no traceback."""
    _rejections.log(logging.INFO, "rejected %s from %s: %s: %s", method, context.peer(), code.name, message)
    context.abort(code, message)


_call: contextvars.ContextVar[grpc.ServicerContext | None] = contextvars.ContextVar("call", default=None)
"""The call the current thread is answering, so that loading code deep down can honour its deadline."""


def _time_left() -> float:
    """Seconds until the current call's deadline (LIVE_WAIT_S when it has none)."""
    context = _call.get()
    remaining = context.time_remaining() if context is not None else None
    return LIVE_WAIT_S if remaining is None else min(remaining, LIVE_WAIT_S)


def _check_deadline() -> None:
    """Stop work on the current call once its client has stopped waiting (deadline passed or
    call cancelled): called before each expensive step, since grpc itself never interrupts a handler."""
    context = _call.get()
    if context is None:
        return
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it was answered")
    if not context.is_active():
        raise RequestError(grpc.StatusCode.CANCELLED, "the client cancelled the call")


class _Lru:
    """A small thread-safe least-recently-used cache of immutable things keyed by id."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # Loaded outside the lock so one slow load does not stall every other call; two
        # threads may load the same id at once, which is harmless for immutable things.
        _check_deadline()
        value = load()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return value


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Check the request's field limits (:func:`_check_fields`) and deadline, then answer every
    failure with a status code, so that no exception ever reaches grpc: request errors and
    missing things as such, in one rate-limited log line; anything unexpected as INTERNAL with
    a generic message, its traceback logged under an incident id the message names."""

    @functools.wraps(method)
    def wrapper(self: AnalyzerService, request: Any, context: grpc.ServicerContext) -> T:
        name = method.__name__
        current = _call.set(context)
        try:
            _check_fields(request)
            _check_deadline()
            return method(self, request, context)
        except RequestError as e:
            code, message = e.code, e.message
        except NotFound as e:
            code, message = grpc.StatusCode.NOT_FOUND, str(e)
        except ResourceNameError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except InvalidKey as e:  # a field no check above caught, stopped by the store itself
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            _failures.log(logging.ERROR, "%s failed (incident %s)", name, incident, exc_info=True)
            # The exception's text stays in the log: it can name paths and internals.
            context.abort(grpc.StatusCode.INTERNAL, f"{name} failed: internal error (incident {incident} in the server log)")
        finally:
            _call.reset(current)
            self.last_call = time.monotonic()
        _refuse(context, name, code, message)

    return wrapper


def _check_fields(message: Any, prefix: str = "") -> None:
    """The limits every request field obeys whatever its RPC, nested messages and map entries
    included: strings of at most MAX_STRING_LENGTH characters without NUL, finite floats. What
    a field means (an id's charset, an index's range) is checked where it is used."""
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = [x for pair in value.items() for x in pair]
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if isinstance(item, str) and (len(item) > MAX_STRING_LENGTH or "\0" in item):
                raise _invalid(f"{name} {_shown(item)} is over {MAX_STRING_LENGTH} characters or holds a NUL")
            if isinstance(item, float) and not math.isfinite(item):
                raise _invalid(f"{name} must be a finite number, not {item}")
            if hasattr(item, "ListFields"):
                _check_fields(item, f"{name}.")


class AnalyzerService(rpc.AnalyzerServicer):
    """The ``vitscope.v2.Analyzer`` service over one store."""

    def __init__(self, store: Store):
        self.store = store
        self.last_call: float | None = None
        """When the server last answered a call (time.monotonic), None before its first."""
        self._records = _Lru(1024)
        self._saes = _Lru(4)  # weights can be hundreds of MB each
        self._analyses = _Lru(8)
        self._analysis_manifests = _Lru(1024)  # with the histograms, all ListSaes reads of an analysis
        self._histograms = _Lru(1024)
        self._manifests = _Lru(64)  # activation sets' manifests, for listings that read no rows
        self._sets = _Lru(16)
        self._image_records = _Lru(256)  # per shard
        self._orders = _Lru(32)  # sorted latent indices per (analysis, order)
        self._analysis_of: dict[str, str] = {}  # sae id -> analysis id, once one is published
        self._vits = _Lru(2)  # per model, shared by every SAE that reads it
        self._vit_lock = threading.Lock()
        self._codes = _Lru(16)  # per (SAE, image): a probe's patches and heatmaps reuse one encode
        self._live = threading.BoundedSemaphore(LIVE_ENCODES)
        self._labels = LabelBook(store)
        self._directions = _Lru(4)  # per SAE: unit decoder rows, for decoder-cosine neighbours
        self._firing = _Lru(8)  # per (SAE, sampled set): which latents fire on which sampled image
        self._prompts = _Lru(4)  # per (model, set): the set's class names and their zero-shot prompts

    # --- loading, cached ---------------------------------------------------------------------
    def _record(self, sae_id: str) -> SaeRecord:
        return self._records.get(sae_id, lambda: load_record(self.store, sae_id))

    def _named(self, name: str, field: str) -> SaeRecord:
        """The SAE a ``saes/{sae}`` field names."""
        return self._record(names.parse_sae(name, field))

    def _latent(self, name: str, field: str) -> tuple[SaeRecord, int]:
        """The SAE and latent index a ``saes/{sae}/latents/{latent}`` field names, range-checked."""
        sae_id, latent = names.parse_latent(name, field)
        record = self._record(sae_id)
        if latent >= record.config.d_sae:  # well-formed, names nothing: AIP-193's NOT_FOUND
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"{field}: no latent {latent}: SAE {sae_id} has {record.config.d_sae} latents")
        return record, latent

    def _image(self, name: str, field: str) -> tuple[ActivationSet, int]:
        """The activation set and image index an ``activationSets/{set}/images/{image}`` field names."""
        set_id, index = names.parse_image(name, field)
        aset = self._set(set_id)
        if index >= len(aset):
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"{field}: no image {index}: activation set {set_id} has {len(aset)} images")
        return aset, index

    def _sae(self, sae_id: str) -> Sae:
        from vitscope.sae import load_sae_from

        return self._saes.get(sae_id, lambda: load_sae_from(self.store, sae_id)[0])

    def _manifest(self, set_id: str) -> Manifest:
        return self._manifests.get(set_id, lambda: load_manifest(self.store, set_id))

    def _set(self, set_id: str) -> ActivationSet:
        from vitscope.shards import ActivationSet

        return self._sets.get(set_id, lambda: ActivationSet(self.store, self._manifest(set_id)))

    def _analysis_id(self, record: SaeRecord, published: list[AnalysisManifest] | None = None) -> str | None:
        """The SAE's analysis (see the module docstring), or None while it has none."""
        if record.sae_id in self._analysis_of:
            return self._analysis_of[record.sae_id]
        mine = [m for m in (published if published is not None else list_analyses(self.store))
                if m.sae_id == record.sae_id and m.activation_set_id == record.activation_set_id]
        if not mine:
            return None
        aid = max(mine, key=lambda m: (m.version, m.top_images, m.created_at)).analysis_id
        self._analysis_of[record.sae_id] = aid
        return aid

    def _analysis(self, record: SaeRecord) -> tuple[AnalysisManifest, LatentTable]:
        aid = self._analysis_id(record)
        if aid is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"SAE {record.sae_id} has not been analysed yet: run `vitscope analyze --sae {record.sae_id}`")
        return self._analyses.get(aid, lambda: load_analysis(self.store, aid))

    def _image_record(self, aset: ActivationSet, image_index: int) -> dict[str, Any]:
        shard, row = aset.locate(image_index)
        records = self._image_records.get((aset.manifest.set_id, shard.index), lambda: aset.shard_records(shard))
        return records[row]

    def _sorted(self, manifest: AnalysisManifest, table: LatentTable, order: tuple[str, bool]) -> np.ndarray:
        """Latent indices sorted by ``order`` (field, descending); ties keep index order, so
        paging is deterministic."""
        def sort() -> np.ndarray:
            field, descending = order
            key = np.arange(table.d_sae) if field == "index" else getattr(table, field).astype(np.float64)
            return np.argsort(-key if descending else key, kind="stable")

        return self._orders.get((manifest.analysis_id, order), sort)

    # --- messages ------------------------------------------------------------------------------
    def _sae_message(self, record: SaeRecord, aid: str | None) -> pb.Sae:
        msg = pb.Sae(
            name=names.sae(record.sae_id), variant=record.config.variant, d_in=record.config.d_in,
            d_sae=record.config.d_sae, layer=record.layer, activation_set=names.activation_set(record.activation_set_id),
            model=record.model, analysis=names.analysis(aid) if aid else "", tokens=record.tokens,
            metrics=scalar_metrics(record.metrics),
            config={k: v if isinstance(v, str) else json.dumps(v) for k, v in record.training.items()},
        )
        try:
            m = self._manifest(record.activation_set_id)
        except NotFound:  # one SAE whose activation set was deleted must not break the listing
            log.warning("SAE %s: activation set %s is gone", record.sae_id, record.activation_set_id)
        else:
            msg.image_count = m.n_images
            msg.grid_rows, msg.grid_cols = m.layout.grid
            msg.model = msg.model or str(m.model.get("spec", ""))
        if aid is not None:
            hist = self._histograms.get(aid, lambda: frequency_histogram(load_frequency(self.store, aid)))
            msg.log_frequency_edges.extend(hist.log10_edges.tolist())
            msg.log_frequency_counts.extend(hist.counts.tolist())
            msg.never_fired = hist.never_fired
            manifest = self._analysis_manifests.get(aid, lambda: load_analysis_manifest(self.store, aid))
            msg.views.extend(VIEW_ENUM[v] for v in manifest.views)
            msg.default_view = VIEW_ENUM[manifest.default_view]
        return msg

    @staticmethod
    def _stats(sae_id: str, table: LatentTable, i: int, label: LabelRevision | None) -> pb.Latent:
        """A latent resource with its statistics and label only (what ListLatents returns)."""
        msg = pb.Latent(name=names.latent(sae_id, i), index=i, frequency=float(table.frequency[i]),
                        mean_activation=float(table.mean_activation[i]),
                        max_activation=float(table.max_activation[i]))
        if label is not None:
            msg.label.CopyFrom(_label_message(label))
        return msg

    # --- the service ---------------------------------------------------------------------------
    @_rpc
    def ListSaes(self, request: pb.ListSaesRequest, context: grpc.ServicerContext) -> pb.ListSaesResponse:
        page_size = _page_size(request.page_size)
        ids = list_saes(self.store)
        query = content_id({"list": "saes"})
        offset = _decode_page_token(request.page_token, query, len(ids))
        page = ids[offset:offset + page_size]
        published = list_analyses(self.store) if page else []
        saes = []
        for sae_id in page:
            record = self._record(sae_id)
            saes.append(self._sae_message(record, self._analysis_id(record, published)))
        end = offset + len(page)
        return pb.ListSaesResponse(saes=saes, total_size=len(ids),
                                   next_page_token=_encode_page_token(end, query) if end < len(ids) else "")

    @_rpc
    def GetSae(self, request: pb.GetSaeRequest, context: grpc.ServicerContext) -> pb.Sae:
        record = self._named(request.name, "name")
        return self._sae_message(record, self._analysis_id(record))

    @_rpc
    def ListLatents(self, request: pb.ListLatentsRequest, context: grpc.ServicerContext) -> pb.ListLatentsResponse:
        page_size = _page_size(request.page_size)
        order = _order_by(request.order_by)
        kept = _frequency_range(request.min_frequency, request.max_frequency)
        record = self._named(request.parent, "parent")
        manifest, table = self._analysis(record)
        query = content_id({"analysis": manifest.analysis_id, "order": order, "min": kept.low, "max": kept.high,
                            "labels": request.label_query})
        ordered = self._sorted(manifest, table, order)
        selected = ordered[kept.mask(table.frequency[ordered])]
        labels = self._labels.labelled(record.sae_id)
        if request.label_query.strip():
            matching = self._labels.search(record.sae_id, request.label_query)
            selected = selected[np.isin(selected, np.fromiter(matching, dtype=np.int64, count=len(matching)))]
        offset = _decode_page_token(request.page_token, query, len(selected))
        page = selected[offset:offset + page_size]
        end = offset + len(page)
        return pb.ListLatentsResponse(
            latents=[self._stats(record.sae_id, table, int(i), labels.get(int(i))) for i in page],
            next_page_token=_encode_page_token(end, query) if end < len(selected) else "",
            total_size=len(selected),
        )

    @_rpc
    def GetLatent(self, request: pb.GetLatentRequest, context: grpc.ServicerContext) -> pb.Latent:
        record, latent = self._latent(request.name, "name")
        manifest, table = self._analysis(record)
        # At most what the analysis kept; by default 16 of them.
        k = _bounded(request, "top_images", min(DEFAULT_TOP_IMAGES, manifest.top_images), manifest.top_images)
        view = _view(request.view, manifest)
        top = table.top[view]
        aset = self._set(manifest.activation_set_id)
        rows, cols = aset.layout.grid
        examples = self._examples(aset, top.image[latent, :k], top.patch[latent, :k], top.score[latent, :k])
        if request.heatmaps and examples:
            maps = self._heatmaps(record, aset, manifest.layer, latent, [names.parse_image(e.image)[1] for e in examples])
            for example, heatmap in zip(examples, maps, strict=True):
                example.heatmap.extend(heatmap)
        reply = self._stats(record.sae_id, table, latent, self._labels.current(record.sae_id, latent))
        reply.MergeFrom(pb.Latent(examples=examples, grid_rows=rows, grid_cols=cols, view=VIEW_ENUM[view]))
        if table.histogram is not None:
            reply.activation_histogram.extend(table.histogram[latent].tolist())
            reply.activation_log10_edges.extend(manifest.histogram_log10_edges)
        if table.samples is not None:
            edges, t = manifest.sample_log10_edges, table.samples
            for band in range(t.image.shape[1]):
                drawn = self._examples(aset, t.image[latent, band], t.patch[latent, band], t.score[latent, band])
                if drawn:
                    reply.bands.append(pb.ActivationBand(log10_low=edges[band], log10_high=edges[band + 1],
                                                         examples=drawn))
        if table.cofiring is not None:
            c = table.cofiring
            reply.cofiring.extend(pb.CoFiring(latent_index=int(j), jaccard=float(jac), count=int(n))
                                  for j, jac, n in zip(c.latent[latent], c.jaccard[latent], c.count[latent], strict=True)
                                  if j >= 0)
        return reply

    def _examples(self, aset: ActivationSet, images: np.ndarray, patches: np.ndarray,
                  scores: np.ndarray) -> list[pb.Example]:
        """Examples of stored (image, patch, score) rows; unused slots (image -1) are skipped."""
        cols = aset.layout.grid[1]
        out = []
        for image, patch, score in zip(images, patches, scores, strict=True):
            if image < 0:  # fewer images than slots ever made this latent fire
                continue
            info = self._image_record(aset, int(image))
            out.append(pb.Example(image=names.image(aset.manifest.set_id, int(image)), source_id=str(info["id"]),
                                  label=_label(info),
                                  score=float(score), patch=int(patch), patch_row=int(patch) // cols,
                                  patch_col=int(patch) % cols))
        return out

    def _heatmaps(self, record: SaeRecord, aset: ActivationSet, layer: int, latent: int,
                  images: list[int]) -> list[list[float]]:
        """The latent's activation on every patch of each image, recomputed from the stored rows
        (the latent's encoder column alone where the family allows; TopK needs every latent)."""
        import torch

        _check_deadline()
        start = aset.layout.patch_start
        tokens = torch.stack([aset.image_tokens(layer, i)[start:] for i in images])
        with torch.inference_mode():
            return self._sae(record.sae_id).encode_latent(tokens, latent).tolist()

    @_rpc
    def GetImage(self, request: pb.GetImageRequest, context: grpc.ServicerContext) -> pb.Image:
        aset, index = self._image(request.name, "name")
        info = self._image_record(aset, index)
        image = _models().TransformInfo.from_json(aset.manifest.transform).geometric()(self._dataset_image(aset, index))
        png = io.BytesIO()
        image.save(png, format="PNG")
        return pb.Image(name=names.image(aset.manifest.set_id, index), data=png.getvalue(), mime_type="image/png",
                        width=image.width, height=image.height, source_id=str(info["id"]), label=_label(info))

    def _dataset_image(self, aset: ActivationSet, index: int) -> Image.Image:
        """An activation set's image as its dataset holds it (before the model's transform)."""
        from vitscope.datasets import DatasetError, load_image_by_id

        info = self._image_record(aset, index)
        try:
            return load_image_by_id(aset.manifest.dataset, info["id"])
        except (FileNotFoundError, DatasetError):
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"image {info['id']} can no longer be read from {aset.manifest.dataset} "
                               "(moved since extraction?)") from None

    # --- live calls ------------------------------------------------------------------------------
    def _vit(self, aset: ActivationSet, record: SaeRecord) -> ViT:
        """The SAE's ViT, loaded once per model (the lock keeps two first calls from loading it twice)."""
        models = _models()
        spec = models.ModelSpec.from_record(record.model_record or aset.manifest.model)
        with self._vit_lock:
            return self._vits.get(json.dumps(spec.record(), sort_keys=True), lambda: models.load_vit(spec))

    def _image_codes(self, record: SaeRecord, source: pb.ImageSource,
                     field: str = "image") -> tuple[ActivationSet, torch.Tensor]:
        """The SAE's codes [tokens, d_sae] of an image, in the SAE's activation set's token
        layout: an image of that set from its stored rows; an upload, or an image of another set
        (say, another model's), through the SAE's ViT. Cached per (SAE, image)."""
        import torch

        aset = self._set(record.activation_set_id)
        kind = source.WhichOneof("source")
        if kind == "image":
            other, index = self._image(source.image, f"{field}.image")
            key = (record.sae_id, other.manifest.set_id, index)
            if other.manifest.set_id == aset.manifest.set_id:
                def load() -> torch.Tensor:
                    return self._sae(record.sae_id).encode(aset.image_tokens(record.layer, index))
            else:
                def load() -> torch.Tensor:
                    return self._live_codes(record, aset, self._dataset_image(other, index))
        elif kind == "image_data":
            if not source.image_data:
                raise _invalid(f"{field}.image_data is empty")
            key = (record.sae_id, "upload", content_id({"bytes": source.image_data.hex()}))

            def load() -> torch.Tensor:
                return self._live_codes(record, aset, _decode_image(source.image_data))
        else:
            raise _invalid(f"{field}: give image_data or image (activationSets/{{set}}/images/{{image}})")
        with torch.inference_mode():
            return aset, self._codes.get(key, load)

    @contextlib.contextmanager
    def _live_turn(self) -> Iterator[None]:
        """A turn to run the ViT: bounded in concurrency, since each run holds a ViT's
        activations; more callers wait their turn up to their deadline."""
        if not self._live.acquire(timeout=max(0.0, _time_left())):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many images being encoded: retry")
        try:
            _check_deadline()
            yield
        finally:
            self._live.release()

    def _live_codes(self, record: SaeRecord, aset: ActivationSet, image: Image.Image) -> torch.Tensor:
        """An image's codes through the SAE's ViT, layer and transform, in a :meth:`_live_turn`."""
        with self._live_turn():
            vit = self._vit(aset, record)
            x = vit.activations(image, record.layer, aset.layout)[record.layer][0]
            return self._sae(record.sae_id).encode(x.float().cpu())

    @_rpc
    def EncodeImage(self, request: pb.EncodeImageRequest, context: grpc.ServicerContext) -> pb.EncodedImage:
        record = self._named(request.sae, "sae")
        top = _bounded(request, "top_latents", DEFAULT_TOP_LATENTS, MAX_TOP_LATENTS)
        aset, codes = self._image_codes(record, request.image)
        layout = aset.layout
        patches = codes[layout.patch_start:]
        rows, cols = layout.grid
        reply = pb.EncodedImage(grid_rows=rows, grid_cols=cols,
                                image_latents=_strongest(patches.amax(dim=0), top))
        # One topk for every patch: per-patch calls cost more than the encode itself.
        values, indices = patches.topk(min(top, patches.shape[1]), dim=1)
        for patch, (vals, idx) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            reply.patches.add(patch=patch, latents=[pb.LatentActivation(latent_index=i, activation=v)
                                                    for v, i in zip(vals, idx, strict=True) if v > 0])
        if layout.n_cls:
            reply.cls_latents.extend(_strongest(codes[0], top))
        return reply

    @_rpc
    def SearchLatents(self, request: pb.SearchLatentsRequest,
                      context: grpc.ServicerContext) -> pb.SearchLatentsResponse:
        import torch

        record = self._named(request.sae, "sae")
        if not 1 <= len(request.positives) <= MAX_SEARCH_EXAMPLES or len(request.negatives) > MAX_SEARCH_EXAMPLES:
            raise _invalid(f"give 1 to {MAX_SEARCH_EXAMPLES} positive examples and at most {MAX_SEARCH_EXAMPLES} "
                           f"negative ones (got {len(request.positives)} and {len(request.negatives)})")
        top = _bounded(request, "top_latents", DEFAULT_SEARCH_LATENTS, MAX_SEARCH_LATENTS)

        def strongest(example: pb.SearchExample, field: str) -> torch.Tensor:
            aset, codes = self._image_codes(record, example.image, f"{field}.image")
            region = _region_patches(example.region if example.HasField("region") else None, aset.layout.grid)
            return codes[aset.layout.patch_start:][region].amax(dim=0)  # [d_sae]

        pos = torch.stack([strongest(e, f"positives[{i}]") for i, e in enumerate(request.positives)])
        neg = (torch.stack([strongest(e, f"negatives[{i}]") for i, e in enumerate(request.negatives)])
               if request.negatives else pos[:0])
        # Each latent on its own scale: the dataset maximum when the SAE is analysed, else the examples'.
        aid = self._analysis_id(record)
        scale = (torch.as_tensor(self._analysis(record)[1].max_activation) if aid is not None
                 else torch.cat([pos, neg]).amax(dim=0))
        norm = lambda a: (a / scale.clamp_min(1e-12)).clamp(max=1.0)  # noqa: E731
        pos_mean = norm(pos).mean(dim=0)
        neg_mean = norm(neg).mean(dim=0) if len(neg) else torch.zeros_like(pos_mean)
        score = torch.where((pos > 0).any(dim=0), pos_mean - neg_mean, torch.full_like(pos_mean, -torch.inf))
        # Best first, ties to the lower latent index (a stable sort of the indices by score).
        order = torch.argsort(-score, stable=True)[:top]
        reply = pb.SearchLatentsResponse()
        for i in order.tolist():
            if not torch.isfinite(score[i]):
                break
            reply.latents.add(latent_index=i, score=float(score[i]), positive_mean=float(pos_mean[i]),
                              negative_mean=float(neg_mean[i]), positives_fired=int((pos[:, i] > 0).sum()),
                              negatives_fired=int((neg[:, i] > 0).sum()), positive_activations=pos[:, i].tolist(),
                              negative_activations=neg[:, i].tolist())
        return reply

    @_rpc
    def GetHeatmap(self, request: pb.GetHeatmapRequest, context: grpc.ServicerContext) -> pb.Heatmap:
        record, latent = self._latent(request.latent, "latent")
        aset, codes = self._image_codes(record, request.image)
        rows, cols = aset.layout.grid
        return pb.Heatmap(grid_rows=rows, grid_cols=cols, activation=codes[aset.layout.patch_start:, latent].tolist())


    # --- similar latents ------------------------------------------------------------------------
    @_rpc
    def FindSimilarLatents(self, request: pb.FindSimilarLatentsRequest,
                           context: grpc.ServicerContext) -> pb.FindSimilarLatentsResponse:
        import torch

        record, latent = self._latent(request.latent, "latent")
        other = self._named(request.other_sae, "other_sae") if request.other_sae else record
        top = _bounded(request, "top_latents", DEFAULT_SIMILAR_LATENTS, MAX_SIMILAR_LATENTS)
        reply = pb.FindSimilarLatentsResponse()
        if self._same_space(record, other):
            reply.method = pb.SIMILARITY_METHOD_DECODER_COSINE
            similarity = self._unit_decoder(other) @ self._unit_decoder(record)[latent]
        else:
            reply.method = pb.SIMILARITY_METHOD_COFIRING
            mine, theirs = self._sample_firing(record, record), self._sample_firing(other, record)
            fires = mine[:, latent]
            both = (theirs & fires[:, None]).sum(dim=0)
            either = (theirs | fires[:, None]).sum(dim=0)
            similarity = both / either.clamp_min(1)
            reply.sampled_images = len(fires)
        if other.sae_id == record.sae_id:
            similarity[latent] = -torch.inf  # never the latent itself
        order = torch.argsort(-similarity, stable=True)[:top]
        other_id = other.sae_id
        for i in order.tolist():
            if not torch.isfinite(similarity[i]) or (reply.method == pb.SIMILARITY_METHOD_COFIRING and similarity[i] <= 0):
                break
            reply.latents.add(latent=names.latent(other_id, i), latent_index=i, similarity=float(similarity[i]))
        return reply

    def _same_space(self, a: SaeRecord, b: SaeRecord) -> bool:
        """Whether two SAEs read the same activations: one model (weights included) and layer."""
        if a.sae_id == b.sae_id or a.activation_set_id == b.activation_set_id:
            return a.layer == b.layer
        def model(r: SaeRecord) -> dict[str, Any]:
            return _models().ModelSpec.from_record(r.model_record or self._set(r.activation_set_id).manifest.model).identity()
        return a.layer == b.layer and a.config.d_in == b.config.d_in and model(a) == model(b)

    def _unit_decoder(self, record: SaeRecord) -> torch.Tensor:
        def load() -> torch.Tensor:
            w = self._sae(record.sae_id).W_dec.detach().float()
            return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._directions.get(record.sae_id, load)

    def _sample_firing(self, record: SaeRecord, sampled: SaeRecord) -> torch.Tensor:
        """[images, d_sae] booleans: which of ``record``'s latents fire (at any patch) on each of
        COFIRING_IMAGES images spread evenly over ``sampled``'s activation set."""
        import torch

        set_id = sampled.activation_set_id

        def load() -> torch.Tensor:
            n = len(self._set(set_id))
            images = sorted({int(i) for i in np.linspace(0, n - 1, min(n, COFIRING_IMAGES))})
            rows = []
            for i in images:
                _check_deadline()
                aset, codes = self._image_codes(record, pb.ImageSource(image=names.image(set_id, i)))
                rows.append(codes[aset.layout.patch_start:].amax(dim=0) > 0)
            return torch.stack(rows)

        return self._firing.get((record.sae_id, set_id), load)

    # --- labels --------------------------------------------------------------------------------
    def _label_target(self, name: str, field: str) -> tuple[SaeRecord, int]:
        sae_id, latent = names.parse_label(name, field)
        return self._latent(names.latent(sae_id, latent), field)

    @_rpc
    def GetLatentLabel(self, request: pb.GetLatentLabelRequest, context: grpc.ServicerContext) -> pb.LatentLabel:
        record, latent = self._label_target(request.name, "name")
        current = self._labels.current(record.sae_id, latent)
        return _label_message(current) if current else pb.LatentLabel(name=names.label(record.sae_id, latent))

    @_rpc
    def UpdateLatentLabel(self, request: pb.UpdateLatentLabelRequest, context: grpc.ServicerContext) -> pb.LatentLabel:
        record, latent = self._label_target(request.label.name, "label.name")
        label = request.label
        try:
            rev = self._labels.update(record.sae_id, latent, label.text.strip(), label.notes, label.author.strip(),
                                      request.etag)
        except LabelError as e:
            raise _invalid(str(e)) from None
        except LabelConflict as e:
            raise RequestError(grpc.StatusCode.ABORTED, str(e)) from None
        return _label_message(rev)

    @_rpc
    def ListLatentLabelRevisions(self, request: pb.ListLatentLabelRevisionsRequest,
                                 context: grpc.ServicerContext) -> pb.ListLatentLabelRevisionsResponse:
        record, latent = self._label_target(request.name, "name")
        page_size = _page_size(request.page_size)
        revisions = self._labels.revisions(record.sae_id, latent)
        query = content_id({"labels": request.name})
        offset = _decode_page_token(request.page_token, query, len(revisions))
        page = revisions[offset:offset + page_size]
        end = offset + len(page)
        return pb.ListLatentLabelRevisionsResponse(
            labels=[_label_message(r) for r in page], total_size=len(revisions),
            next_page_token=_encode_page_token(end, query) if end < len(revisions) else "")

    # --- evaluation --------------------------------------------------------------------------
    @_rpc
    def GetEvaluation(self, request: pb.GetEvaluationRequest, context: grpc.ServicerContext) -> pb.Evaluation:
        from vitscope.reports import list_reports, load_plot

        sae_id = names.parse_evaluation(request.name, "name")
        self._record(sae_id)  # NOT_FOUND for an unknown SAE, before the reports are listed
        reports = list_reports(self.store, sae_id)
        if not reports:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"SAE {sae_id} has no evaluation report: run `vitscope evaluate --sae {sae_id}`")
        newest = reports[0]
        rid = newest["report_id"]
        return pb.Evaluation(name=names.evaluation(sae_id), report_id=rid, report_json=json.dumps(newest),
                             plots=[pb.EvaluationPlot(name=n, png=load_plot(self.store, rid, n)) for n in newest["plots"]])

    def _zero_shot(self, aset: ActivationSet, vit: ViT) -> tuple[list[str], torch.Tensor] | str:
        """The SAE set's class names and their prompts' text embeddings, or why there are none."""
        def load() -> tuple[list[str], torch.Tensor] | str:
            from vitscope.splice import ZERO_SHOT_TEMPLATE

            labels = sorted({str(r["label"]) for s in aset.manifest.shards for r in aset.shard_records(s)
                             if r.get("label") is not None})
            if len(labels) < 2:
                return "the SAE's activation set has no class labels (two or more) to read zero-shot"
            text = _models().load_text_tower(vit.spec, vit.device)
            if text is None:
                return "the model has no text tower (zero-shot needs a CLIP-family model)"
            return labels, text([ZERO_SHOT_TEMPLATE.format(n) for n in labels])

        return self._prompts.get((json.dumps(vit.spec.record(), sort_keys=True), aset.manifest.set_id), load)

    @_rpc
    def SteerLatents(self, request: pb.SteerLatentsRequest, context: grpc.ServicerContext) -> pb.SteerLatentsResponse:
        from vitscope.splice import intervene, zero_shot_logits

        record = self._named(request.sae, "sae")
        if not 1 <= len(request.scales) <= MAX_STEERED_LATENTS:
            raise _invalid(f"scales: give 1 to {MAX_STEERED_LATENTS} latents, got {len(request.scales)}")
        scales: dict[int, float] = {}
        for i, s in enumerate(request.scales):
            if not 0 <= s.latent_index < record.config.d_sae:
                raise _invalid(f"scales[{i}].latent_index {s.latent_index} is not a latent of SAE {record.sae_id} "
                               f"(0..{record.config.d_sae - 1})")
            if not -MAX_STEER_FACTOR <= s.factor <= MAX_STEER_FACTOR:
                raise _invalid(f"scales[{i}].factor must be between -{MAX_STEER_FACTOR:g} and {MAX_STEER_FACTOR:g}")
            if s.latent_index in scales:
                raise _invalid(f"scales[{i}]: latent {s.latent_index} is listed twice")
            scales[s.latent_index] = s.factor
        aset = self._set(record.activation_set_id)
        kind = request.image.WhichOneof("source")
        if kind == "image":
            image = self._dataset_image(*self._image(request.image.image, "image.image"))
        elif kind == "image_data" and request.image.image_data:
            image = _decode_image(request.image.image_data)
        else:
            raise _invalid("image: give image_data or image (activationSets/{set}/images/{image})")
        with self._live_turn():
            vit = self._vit(aset, record)
            readout = self._zero_shot(aset, vit)
            read = None if isinstance(readout, str) else (lambda e: zero_shot_logits(e, readout[1]).softmax(dim=-1))
            out = intervene(vit, self._sae(record.sae_id), record, vit.preprocess(image), scales, read)
        reply = pb.SteerLatentsResponse(embedding_cosine=float(out["cosine"][0]))
        if isinstance(readout, str):
            reply.readout_note = readout
            return reply
        before, after = out["before"][0], out["after"][0]
        for c in before.argsort(descending=True)[:STEER_CLASSES].tolist():
            reply.classes.add(label=readout[0][c], before=float(before[c]), after=float(after[c]))
        return reply


def _label_message(rev: LabelRevision) -> pb.LatentLabel:
    msg = pb.LatentLabel(name=names.label(rev.sae_id, rev.latent), text=rev.text, notes=rev.notes, author=rev.author,
                         revision=rev.revision, etag=rev.etag)
    msg.update_time.FromNanoseconds(int(rev.time * 1e9))
    return msg


def _region_patches(region: pb.PatchRegion | None, grid: tuple[int, int]) -> torch.Tensor:
    """Patch indices (row-major) of a region of the grid; every patch for None."""
    import torch

    rows, cols = grid
    if region is None:
        return torch.arange(rows * cols)
    r0, c0, r1, c1 = region.row_start, region.col_start, region.row_end, region.col_end
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise _invalid(f"region rows [{r0}, {r1}) x cols [{c0}, {c1}) is not a non-empty part of the {rows}x{cols} grid")
    return (torch.arange(r0, r1)[:, None] * cols + torch.arange(c0, c1)[None]).reshape(-1)


def _strongest(values: torch.Tensor, top: int) -> list[pb.LatentActivation]:
    """The ``top`` largest of a latent vector that are positive, strongest first."""
    vals, idx = values.topk(min(top, len(values)))
    return [pb.LatentActivation(latent_index=int(i), activation=float(v)) for v, i in zip(vals, idx, strict=True) if v > 0]


def _bounded(request: Any, name: str, default: int, most: int) -> int:
    """An optional count field: ``default`` when unset, else it must lie in [1, most]."""
    if not request.HasField(name):
        return default
    value = getattr(request, name)
    if not 1 <= value <= most:
        raise _invalid(f"{name} must be between 1 and {most}, got {value}")
    return value


def _decode_image(data: bytes) -> Image.Image:
    """An uploaded image, refused cleanly when it is not one or is implausibly large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _invalid(f"image is {image.width}x{image.height}: at most {MAX_IMAGE_PIXELS:,} pixels")
            if max(image.size) > MAX_ASPECT_RATIO * max(1, min(image.size)):
                raise _invalid(f"image is {image.width}x{image.height}: its sides may differ by at most "
                               f"{MAX_ASPECT_RATIO}x (crop it first)")
            image.load()
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _invalid(f"image_data is not an image this server can read ({type(e).__name__})") from None
    return image


# --- request validation ------------------------------------------------------------------------
def _label(info: dict[str, Any]) -> str:
    return "" if info.get("label") is None else str(info["label"])


def _page_size(requested: int) -> int:
    if requested < 0:
        raise _invalid(f"page_size must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


ORDER_FIELDS = ("frequency", "mean_activation", "max_activation", "index")
"""What ListLatents can sort by (AIP-132 ``order_by``)."""


def _order_by(requested: str) -> tuple[str, bool]:
    """(field, descending) of an ``order_by`` like "max_activation desc"; empty is "frequency desc"."""
    words = requested.split()
    if not words:
        return "frequency", True
    if len(words) > 2 or words[0] not in ORDER_FIELDS or words[1:] not in ([], ["asc"], ["desc"]):
        raise _invalid(f"order_by {_shown(requested)}: give one of {', '.join(ORDER_FIELDS)}, "
                       "optionally followed by asc or desc")
    return words[0], words[1:] == ["desc"]


def _frequency_range(low: float, high: float) -> FrequencyRange:
    if low > 1 or high > 1:
        raise _invalid(f"frequencies are fractions of tokens, at most 1 (got min {low}, max {high})")
    try:
        return FrequencyRange.from_bounds(low, high)
    except ValueError as e:
        raise _invalid(str(e)) from None


VIEW_ENUM = {"best_patch": pb.TOP_IMAGES_VIEW_BEST_PATCH, "cls": pb.TOP_IMAGES_VIEW_CLS,
             "mean": pb.TOP_IMAGES_VIEW_MEAN}
"""The analysis' view names and the API's enum values, one to one."""


def _view(requested: int, manifest: AnalysisManifest) -> str:
    """The analysis view a request asks for (unspecified: the analysis' default)."""
    if requested == pb.TOP_IMAGES_VIEW_UNSPECIFIED:
        return manifest.default_view
    names = {v: k for k, v in VIEW_ENUM.items()}
    if requested not in names:
        raise _invalid(f"unknown top-images view {requested}")
    if names[requested] not in manifest.views:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"analysis {manifest.analysis_id} has no {names[requested]} view "
                           f"(it has {', '.join(manifest.views)})")
    return names[requested]


def _encode_page_token(offset: int, query: str) -> str:
    raw = json.dumps({"offset": offset, "query": query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, query: str, total: int) -> int:
    """The offset a token stands for; it must come from the same query (SAE, order, filter)."""
    if not token:
        return 0
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise _invalid("page_token is not one this server issued")
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
        offset, token_query = data["offset"], data["query"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise _invalid("page_token is not one this server issued") from None
    if token_query != query:
        raise _invalid("page_token belongs to another query: keep parent, order_by and filters between pages")
    if not isinstance(offset, int) or not 0 <= offset <= total:
        raise _invalid("page_token is not one this server issued")
    return offset


# --- serving -----------------------------------------------------------------------------------
_UNDECODABLE = object()
"""What a request that does not parse decodes to, so that its handler can refuse it."""


def _rebuilt(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
             deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    """``handler`` with another behaviour and request deserializer, of the same streaming kind."""
    kind = f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


class _Guard(grpc.ServerInterceptor):
    """Runs before every handler. With a token, every call but health checks must carry
    ``authorization: Bearer <token>`` (its body is not even parsed otherwise). A request body
    that does not parse is answered INVALID_ARGUMENT in one log line, where grpc would answer
    INTERNAL and log a traceback."""

    def __init__(self, token: str | None):
        self._expected = f"Bearer {token}".encode() if token else None

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self._expected is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return True
        metadata = dict(details.invocation_metadata or ())
        return hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:  # grpc answers UNIMPLEMENTED
            return None
        if not self._authorized(handler_call_details):
            return _rebuilt(handler, lambda _request, context: _refuse(
                context, method, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"), None)
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def decoded(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:  # whatever the parser raises, the bytes are the client's fault
                return _UNDECODABLE

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                _refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                        "the request body is not a valid protobuf message of this method's request type")
            return behavior(request, context)

        return _rebuilt(handler, checked, decoded)


@dataclass
class RunningServer:
    """A started analyzer server and where it listens."""

    server: grpc.Server
    health: HealthServicer
    host: str
    port: int
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        """``host:port`` as a gRPC target."""
        return _target(self.host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, then stop, letting in-flight calls finish for ``grace`` seconds."""
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def _target(host: str, port: int) -> str:
    bracket = ":" in host and not host.startswith("[")  # an IPv6 address
    return f"[{host}]:{port}" if bracket else f"{host}:{port}"


def _token(cfg: ServeConfig) -> str | None:
    return cfg.token or os.environ.get("VITSCOPE_TOKEN") or None


class InsecureBindError(ValueError):
    """:func:`serve` was asked to listen beyond this machine with neither a bearer token nor
    ``insecure``."""


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only. Any host name but localhost counts
    as not: it may resolve to a public interface."""
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _bind(server: grpc.Server, cfg: ServeConfig) -> int:
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("TLS needs both tls_cert and tls_key")
    address = _target(cfg.host, cfg.port)
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        return server.add_secure_port(address, creds)
    return server.add_insecure_port(address)  # raises RuntimeError when the port is taken


def serve(cfg: ServeConfig) -> RunningServer:
    """Start the analyzer (non-blocking) and return it; ``.port`` is the bound port."""
    if cfg.workers <= 0 or cfg.max_message_mb <= 0 or cfg.max_queued_calls < 0:
        raise ValueError("workers and max_message_mb must be positive, max_queued_calls not negative")
    token = _token(cfg)
    if not token and not cfg.insecure and not _loopback(cfg.host):
        raise InsecureBindError(
            f"refusing to serve on {cfg.host} without a bearer token: anyone who can reach the port could "
            "read the store. Set VITSCOPE_TOKEN (or --token), listen on 127.0.0.1, or pass --insecure "
            "to serve without authentication anyway")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="analyzer"),
        interceptors=[_Guard(token)],
        options=[
            # Without this, grpc shares a busy port with another process instead of failing.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", cfg.max_message_mb << 20),
        ],
        maximum_concurrent_rpcs=cfg.workers + cfg.max_queued_calls,
    )
    service = AnalyzerService(open_store(cfg.store))
    rpc.add_AnalyzerServicer_to_server(service, server)
    health = HealthServicer()
    for name in ("", SERVICE):
        health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection lets grpcurl and friends discover the API; it is behind the token like the rest.
    reflection.enable_server_reflection(
        (SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg)
    server.start()
    running = RunningServer(server, health, cfg.host, port)
    threading.Thread(target=_warm_up, args=(service, running.stopping), name="analyzer-warm-up", daemon=True).start()
    return running


WARM_MODULES = ("vitscope.sae", "vitscope.shards", "vitscope.models", "vitscope.datasets")
"""What the calls that run an SAE or a ViT, or read images, import (torch and torchvision)."""


def _warm_up(service: AnalyzerService, stopping: threading.Event) -> None:
    """Import :data:`WARM_MODULES` once ``service`` has answered calls and then been idle for
    :data:`WARM_UP_IDLE_S` (see there), unless the server stops first."""
    while not stopping.wait(0.2):
        last = service.last_call
        if last is not None and time.monotonic() - last >= WARM_UP_IDLE_S:
            try:
                for module in WARM_MODULES:
                    importlib.import_module(module)
            except Exception:  # the call that needs the module will import it, and report why it fails
                log.warning("could not import the latent calls' modules ahead of them", exc_info=True)
            return


def serve_forever(cfg: ServeConfig) -> None:
    """Serve until SIGINT or SIGTERM, then let in-flight calls finish (5 s at most)."""
    running = serve(cfg)
    log.info("analyzer listening on %s (store %s%s%s)", running.address, cfg.store,
             ", TLS" if cfg.tls_cert else "", ", bearer-token auth" if _token(cfg) else "")
    if not _token(cfg) and not _loopback(cfg.host):
        log.warning("no bearer token (--insecure): anyone who can reach %s can read the store", running.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("analyzer shutting down")
    running.stop(grace=5)
