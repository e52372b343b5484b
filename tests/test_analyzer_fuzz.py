"""The analyzer server under hostile input, as an attacker would try it: a seeded fuzz over every
RPC in the contract (hostile strings and resource names, extreme integers, NaN and infinities,
random bytes on the wire, bad tokens), hostile resource names in every field that holds one,
message-size and concurrency limits, deadlines, and the guard against listening beyond
loopback without a token.

Every call must get a deliberate status (never INTERNAL or UNKNOWN), the server must keep
answering good calls, and rejected calls must cost a bounded number of log lines, none of them
a traceback."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from PIL import Image
from support import grpc_code

from vitscope.analyzer import AnalyzeConfig, InsecureBindError, ServeConfig, analyze, serve
from vitscope.analyzer.results import list_analyses
from vitscope.analyzer.server import AnalyzerService, _loopback
from vitscope.composition.cli import main, parse
from vitscope.extractor import ExtractConfig, extract
from vitscope.proto import SERVICE, names, pb, rpc
from vitscope.sae import SaeConfig, SaeRecord, build_sae, fit_normalizer, save_sae
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import open_store
from vitscope.synthetic import make_planted_dataset

SAE_ID = "fuzz-relu"
SAE = names.sae(SAE_ID)
D_SAE = 32
N_IMAGES = 12
TOKEN = "fuzz-token"
ANALYZER = pb.DESCRIPTOR.services_by_name["Analyzer"]
METHODS = [f"/{SERVICE}/{m.name}" for m in ANALYZER.methods] + ["/grpc.health.v1.Health/Check"]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
"""What no call may get: a handler's crash, or a server that stopped answering."""
Code = grpc.StatusCode


@dataclass(frozen=True)
class Fuzzed:
    """The fuzzed store and the names of what it holds."""

    uri: str
    set_id: str
    analysis_id: str

    def name(self, kind: str, index: int = 0) -> str:
        """A valid name of ``kind`` ("sae", "latent", "label", "evaluation" or "image"); ``index`` wraps to
        a valid one."""
        if kind == "sae":
            return SAE
        if kind == "evaluation":
            return names.evaluation(SAE_ID)
        if kind == "latent":
            return names.latent(SAE_ID, index % D_SAE)
        if kind == "label":
            return names.label(SAE_ID, index % D_SAE)
        return names.image(self.set_id, index % N_IMAGES)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model_name: str) -> Fuzzed:
    """A small store: 12 planted images, one analysed SAE."""
    root = tmp_path_factory.mktemp("fuzz") / "images"
    make_planted_dataset(root, n_images=N_IMAGES, size=112, square=32, seed=5)
    uri = str(root.parent / "store")
    res = extract(ExtractConfig(data=str(root), store=uri, model=tiny_model_name, pretrained=None, layers=(-1,),
                                images_per_shard=4, workers=0, progress=False))
    aset = ActivationSet.open(open_store(uri), res.set_id)
    layer = aset.manifest.layers[0]
    patches = torch.cat([from_storage(a[:, aset.layout.patch_start:], aset.manifest.dtype).flatten(0, 1)
                         for _, a in aset.iter_shards(layer)])
    sae = build_sae(SaeConfig.of("relu", d_in=patches.shape[1], d_sae=D_SAE))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    mean, scale = fit_normalizer(patches)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        sae.b_enc.copy_(torch.linspace(-4.0, 1.0, D_SAE))  # some latents fire, some never do
    save_sae(open_store(uri), sae, SaeRecord(sae_id=SAE_ID, config=SaeConfig.of("relu", patches.shape[1], D_SAE),
                                             activation_set_id=res.set_id, layer=layer, tokens=["patches"]))
    analyze(AnalyzeConfig(sae=SAE_ID, store=uri, top_images=4, device="cpu", progress=False))
    (analysis,) = list_analyses(open_store(uri))
    assert len(aset) == N_IMAGES
    return Fuzzed(uri, res.set_id, analysis.analysis_id)


@pytest.fixture(scope="module")
def store_uri(fuzzed: Fuzzed) -> str:
    return fuzzed.uri


@pytest.fixture(scope="module")
def open_server(store_uri: str):
    """No token, and a 1 MiB request limit so that an oversized request is cheap to send."""
    running = serve(ServeConfig(store=store_uri, port=0, workers=4, max_message_mb=1))
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def token_server(store_uri: str):
    running = serve(ServeConfig(store=store_uri, port=0, workers=4, token=TOKEN))
    yield running
    running.stop(grace=None)


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.delenv("VITSCOPE_TOKEN", raising=False)


def _good_call(address: str, metadata=()) -> None:
    with grpc.insecure_channel(address) as channel:
        assert rpc.AnalyzerStub(channel).GetSae(pb.GetSaeRequest(name=SAE), timeout=10, metadata=metadata).name == SAE


def _server_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("vitscope", "grpc"))]


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in _server_log(caplog) if r.exc_info or r.levelno >= logging.ERROR], \
        "a rejected call logged an error"


