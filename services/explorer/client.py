"""A small typed client of the analyzer's gRPC API (proto/vitscope/v1/analyzer.proto).

Responses come back as frozen dataclasses rather than protobuf messages: they pickle without
the generated classes (Streamlit's cache pickles what it stores) and read well in a notebook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc

from vitscope.proto import pb, rpc

LatentOrder = Literal["FREQUENCY_DESC", "FREQUENCY_ASC", "MAX_ACTIVATION_DESC", "MEAN_ACTIVATION_DESC", "INDEX_ASC"]

MAX_SAES_PAGE = 1000
"""The analyzer's largest page: fewest calls for a store's SAEs."""

_CHANNEL_OPTIONS = [
    # Heatmaps of k images and full PNGs can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 64 << 20),
    # A long-lived channel (the explorer caches one) must notice a restarted analyzer within
    # seconds, not after gRPC's default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class AnalyzerError(RuntimeError):
    """A failed analyzer call, with the gRPC status code and the server's details."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method}: {code.name}: {details}")

    @property
    def unreachable(self) -> bool:
        """True when no analyzer answered (down, wrong address, or the deadline passed)."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class SaeInfo:
    sae_id: str
    variant: str
    d_in: int
    d_sae: int
    layer: int
    activation_set_id: str
    model: str
    metrics: dict[str, float]
    analyzed: bool
    analysis_id: str
    n_images: int
    grid_rows: int
    grid_cols: int
    tokens: tuple[str, ...]
    log_freq_edges: tuple[float, ...]
    log_freq_counts: tuple[int, ...]
    never_fired: int | None  # over the analysis pass; None until analysed
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LatentStats:
    index: int
    frequency: float
    mean_activation: float
    max_activation: float


@dataclass(frozen=True)
class LatentPage:
    latents: tuple[LatentStats, ...]
    next_page_token: str  # empty on the last page
    total_size: int  # latents that pass the filter


@dataclass(frozen=True)
class Example:
    image_index: int
    image_id: str
    label: str
    score: float
    patch: int
    patch_row: int
    patch_col: int
    heatmap: tuple[float, ...]  # grid_rows * grid_cols, row-major; empty unless asked for


@dataclass(frozen=True)
class Latent:
    stats: LatentStats
    examples: tuple[Example, ...]
    grid_rows: int
    grid_cols: int


@dataclass(frozen=True)
class ImageData:
    data: bytes
    mime_type: str
    width: int
    height: int
    image_id: str
    label: str


class AnalyzerClient:
    """Typed calls to one analyzer. Every call has a deadline of ``timeout`` seconds and raises
    :class:`AnalyzerError` on failure. ``token`` is sent as ``authorization: Bearer <token>``;
    ``root_certificates`` (PEM) switches to TLS."""

    def __init__(self, target: str, token: str | None = None, timeout: float = 10.0,
                 root_certificates: bytes | None = None):
        self.target = target
        self.timeout = timeout
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
        self._stub = rpc.AnalyzerStub(self._channel)
        self._metadata: Sequence[tuple[str, str]] = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:  # raised by the stub as a grpc.Call carrying code() and details()
            raise AnalyzerError(method, e.code(), e.details() or "") from None

    def list_saes(self) -> list[SaeInfo]:
        """Every SAE in the analyzer's store (all pages)."""
        out, token = [], ""
        while True:
            resp = self._call("ListSaes", pb.ListSaesRequest(page_size=MAX_SAES_PAGE, page_token=token))
            out += [_sae(s) for s in resp.saes]
            token = resp.next_page_token
            if not token:
                return out

    def get_sae(self, sae_id: str) -> SaeInfo:
        """One SAE with its metrics and firing-frequency histogram."""
        return _sae(self._call("GetSae", pb.GetSaeRequest(sae_id=sae_id)))

    def list_latents(self, sae_id: str, page_size: int = 50, page_token: str = "",
                     order: LatentOrder = "FREQUENCY_DESC", min_frequency: float = 0.0,
                     max_frequency: float = 0.0) -> LatentPage:
        """One page of latent statistics; a bound of 0 means unbounded."""
        resp = self._call("ListLatents", pb.ListLatentsRequest(
            sae_id=sae_id, page_size=page_size, page_token=page_token, order=pb.LatentOrder.Value(order),
            min_frequency=min_frequency, max_frequency=max_frequency))
        return LatentPage(tuple(_stats(s) for s in resp.latents), resp.next_page_token, resp.total_size)

    def get_latent(self, sae_id: str, latent: int, top_images: int | None = None, heatmaps: bool = True) -> Latent:
        """A latent's statistics and its top images (with per-patch heatmaps if asked).
        ``top_images=None`` lets the server choose (16, or fewer if the analysis kept fewer)."""
        request = pb.GetLatentRequest(sae_id=sae_id, latent=latent, heatmaps=heatmaps)
        if top_images is not None:
            request.top_images = top_images
        resp = self._call("GetLatent", request)
        examples = tuple(
            Example(e.image_index, e.image_id, e.label, e.score, e.patch, e.patch_row, e.patch_col, tuple(e.heatmap))
            for e in resp.examples)
        return Latent(_stats(resp.stats), examples, resp.grid_rows, resp.grid_cols)

    def get_image(self, sae_id: str, image_index: int) -> ImageData:
        """A dataset image as the model saw it (resized and cropped), as PNG bytes."""
        r = self._call("GetImage", pb.GetImageRequest(sae_id=sae_id, image_index=image_index))
        return ImageData(r.data, r.mime_type, r.width, r.height, r.image_id, r.label)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnalyzerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stats(s) -> LatentStats:
    return LatentStats(s.index, s.frequency, s.mean_activation, s.max_activation)


def _sae(s) -> SaeInfo:
    return SaeInfo(
        sae_id=s.sae_id, variant=s.variant, d_in=s.d_in, d_sae=s.d_sae, layer=s.layer,
        activation_set_id=s.activation_set_id, model=s.model, metrics=dict(s.metrics), analyzed=s.analyzed,
        analysis_id=s.analysis_id, n_images=s.n_images, grid_rows=s.grid_rows, grid_cols=s.grid_cols,
        tokens=tuple(s.tokens), log_freq_edges=tuple(s.log_freq_edges), log_freq_counts=tuple(s.log_freq_counts),
        never_fired=s.never_fired if s.HasField("never_fired") else None, config=dict(s.config))
