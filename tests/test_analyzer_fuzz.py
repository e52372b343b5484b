"""The analyzer server under hostile input, as an attacker would try it: a seeded fuzz over every
RPC in the contract (hostile strings, extreme integers, NaN and infinities, random bytes on the
wire, bad tokens), message-size and concurrency limits, deadlines, and the guard against
listening beyond loopback without a token.

Every call must get a deliberate status (never INTERNAL or UNKNOWN), the server must keep
answering good calls, and rejected calls must cost a bounded number of log lines, none of them
a traceback."""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from support import grpc_code

from vitscope.analyzer import AnalyzeConfig, InsecureBindError, ServeConfig, analyze, serve
from vitscope.analyzer.server import AnalyzerService, _loopback
from vitscope.composition.cli import main, parse
from vitscope.extractor import ExtractConfig, extract
from vitscope.proto import pb, rpc
from vitscope.sae import SaeConfig, SaeRecord, build_sae, fit_normalizer, save_sae
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import open_store
from vitscope.synthetic import make_planted_dataset

SAE_ID = "fuzz-relu"
D_SAE = 32
TOKEN = "fuzz-token"
SERVICE = pb.DESCRIPTOR.services_by_name["Analyzer"]
METHODS = [f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods] + ["/grpc.health.v1.Health/Check"]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
"""What no call may get: a handler's crash, or a server that stopped answering."""
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory, tiny_model_name: str) -> str:
    """A small store: 12 planted images, one analysed SAE."""
    root = tmp_path_factory.mktemp("fuzz") / "images"
    make_planted_dataset(root, n_images=12, size=112, square=32, seed=5)
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
    return uri


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
        assert rpc.AnalyzerStub(channel).GetSae(pb.GetSaeRequest(sae_id=SAE_ID), timeout=10,
                                                metadata=metadata).sae_id == SAE_ID


# --- hostile values ------------------------------------------------------------------------------
def _token(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


HOSTILE_STRINGS = [
    "", " ", "x" * 10_000, "a" * 129, "a" * 128, "a" * 241, "../../../../etc/passwd", "saes/../../x", "/abs",
    "a/b", "\x00", "fuzz-relu\x00.json", "\u00e9" * 300, "\U0001f600", "\u202etxt.exe", "%s%n%x", "{0}{1}",
    "'; DROP TABLE saes; --", "<img src=x onerror=alert(1)>", "-rf", ".", "..", "CON", "NUL", "\r\n", "..\\..\\x",
    "A" * 5000, SAE_ID + "/", " " + SAE_ID, SAE_ID.upper(),
    # page tokens: forged offsets and shapes, a nesting bomb, not base64 at all
    _token({"offset": 10**30, "query": "x"}), _token({"offset": -1, "query": "x"}), _token({"offset": 1.5}),
    _token([[[[[[[[]]]]]]]]), _token("offset"), _token(None), "[" * 400, "====", "\u00ff\u00fe",
]
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1.0, 2.0, 0.5, 1e-9]


def _string(rng: random.Random, field: FieldDescriptor) -> str:
    if field.name.endswith("sae_id") and rng.random() < 0.4:
        return SAE_ID  # valid, so that the other fields get past the lookup
    if rng.random() < 0.6:
        return rng.choice(HOSTILE_STRINGS)
    chars = (chr(c) for c in (rng.randint(1, 0x10FFFF) for _ in range(rng.randint(1, 300))))
    return "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)  # protobuf refuses surrogates


def _int(rng: random.Random, low: int, high: int) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.randint(max(low, 0), min(high, 5))  # valid indices and counts, mostly
    if pick < 0.7:
        return rng.choice([low, high, -1, 0, 1, low + 1, high - 1, D_SAE, D_SAE - 1])
    return rng.randint(low, high)


def _value(rng: random.Random, field: FieldDescriptor, depth: int) -> Any:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        return _hostile(GetMessageClass(field.message_type), rng, depth + 1)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return rng.randbytes(rng.choice([0, 1, 16, 4096]))
        return _string(rng, field)
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return rng.choice(FLOATS)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _int(rng, -(2**31), 2**31 - 1)  # proto3 enums are open: any int32 arrives
    return _int(rng, *INT_RANGES[cpp])


def _hostile(cls: type, rng: random.Random, depth: int = 0) -> Any:
    """A ``cls`` message with a random subset of its fields set to hostile (or now and then valid) values."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3 or (depth > 2 and field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE):
            continue
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(rng.randint(1, 3)):
                k = _value(rng, key, depth)
                if value.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    target[k].CopyFrom(_value(rng, value, depth))
                else:
                    target[k] = _value(rng, value, depth)
        elif field.is_repeated:
            values = [_value(rng, field, depth) for _ in range(rng.randint(1, 3))]
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.extend(values)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            target.CopyFrom(_value(rng, field, depth))
        else:
            setattr(msg, field.name, _value(rng, field, depth))
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
        b"",                                  # an empty (default) message: valid
    ])


def _fuzz_calls(seed: int, n: int) -> Iterator[tuple[str, bytes]]:
    """(method path, request bytes): typed hostile messages for the contract's RPCs, raw bytes for all."""
    rng = random.Random(seed)
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        if rng.random() < 0.3 or "Health" in method:
            yield method, _hostile_bytes(rng)
        else:
            desc = SERVICE.methods_by_name[method.rsplit("/", 1)[1]]
            yield method, _hostile(GetMessageClass(desc.input_type), rng).SerializeToString()