# --- which request fields hold what ----------------------------------------------------------------
NAME_FIELDS = {
    "vitscope.v2.GetSaeRequest.name": "sae",
    "vitscope.v2.ListLatentsRequest.parent": "sae",
    "vitscope.v2.GetLatentRequest.name": "latent",
    "vitscope.v2.GetImageRequest.name": "image",
    "vitscope.v2.EncodeImageRequest.sae": "sae",
    "vitscope.v2.GetHeatmapRequest.latent": "latent",
    "vitscope.v2.SearchLatentsRequest.sae": "sae",
    "vitscope.v2.ImageSource.image": "image",
    "vitscope.v2.FindSimilarLatentsRequest.latent": "latent",
    "vitscope.v2.FindSimilarLatentsRequest.other_sae": "sae",
    "vitscope.v2.GetLatentLabelRequest.name": "label",
    "vitscope.v2.LatentLabel.name": "label",
    "vitscope.v2.ListLatentLabelRevisionsRequest.name": "label",
    "vitscope.v2.GetEvaluationRequest.name": "evaluation",
    "vitscope.v2.SteerLatentsRequest.sae": "sae",
}
"""Every request field that holds a resource name, and the kind of name ("sae", "latent", "label", "evaluation",
"image")."""
FREE_STRINGS = {f"vitscope.v2.{name}" for name in (
    "ListSaesRequest.page_token", "ListLatentsRequest.page_token", "ListLatentsRequest.order_by",
    "ListLatentsRequest.label_query", "LatentLabel.text", "LatentLabel.notes", "LatentLabel.author", "LatentLabel.etag",
    "UpdateLatentLabelRequest.etag", "ListLatentLabelRevisionsRequest.page_token")}
"""The other string fields of the requests."""


def _string_fields(message: Descriptor, seen: frozenset[str] = frozenset()) -> Iterator[str]:
    """Full names of the string (not bytes) fields of ``message`` and of the messages it holds."""
    for field in message.fields:
        if field.message_type is not None and field.message_type.full_name not in seen:
            yield from _string_fields(field.message_type, seen | {message.full_name})
        elif field.type == FieldDescriptor.TYPE_STRING:
            yield field.full_name


def test_every_string_field_of_a_request_is_fuzzed_as_what_it_holds():
    fields = {f for method in ANALYZER.methods for f in _string_fields(method.input_type)}
    assert fields == set(NAME_FIELDS) | FREE_STRINGS


# --- hostile values ------------------------------------------------------------------------------
def _token(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


HOSTILE_STRINGS = [
    "", " ", "x" * 10_000, "a" * 129, "a" * 128, "a" * 241, "../../../../etc/passwd", "saes/../../x", "/abs",
    "a/b", "\x00", "fuzz-relu\x00.json", "\u00e9" * 300, "\U0001f600", "\u202etxt.exe", "%s%n%x", "{0}{1}",
    "'; DROP TABLE saes; --", "<img src=x onerror=alert(1)>", "-rf", ".", "..", "CON", "NUL", "\r\n", "..\\..\\x",
    "A" * 5000, SAE_ID, SAE + "/", " " + SAE, SAE.upper(), "saes/*", "saes/-", "saes/fuzz-relu/latents/-",
    # page tokens: forged offsets and shapes, a nesting bomb, not base64 at all
    _token({"offset": 10**30, "query": "x"}), _token({"offset": -1, "query": "x"}), _token({"offset": 1.5}),
    _token([[[[[[[[]]]]]]]]), _token("offset"), _token(None), "[" * 400, "====", "\u00ff\u00fe",
]
ORDER_BYS = [
    "", "index", "frequency desc", "max_activation desc", "mean_activation asc", "frequency  desc",  # valid
    "max_activation DESC", "desc", "asc", "index desc desc", "index asc desc", "index,frequency", "-frequency",
    "frequency desc, index", "max_activation\tdesc", "\u00a0index", "index\u3000desc", "latent_index", "name",
    "d" * 4096, "index " * 700,
]
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1.0, 2.0, 0.5, 1e-9]


def _png(width: int, height: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a correct checksum) claims ``width`` x ``height`` pixels."""
    import zlib

    png = bytearray(_png(1, 1))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[ihdr + 17:ihdr + 21] = zlib.crc32(png[ihdr:ihdr + 17]).to_bytes(4, "big")
    return bytes(png)


IMAGE_BYTES = [_png(32, 32, seed) for seed in range(3)] + [
    _png(3, 2), _png(32, 32)[:60],                        # tiny; a PNG cut short
    _png_claiming(100_000, 100_000), _png_claiming(0, 0), # a decompression bomb's header; no pixels at all
    b"GIF89a" + b"\x00" * 20, b"\x89PNG\r\n\x1a\n",        # headers and nothing behind them
]
"""Uploads for ``image_data``: a few real images (the ViT encodes them), and images that are not."""


# --- hostile resource names ------------------------------------------------------------------------
INVALID = frozenset({Code.INVALID_ARGUMENT})
"""A malformed name: the wrong collection or kind, a bad id or index."""
MISSING = frozenset({Code.NOT_FOUND})
"""A well-formed name of nothing in the store."""
PAST_END = MISSING
"""A well-formed index past the end (a latent >= d_sae, an image past the set's end): a name of
nothing, NOT_FOUND as the contract says."""

BAD_IDS = [
    "", "-x", ".x", "_x", ".", "..", "a b", " a", "a ", "a\n", "a\t", "a/b", "a\\b", "a:b", "a*", "a?b", "a#b",
    "a%2Fb", "%2e%2e", "a" * 129, "x" * 4000, "x" * 10_000, "\u00e9" * 200, "fuzz\u2010relu", "\uff46uzz-relu",
    "fuzz-relu\u200b", "\u202efuzz", "\U0001f600", "fuzz-relu\x00",
]
"""Ids the grammar refuses: wrong first character, characters outside [A-Za-z0-9._-] (look-alikes
and invisible ones too), over 128 characters (4000 is under the string limit, 10,000 over it)."""
BAD_INDICES = [
    "", "-1", "-0", "+1", "01", "00", "007", "1.0", "1e3", "0x1", " 1", "1 ", "1_000", "\uff11", "\u0661",
    "\u2160", "NaN", "inf", "1,2", "*", "-",
]
"""Indices the grammar refuses: signs, leading zeros, other notations, non-ASCII digits (which
Python's int() would read), wildcards."""


def _huge_indices(count: int) -> list[tuple[str, frozenset[Code]]]:
    """Decimal indices at or past ``count``, up to far beyond any integer type, with their answer:
    NOT_FOUND while the grammar's 18 digits hold them, INVALID_ARGUMENT beyond."""
    indices = [str(count), str(count + 1), str(2**31 - 1), str(2**31), str(2**32), str(2**63 - 1), str(2**63),
               str(2**64), "9" * 18, "99999999999999999999", "9" * 4000]
    return [(n, PAST_END if len(n) <= 18 else INVALID) for n in indices]


def _structure(good: str) -> list[str]:
    """Variations of a valid name's shape: segments added, doubled, cut or emptied, separators and
    surroundings changed, case changed."""
    parts = good.split("/")
    return [
        good + "/", "/" + good, good + "/x", good + "/" + good, good + "//", good.replace("/", "//", 1),
        good.replace("/", "\\"), good.replace("/", "%2F"), good.replace("/", ":"), "/".join(parts[:-1]),
        "/".join(parts[:-1]) + "/", good.upper(), parts[0].capitalize() + "/" + "/".join(parts[1:]),
        " " + good, good + " ", good + "\n", good + "?x=1", good + "#x", "//" + good, f"https://example.org/{good}",
        good + "/..", good + "/.", "/".join(parts[:2]) + "/../" + "/".join(parts), good.replace("/", "/./", 1),
        "\u202e" + good, good + "\u200b", good + "\x00",
    ]


def _specific(kind: str, f: Fuzzed) -> list[tuple[str, frozenset[Code]]]:
    """Names close to a valid one of ``kind``: bad ids and indices, wrong collections, unknown ids."""
    set_name, latent = names.activation_set(f.set_id), names.latent(SAE_ID, 0)
    if kind == "sae":
        return ([(names.sae(i), INVALID) for i in BAD_IDS]
                + [(name, INVALID) for name in (f"sae/{SAE_ID}", f"SAES/{SAE_ID}", f"saes:{SAE_ID}", f"saes.{SAE_ID}")]
                + [(names.sae(i), MISSING) for i in ("nope", "a" * 128, "FUZZ-RELU", f.set_id, f.analysis_id, "a..b",
                                                      SAE_ID + ".", "0", "-".join(["x"] * 64)[:127])])
    if kind == "latent":
        return ([(names.latent(i, 0), INVALID) for i in BAD_IDS]
                + [(f"{SAE}/latents/{n}", INVALID) for n in BAD_INDICES]
                + [(f"{SAE}/latents/{n}", codes) for n, codes in _huge_indices(D_SAE)]
                + [(name, INVALID) for name in (
                    f"{SAE}/latent/1", f"{SAE}/Latents/1", f"sae/{SAE_ID}/latents/1", f"{SAE}/images/1",
                    f"{SAE}/latents/1/latents/2", f"{SAE}/latents//1", f"saes//{SAE_ID}/latents/1", "saes//latents/1",
                    "saes/-/latents/1", f"{SAE}/latents/1/extra")]
                + [(names.latent(i, 0), MISSING) for i in ("nope", "a" * 128, f.set_id, "FUZZ-RELU")])
    if kind == "label":  # a latent's singleton: every latent case, and the singleton's own segment
        return ([(name + "/label", codes) for name, codes in _specific("latent", f)]
                + [(name, INVALID) for name in (
                    f"{latent}/labels", f"{latent}/Label", f"{latent}/label/1", f"{latent}/labels/1", f"{SAE}/label",
                    f"{SAE}/latents/label", f"{latent}/label/label", f"{latent}/label/revisions", f"{latent}:label",
                    f"{set_name}/images/0/label")])
    if kind == "evaluation":  # an SAE's singleton: every SAE case, and the singleton's own segment
        return ([(name + "/evaluation", codes) for name, codes in _specific("sae", f)]
                + [(name, INVALID) for name in (
                    f"{SAE}/evaluations", f"{SAE}/Evaluation", f"{SAE}/evaluation/1", f"{SAE}/evaluations/1",
                    f"{latent}/evaluation", f"{SAE}/evaluation/evaluation", f"{SAE}:evaluation",
                    f"{set_name}/evaluation", f"evaluations/{SAE_ID}")])
    return ([(names.image(i, 0), INVALID) for i in BAD_IDS]
            + [(f"{set_name}/images/{n}", INVALID) for n in BAD_INDICES]
            + [(f"{set_name}/images/{n}", codes) for n, codes in _huge_indices(N_IMAGES)]
            + [(name, INVALID) for name in (
                f"activationSet/{f.set_id}/images/0", f"activationsets/{f.set_id}/images/0",
                f"activation_sets/{f.set_id}/images/0", f"ActivationSets/{f.set_id}/images/0", f"{set_name}/image/0",
                f"{set_name}/Images/0", f"{set_name}/images/0/x", f"{set_name}//images/0", "activationSets//images/0",
                "activationSets/-/images/0", f"{set_name}/images/0/images/1")]
            # Images of activation sets the store does not have (one of them an SAE's id, one an analysis').
            + [(names.image(i, 0), MISSING) for i in ("nope", "a" * 128, SAE_ID, f.analysis_id, f.set_id.upper(),
                                                       f.set_id + "0", "0")])


@functools.cache
def _hostile_names(kind: str, f: Fuzzed) -> list[tuple[str, frozenset[Code]]]:
    """(name, the codes it may get) for a field that holds a name of ``kind``."""
    set_name = names.activation_set(f.set_id)
    others = {  # valid names of every other kind
        "sae": SAE, "latent": names.latent(SAE_ID, 0), "label": names.label(SAE_ID, 0),
        "evaluation": names.evaluation(SAE_ID),
        "image": names.image(f.set_id, 0), "set": set_name, "analysis": names.analysis(f.analysis_id),
    }
    wrong_kind = [name for k, name in others.items() if k != kind] + [
        SAE_ID, f.set_id, f.analysis_id, "0", "", "/", "saes", "saes/", "activationSets", "latents/0", "images/0",
        f"{SAE}/images/0", f"{set_name}/latents/0", f"{SAE}/latents", f"{set_name}/images", f"{SAE}/latents/0/images/0",
        f"analyses/{f.analysis_id}/latents/0", f"saes/{f.set_id}/images/0",
    ]
    good = f.name(kind)
    cases = [(name, INVALID) for name in wrong_kind + _structure(good)] + _specific(kind, f)
    return [(name, codes) for name, codes in cases if name != good]


def _example(image: str) -> pb.SearchExample:
    return pb.SearchExample(image=pb.ImageSource(image=image))


def _source(image: str) -> pb.ImageSource:
    return pb.ImageSource(image=image)


@dataclass(frozen=True)
class Site:
    """A place a request holds a resource name."""

    method: str
    kind: str
    build: Callable[[str, Fuzzed], Any]
    """The request with that name there and valid values everywhere else."""
    reached: frozenset[Code] = frozenset({Code.OK})
    """What the request gets once its name is valid: it got past the name."""
    optional: bool = False
    """Whether an empty name is valid there (it means a default)."""


SITES = {
    "GetSae.name": Site("GetSae", "sae", lambda n, f: pb.GetSaeRequest(name=n)),
    "ListLatents.parent": Site("ListLatents", "sae", lambda n, f: pb.ListLatentsRequest(parent=n)),
    "GetLatent.name": Site("GetLatent", "latent", lambda n, f: pb.GetLatentRequest(name=n)),
    "GetImage.name": Site("GetImage", "image", lambda n, f: pb.GetImageRequest(name=n)),
    "EncodeImage.sae": Site("EncodeImage", "sae",
                            lambda n, f: pb.EncodeImageRequest(sae=n, image=_source(f.name("image")))),
    "EncodeImage.image.image": Site("EncodeImage", "image", lambda n, f: pb.EncodeImageRequest(sae=SAE, image=_source(n))),
    "GetHeatmap.latent": Site("GetHeatmap", "latent",
                              lambda n, f: pb.GetHeatmapRequest(latent=n, image=_source(f.name("image")))),
    "GetHeatmap.image.image": Site("GetHeatmap", "image",
                                   lambda n, f: pb.GetHeatmapRequest(latent=f.name("latent"), image=_source(n))),
    "SearchLatents.sae": Site("SearchLatents", "sae",
                              lambda n, f: pb.SearchLatentsRequest(sae=n, positives=[_example(f.name("image"))])),
    "SearchLatents.positives.image.image": Site(
        "SearchLatents", "image", lambda n, f: pb.SearchLatentsRequest(sae=SAE, positives=[_example(n)])),
    "SearchLatents.negatives.image.image": Site(
        "SearchLatents", "image",
        lambda n, f: pb.SearchLatentsRequest(sae=SAE, positives=[_example(f.name("image"))], negatives=[_example(n)])),
    "FindSimilarLatents.latent": Site("FindSimilarLatents", "latent",
                                      lambda n, f: pb.FindSimilarLatentsRequest(latent=n)),
    "FindSimilarLatents.other_sae": Site(
        "FindSimilarLatents", "sae", lambda n, f: pb.FindSimilarLatentsRequest(latent=f.name("latent"), other_sae=n),
        optional=True),
    "GetLatentLabel.name": Site("GetLatentLabel", "label", lambda n, f: pb.GetLatentLabelRequest(name=n)),
    # A write: the first valid one succeeds, later ones (the fuzz writes labels too) may meet another etag.
    "UpdateLatentLabel.label.name": Site(
        "UpdateLatentLabel", "label", lambda n, f: pb.UpdateLatentLabelRequest(label=pb.LatentLabel(name=n, text="fuzz")),
        reached=frozenset({Code.OK, Code.ABORTED})),
    "ListLatentLabelRevisions.name": Site("ListLatentLabelRevisions", "label",
                                          lambda n, f: pb.ListLatentLabelRevisionsRequest(name=n)),
    # The fuzzed SAE was never evaluated: a valid name gets past the parsing to NOT_FOUND.
    "GetEvaluation.name": Site("GetEvaluation", "evaluation", lambda n, f: pb.GetEvaluationRequest(name=n),
                               reached=frozenset({Code.NOT_FOUND})),
    "SteerLatents.sae": Site("SteerLatents", "sae", lambda n, f: pb.SteerLatentsRequest(
        sae=n, image=_source(f.name("image")), scales=[pb.LatentScale(latent_index=0, factor=0.0)])),
    "SteerLatents.image.image": Site("SteerLatents", "image", lambda n, f: pb.SteerLatentsRequest(
        sae=SAE, image=_source(n), scales=[pb.LatentScale(latent_index=0, factor=0.0)])),
}
"""Every place a request holds a resource name."""


def _fields_holding(message: Any, value: str) -> set[str]:
    """Full names of the string fields of ``message`` (nested ones included) set to ``value``."""
    found = set()
    for field, v in message.ListFields():
        for item in v if field.is_repeated else [v]:
            if isinstance(item, str) and item == value:
                found.add(field.full_name)
            elif hasattr(item, "ListFields"):
                found |= _fields_holding(item, value)
    return found


def test_the_sites_cover_every_name_field_with_its_kind():
    dummy = Fuzzed("unused", "set1", "analysis1")
    covered = {}
    for site in SITES.values():
        request = site.build("\x01marker", dummy)
        assert type(request).DESCRIPTOR is ANALYZER.methods_by_name[site.method].input_type
        (field,) = _fields_holding(request, "\x01marker")
        covered[field] = site.kind
    assert covered == NAME_FIELDS


@pytest.mark.parametrize("where", SITES)
def test_hostile_resource_names_are_invalid_or_not_found(open_server, fuzzed, caplog, where):
    caplog.set_level(logging.INFO)
    site = SITES[where]
    hostile = [(n, codes) for n, codes in _hostile_names(site.kind, fuzzed) if n or not site.optional]
    with grpc.insecure_channel(open_server.address) as channel:
        call = getattr(rpc.AnalyzerStub(channel), site.method)
        # With a valid name there, the request gets past it: what fails below fails for its name.
        assert grpc_code(lambda: call(site.build(fuzzed.name(site.kind), fuzzed), timeout=30)) in site.reached
        wrong = []
        for name, expected in hostile:
            try:
                call(site.build(name, fuzzed), timeout=30)
                code, details = Code.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            if code not in expected or len(details) > 500:  # a 10,000-character name is not echoed back whole
                wrong.append((name[:80], code.name, sorted(c.name for c in expected), len(details)))
        assert not wrong, f"{len(wrong)} of {len(hostile)} names answered wrong: {wrong[:8]}"
        assert grpc_code(lambda: call(site.build(fuzzed.name(site.kind, 1), fuzzed), timeout=30)) in site.reached
    _no_errors_logged(caplog)


# --- the fuzz -------------------------------------------------------------------------------------
def _string(rng: random.Random, field: FieldDescriptor, f: Fuzzed) -> str:
    kind = NAME_FIELDS.get(field.full_name)
    pick = rng.random()
    if kind is not None and pick < 0.4:
        return f.name(kind, rng.randrange(64))  # valid, so that the other fields get past the lookup
    if kind is not None and pick < 0.75:
        return rng.choice(_hostile_names(kind, f))[0]
    if field.name == "order_by" and pick < 0.6:
        return rng.choice(ORDER_BYS)
    if rng.random() < 0.6:
        return rng.choice(HOSTILE_STRINGS)
    chars = (chr(c) for c in (rng.randint(1, 0x10FFFF) for _ in range(rng.randint(1, 300))))
    return "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)  # protobuf refuses surrogates


def _int(rng: random.Random, low: int, high: int) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.randint(max(low, 0), min(high, 5))  # valid counts and grid rows, mostly
    if pick < 0.7:
        return rng.choice([low, high, -1, 0, 1, low + 1, high - 1, D_SAE, D_SAE - 1, N_IMAGES])
    return rng.randint(low, high)


def _value(rng: random.Random, field: FieldDescriptor, f: Fuzzed, depth: int) -> Any:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        return _hostile(GetMessageClass(field.message_type), rng, f, depth + 1)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return rng.choice(IMAGE_BYTES) if rng.random() < 0.3 else rng.randbytes(rng.choice([0, 1, 16, 4096]))
        return _string(rng, field, f)
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return rng.choice(FLOATS)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _int(rng, -(2**31), 2**31 - 1)  # proto3 enums are open: any int32 arrives
    return _int(rng, *INT_RANGES[cpp])


def _hostile(cls: type, rng: random.Random, f: Fuzzed, depth: int = 0) -> Any:
    """A ``cls`` message with a random subset of its fields set to hostile (or now and then valid)
    values; of a oneof, the field set last wins, as on the wire."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3 or (depth > 2 and field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE):
            continue
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(rng.randint(1, 3)):
                k = _value(rng, key, f, depth)
                if value.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    target[k].CopyFrom(_value(rng, value, f, depth))
                else:
                    target[k] = _value(rng, value, f, depth)
        elif field.is_repeated:
            values = [_value(rng, field, f, depth) for _ in range(rng.randint(1, 3))]
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.extend(values)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            target.CopyFrom(_value(rng, field, f, depth))
        else:
            setattr(msg, field.name, _value(rng, field, f, depth))
    return msg


def _hostile_bytes(rng: random.Random) -> bytes:
    return rng.choice([
        rng.randbytes(rng.randint(1, 2000)),
        b"\x0a\x02\xc3\x28",                  # field 1, a string that is not UTF-8
        b"\x08" + b"\xff" * 11,               # a varint longer than 64 bits
        b"\x0a\xff\xff\xff\xff\x0f",          # a length far past the end
        b"\x0b" * 300,                        # groups nested past any limit
        b"\x12\x05abc",                       # truncated
        b"\xff\xff\xff\xff\x1f\x00",          # field number out of range
        b"\x12\x03\x12\x01\xff",              # an ImageSource whose image name is not UTF-8
        b"",                                  # an empty (default) message: valid
    ])


def _fuzz_calls(seed: int, n: int, f: Fuzzed) -> Iterator[tuple[str, bytes]]:
    """(method path, request bytes): typed hostile messages for the contract's RPCs, raw bytes for all."""
    rng = random.Random(seed)
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        if rng.random() < 0.3 or "Health" in method:
            yield method, _hostile_bytes(rng)
        else:
            desc = ANALYZER.methods_by_name[method.rsplit("/", 1)[1]]
            yield method, _hostile(GetMessageClass(desc.input_type), rng, f).SerializeToString()


def _send(channel: grpc.Channel, method: str, data: bytes, metadata=()) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return grpc_code(lambda: call(data, timeout=30, metadata=metadata))


def _fuzz(address: str, calls: list[tuple[str, bytes]], metadata=()) -> Counter:
    """Send every call from 16 threads at once; the status codes, and any forbidden one's call."""
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda c: _send(channel, *c, metadata=metadata), calls))
    bad = [(m, d[:120], code) for (m, d), code in zip(calls, codes, strict=True) if code in FORBIDDEN]
    assert not bad, f"{len(bad)} calls got INTERNAL, UNKNOWN or UNAVAILABLE, e.g. {bad[:5]}"
    return Counter(codes)