def _send(channel: grpc.Channel, method: str, data: bytes, metadata=()) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return grpc_code(lambda: call(data, timeout=20, metadata=metadata))


def _fuzz(address: str, calls: list[tuple[str, bytes]], metadata=()) -> Counter:
    """Send every call from 16 threads at once; the status codes, and any forbidden one's call."""
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda c: _send(channel, *c, metadata=metadata), calls))
    bad = [(m, d[:120], code) for (m, d), code in zip(calls, codes, strict=True) if code in FORBIDDEN]
    assert not bad, f"{len(bad)} calls got INTERNAL, UNKNOWN or UNAVAILABLE, e.g. {bad[:5]}"
    return Counter(codes)


def _server_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("vitscope", "grpc"))]


# --- the fuzz -------------------------------------------------------------------------------------
def test_hostile_requests_get_deliberate_statuses_and_few_log_lines(open_server, caplog):
    caplog.set_level(logging.INFO)
    calls = list(_fuzz_calls(seed=0, n=1500))
    start = time.monotonic()
    codes = _fuzz(open_server.address, calls)
    elapsed = time.monotonic() - start
    assert codes[Code.INVALID_ARGUMENT] > len(calls) // 3 and codes[Code.OK] > 0, codes  # it reached the handlers
    _good_call(open_server.address)
    records = _server_log(caplog)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], "a rejected call logged an error"
    # The rate limit: 10 lines a second, plus one for a window that had just begun.
    assert len(records) <= 10 * (math.ceil(elapsed) + 1), (len(records), elapsed)


def test_ten_thousand_character_ids_never_reach_the_store(open_server):
    with grpc.insecure_channel(open_server.address) as channel:
        stub = rpc.AnalyzerStub(channel)
        for request in (pb.GetSaeRequest(sae_id="x" * 10_000), pb.ListLatentsRequest(sae_id="x" * 10_000),
                        pb.GetLatentRequest(sae_id="a" * 300), pb.GetImageRequest(sae_id="\u00e9" * 200)):
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, type(request).__name__.removesuffix("Request"))(request, timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT
            assert len(err.value.details()) < 300  # the id is not echoed back whole


def test_the_store_refuses_an_id_the_server_let_through(open_server, monkeypatch):
    import vitscope.analyzer.server as server

    monkeypatch.setattr(server, "MAX_ID_LENGTH", 10**6)
    monkeypatch.setattr(server, "MAX_STRING_LENGTH", 10**6)
    with grpc.insecure_channel(open_server.address) as channel:
        request = pb.GetSaeRequest(sae_id="x" * 10_000)
        assert grpc_code(lambda: rpc.AnalyzerStub(channel).GetSae(request, timeout=10)) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(("low", "high"), [(math.nan, 0.0), (0.0, math.inf), (-math.inf, 0.5), (0.0, 1.5)])
def test_non_finite_or_impossible_frequencies_are_invalid(open_server, low, high):
    with grpc.insecure_channel(open_server.address) as channel:
        request = pb.ListLatentsRequest(sae_id=SAE_ID, min_frequency=low, max_frequency=high)
        assert grpc_code(lambda: rpc.AnalyzerStub(channel).ListLatents(request, timeout=10)) == Code.INVALID_ARGUMENT


def test_bad_tokens_are_unauthenticated_and_the_right_one_still_works(token_server, caplog):
    caplog.set_level(logging.INFO)
    rng = random.Random(1)
    wrong = [(), (("authorization", "Bearer"),), (("authorization", "Bearer wrong"),),
             (("authorization", f"bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN} "),),
             (("authorization", TOKEN),), (("authorization", "Bearer " + "x" * 4000),),
             (("authorization", f"Basic {TOKEN}"),), (("x-authorization", f"Bearer {TOKEN}"),)]
    calls = list(_fuzz_calls(seed=2, n=300))
    with grpc.insecure_channel(token_server.address) as channel, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda c: _send(channel, *c, metadata=rng.choice(wrong)), calls))
    health = [c for (m, _), c in zip(calls, codes, strict=True) if "Health" in m]
    assert {c for (m, _), c in zip(calls, codes, strict=True) if "Health" not in m} == {Code.UNAUTHENTICATED}
    assert FORBIDDEN.isdisjoint(health)  # exempt from auth, and garbage there is still not INTERNAL
    # With the right token, the same hostile calls get past auth and are judged on their content.
    right = (("authorization", f"Bearer {TOKEN}"),)
    assert _fuzz(token_server.address, calls, metadata=right)[Code.INVALID_ARGUMENT] > 0
    _good_call(token_server.address, metadata=right)
    assert not [r for r in _server_log(caplog) if r.exc_info or r.levelno >= logging.ERROR]


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
            busy = stub.GetSae.future(pb.GetSaeRequest(sae_id=SAE_ID), timeout=20)
            assert entered.wait(10)
            assert grpc_code(lambda: stub.GetSae(pb.GetSaeRequest(sae_id=SAE_ID), timeout=10)) == Code.RESOURCE_EXHAUSTED
            release.set()
            assert busy.result().sae_id == SAE_ID
    finally:
        release.set()
        running.stop(grace=None)


# --- deadlines ------------------------------------------------------------------------------------
def test_tiny_deadline_is_deadline_exceeded(open_server):
    with grpc.insecure_channel(open_server.address) as channel:
        request = pb.GetLatentRequest(sae_id=SAE_ID, latent=D_SAE - 1, heatmaps=True)
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
        service.GetLatent(pb.GetLatentRequest(sae_id=SAE_ID, latent=0, heatmaps=True), _Expired())
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