def test_hostile_requests_get_deliberate_statuses_and_few_log_lines(open_server, fuzzed, caplog):
    caplog.set_level(logging.INFO)
    calls = list(_fuzz_calls(seed=0, n=1500, f=fuzzed))
    start = time.monotonic()
    codes = _fuzz(open_server.address, calls)
    elapsed = time.monotonic() - start
    # It reached the handlers: past the name checks to the store, and all the way to answers.
    assert codes[Code.INVALID_ARGUMENT] > len(calls) // 3 and codes[Code.NOT_FOUND] > 0 and codes[Code.OK] > 0, codes
    _good_call(open_server.address)
    records = _server_log(caplog)
    _no_errors_logged(caplog)
    # The rate limit: 10 lines a second, plus one for a window that had just begun.
    assert len(records) <= 10 * (math.ceil(elapsed) + 1), (len(records), elapsed)


def test_ten_thousand_character_ids_never_reach_the_store(open_server, monkeypatch):
    import vitscope.analyzer.server as server

    asked = []
    real_record, real_open = server.load_record, ActivationSet.open
    monkeypatch.setattr(server, "load_record", lambda store, sae_id: asked.append(sae_id) or real_record(store, sae_id))
    monkeypatch.setattr(ActivationSet, "open", classmethod(
        lambda cls, store, set_id: asked.append(set_id) or real_open(store, set_id)))
    long = "x" * 10_000
    requests = [pb.GetSaeRequest(name=names.sae(long)), pb.ListLatentsRequest(parent=names.sae("x" * 4000)),
                pb.GetLatentRequest(name=names.latent("a" * 300, 0)),
                pb.GetImageRequest(name=names.image("\u00e9" * 200, 0)),
                pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image=names.image("b" * 129, 0))),
                pb.GetHeatmapRequest(latent=names.latent(SAE_ID, "9" * 4000)),
                pb.SearchLatentsRequest(sae=names.sae(long), positives=[_example(names.image(long, 0))])]
    with grpc.insecure_channel(open_server.address) as channel:
        stub = rpc.AnalyzerStub(channel)
        for request in requests:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, type(request).__name__.removesuffix("Request"))(request, timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT
            assert len(err.value.details()) < 300  # the id is not echoed back whole
    assert all(len(i) <= 128 for i in asked), [i[:20] for i in asked]


def test_the_store_refuses_an_id_the_server_let_through(open_server, monkeypatch):
    """Were the name grammar to let any id through, the store's own key checks still stop long
    ids and paths."""
    import vitscope.analyzer.server as server

    assert "sae" in names._PATTERNS
    monkeypatch.setitem(names._PATTERNS, "sae", re.compile(r"saes/(.+)", re.DOTALL))
    monkeypatch.setattr(server, "MAX_STRING_LENGTH", 10**6)
    assert names.parse_sae("saes/../../x") == "../../x"  # the grammar is out of the way
    with grpc.insecure_channel(open_server.address) as channel:
        for sae_id in ("x" * 10_000, "../../x", "/etc", "a//b", "."):
            request = pb.GetSaeRequest(name=names.sae(sae_id))
            assert grpc_code(lambda r=request: rpc.AnalyzerStub(channel).GetSae(r, timeout=10)) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(("low", "high"), [(math.nan, 0.0), (0.0, math.inf), (-math.inf, 0.5), (0.0, 1.5)])
def test_non_finite_or_impossible_frequencies_are_invalid(open_server, low, high):
    with grpc.insecure_channel(open_server.address) as channel:
        request = pb.ListLatentsRequest(parent=SAE, min_frequency=low, max_frequency=high)
        assert grpc_code(lambda: rpc.AnalyzerStub(channel).ListLatents(request, timeout=10)) == Code.INVALID_ARGUMENT


def test_bad_tokens_are_unauthenticated_and_the_right_one_still_works(token_server, fuzzed, caplog):
    caplog.set_level(logging.INFO)
    rng = random.Random(1)
    wrong = [(), (("authorization", "Bearer"),), (("authorization", "Bearer wrong"),),
             (("authorization", f"bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN} "),),
             (("authorization", TOKEN),), (("authorization", "Bearer " + "x" * 4000),),
             (("authorization", f"Basic {TOKEN}"),), (("x-authorization", f"Bearer {TOKEN}"),)]
    calls = list(_fuzz_calls(seed=2, n=300, f=fuzzed))
    tokens = [rng.choice(wrong) for _ in calls]
    with grpc.insecure_channel(token_server.address) as channel, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda c, metadata: _send(channel, *c, metadata=metadata), calls, tokens))
    health = [c for (m, _), c in zip(calls, codes, strict=True) if "Health" in m]
    assert {c for (m, _), c in zip(calls, codes, strict=True) if "Health" not in m} == {Code.UNAUTHENTICATED}
    assert FORBIDDEN.isdisjoint(health)  # exempt from auth, and garbage there is still not INTERNAL
    # With the right token, the same hostile calls get past auth and are judged on their content.
    right = (("authorization", f"Bearer {TOKEN}"),)
    assert _fuzz(token_server.address, calls, metadata=right)[Code.INVALID_ARGUMENT] > 0
    _good_call(token_server.address, metadata=right)
    _no_errors_logged(caplog)


# --- limits ---------------------------------------------------------------------------------------
def test_oversized_request_is_resource_exhausted(open_server):
    with grpc.insecure_channel(open_server.address) as channel:
        assert _send(channel, METHODS[0], b"\x0a" + b"\xff" * (2 << 20)) == Code.RESOURCE_EXHAUSTED
    _good_call(open_server.address)


def test_calls_beyond_the_queue_are_refused_at_once(store_uri, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = AnalyzerService._sae_message

    def slow(self, *args):
        entered.set()
        release.wait(10)
        return real(self, *args)

    monkeypatch.setattr(AnalyzerService, "_sae_message", slow)
    running = serve(ServeConfig(store=store_uri, port=0, workers=1, max_queued_calls=0))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.AnalyzerStub(channel)
            busy = stub.GetSae.future(pb.GetSaeRequest(name=SAE), timeout=20)
            assert entered.wait(10)
            assert grpc_code(lambda: stub.GetSae(pb.GetSaeRequest(name=SAE), timeout=10)) == Code.RESOURCE_EXHAUSTED
            release.set()
            assert busy.result().name == SAE
    finally:
        release.set()
        running.stop(grace=None)


def test_uploads_encoded_at_once_each_get_their_own_codes(store_uri):
    """Uploads share one ViT, LIVE_ENCODES of them at a time: each must still be answered, with the
    codes its image gets when it is encoded alone."""
    uploads = [_png(32, 32, seed) for seed in range(100, 260)]  # new to every cache

    def latents(reply: pb.EncodedImage) -> list[tuple[int, float]]:
        return [(a.latent_index, a.activation) for p in reply.patches for a in p.latents]

    alone, together = (serve(ServeConfig(store=store_uri, port=0, workers=w)) for w in (1, 8))
    try:
        with grpc.insecure_channel(alone.address) as a, grpc.insecure_channel(together.address) as b:
            def encode(stub: rpc.AnalyzerStub, png: bytes) -> pb.EncodedImage | grpc.StatusCode:
                request = pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image_data=png))
                try:
                    return stub.EncodeImage(request, timeout=60)
                except grpc.RpcError as e:
                    return e.code()

            expected = [latents(encode(rpc.AnalyzerStub(a), png)) for png in uploads]
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda png: encode(rpc.AnalyzerStub(b), png), uploads))
    finally:
        alone.stop(grace=None)
        together.stop(grace=None)
    failed = Counter(r.name for r in replies if isinstance(r, grpc.StatusCode))
    assert not failed, f"{sum(failed.values())} of {len(uploads)} uploads failed: {dict(failed)}"
    for got, want in zip(map(latents, replies), expected, strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4, abs=1e-5)


# --- deadlines ------------------------------------------------------------------------------------
def test_tiny_deadline_is_deadline_exceeded(open_server):
    with grpc.insecure_channel(open_server.address) as channel:
        request = pb.GetLatentRequest(name=names.latent(SAE_ID, D_SAE - 1), heatmaps=True)
        start = time.monotonic()
        assert grpc_code(lambda: rpc.AnalyzerStub(channel).GetLatent(request, timeout=1e-6)) == Code.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
    _good_call(open_server.address)


class _Expired:
    """A call context whose deadline has passed."""

    def time_remaining(self) -> float:
        return 0.0

    def is_active(self) -> bool:
        return True

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


def test_server_stops_work_once_the_deadline_passed(store_uri, monkeypatch):
    import vitscope.analyzer.server as server

    loads = []
    monkeypatch.setattr(server, "load_record", lambda *a: loads.append(a))
    service = AnalyzerService(open_store(store_uri))
    with pytest.raises(_Aborted) as err:
        service.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, 0), heatmaps=True), _Expired())
    assert err.value.code == Code.DEADLINE_EXCEEDED and not loads


# --- where the server may listen ------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.7", "analyzer.example.org", ""])
def test_public_interface_without_a_token_refuses_to_start(store_uri, quiet_env, host):
    with pytest.raises(InsecureBindError, match="--insecure"):
        serve(ServeConfig(store=store_uri, host=host, port=0))


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.4.5", True), ("localhost", True),
                                                ("::1", True), ("[::1]", True), ("0.0.0.0", False),
                                                ("::ffff:127.0.0.1", False), ("10.0.0.1", False)])
def test_loopback_hosts(host, loopback):
    assert _loopback(host) is loopback


@pytest.mark.parametrize("how", ["token", "env", "insecure", "loopback"])
def test_public_interface_starts_with_a_token_or_insecure(store_uri, quiet_env, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("VITSCOPE_TOKEN", TOKEN)
    cfg = ServeConfig(store=store_uri, host="127.0.0.1" if how == "loopback" else "0.0.0.0", port=0,
                      token=TOKEN if how == "token" else None, insecure=how == "insecure")
    running = serve(cfg)
    try:
        metadata = () if how in ("insecure", "loopback") else (("authorization", f"Bearer {TOKEN}"),)
        _good_call(f"127.0.0.1:{running.port}", metadata)
    finally:
        running.stop(grace=None)


def test_cli_prints_the_refusal_and_takes_insecure(store_uri, quiet_env, capsys):
    assert main(["serve", "--store", store_uri, "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "vitscope serve: error: refusing to serve on 0.0.0.0 without a bearer token" in err
    assert "Traceback" not in err
    assert parse("serve", ["--host", "0.0.0.0", "--insecure"]).insecure
