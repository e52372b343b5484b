"""Errors say what happened and carry their retry policy in their type: a transient store fault
(throttling, 5xx, a dropped connection, an I/O error) is retried by the flows, through whatever
wrapper a stage puts around it; a missing id, a denied request or a changed file fails at once.

The faults are real where a store meets them: an I/O error is the kernel's (reading unmapped
memory through ``/proc/self/mem`` fails with EIO), a denied write is the filesystem's, a refused
connection is a port nobody listens on, credentials are checked by radosgw, and S3 error answers
are parsed by boto3 itself."""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vitscope.shards import ActivationSet, set_prefix
from vitscope.store import (
    AccessDenied,
    LocalStore,
    NotFound,
    OutOfSpace,
    StoreError,
    TransientStoreError,
    is_transient,
)

TYPO = "0123456789abcdef-no-such-set"
# The flows' retry delays are 5 s then 30 s: a run that fails faster than the first one was not retried.
NO_RETRY_BOUND_S = 5.0


# --- a real I/O error ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eio_file() -> Path:
    """A path whose reads fail with EIO from the kernel (low addresses of this process's memory
    are never mapped, and reading them through /proc/self/mem says so with EIO)."""
    path = Path("/proc/self/mem")
    try:
        with open(path, "rb") as f:
            f.read(16)
    except OSError as e:
        if e.errno == 5:
            return path
        pytest.skip(f"reading {path} fails with {e!r}, not EIO")
    pytest.skip(f"{path} does not give an I/O error here (Linux procfs needed)")


def _link(store: LocalStore, key: str, target: Path) -> None:
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


# --- LocalStore --------------------------------------------------------------------------------------


def test_local_io_error_is_transient_and_names_the_object(tmp_path, eio_file):
    store = LocalStore(tmp_path / "store")
    _link(store, "flaky/obj", eio_file)
    for call in (lambda: store.get_bytes("flaky/obj"), lambda: store.get_range("flaky/obj", 0, 8),
                 lambda: store.get_file("flaky/obj", tmp_path / "copy")):
        with pytest.raises(TransientStoreError, match=f"{store.uri}/flaky/obj: Input/output error") as info:
            call()
        assert is_transient(info.value)


def test_local_missing_object_is_not_transient(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(NotFound, match=f"{store.uri}/gone") as info:
        store.get_bytes("gone")
    assert not is_transient(info.value)


def test_local_denied_write_fails_at_once_naming_the_object(tmp_path):
    if os.geteuid() != 0:
        root = tmp_path / "read-only"
        root.mkdir()
        root.chmod(0o555)
    else:  # root may write anywhere DAC allows; sysfs refuses new files to everyone
        root = Path("/sys/kernel")
        if not root.is_dir():
            pytest.skip("running as root without /sys/kernel: no folder refuses a write")
    store = LocalStore(root)
    try:
        with pytest.raises(AccessDenied, match=f"{store.uri}/vitscope-probe") as info:
            store.put_bytes("vitscope-probe", b"x")
    finally:
        if os.geteuid() != 0:
            root.chmod(0o755)
    assert not is_transient(info.value)


def test_unclassified_os_errors_stay_os_errors(tmp_path):
    store = LocalStore(tmp_path / "store")
    (store.root / "dir").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):  # a bug in the caller, not a store condition
        store.get_bytes("dir")


# --- the retry policy follows the chain of causes ------------------------------------------------------


def _raised(make):
    try:
        make()
    except Exception as e:
        return e
    raise AssertionError("nothing raised")


def test_is_transient_sees_through_wrappers_and_only_there():
    from vitscope.trainer import TrainingError
    from vitscope.trainer.stream import StreamError

    def wrapped(inner: Exception):
        def make():
            try:
                try:
                    raise inner
                except StoreError as e:
                    raise StreamError(f"cannot read: {e}") from e
            except StreamError as e:
                raise TrainingError(str(e)) from e
        return _raised(make)

    assert is_transient(wrapped(TransientStoreError("s3://b/k: SlowDown")))
    for permanent in (NotFound("s3://b/k"), AccessDenied("denied"), OutOfSpace("full"), StoreError("bad range")):
        assert not is_transient(wrapped(permanent)), permanent

    def gone_on_retry():  # a permanent error raised while handling a transient one decides
        try:
            raise TransientStoreError("timeout")
        except TransientStoreError:
            raise NotFound("file:///s/k") from None

    assert not is_transient(_raised(gone_on_retry))

    def implicit():  # a wrapper without `from` still chains the transient cause as its context
        try:
            raise TransientStoreError("timeout")
        except TransientStoreError:
            raise RuntimeError("read failed")  # noqa: B904 (an implicit chain is the case under test)

    assert is_transient(_raised(implicit))
    assert not is_transient(ValueError("no layer 99"))


# --- the training stream keeps the distinction ---------------------------------------------------------


class _RangedReads(LocalStore):
    """The same folder read the way the stream reads S3: ranged reads, no local file to map."""

    def local_path(self, key: str) -> Path | None:
        return None


@pytest.fixture
def small_set(tmp_path):
    from vitscope.groundtruth import GroundTruth, write_ground_truth_set

    store = LocalStore(tmp_path / "set")
    m = write_ground_truth_set(store, GroundTruth(d_model=8, n_directions=8, active=2, n_images=24, grid=(2, 2),
                                                  images_per_shard=12))
    aset = ActivationSet.open(store, m.set_id)
    return store, aset


def _first_batch_error(aset: ActivationSet) -> Exception:
    from vitscope.trainer.stream import StreamError, TokenStream

    stream = TokenStream(aset, aset.manifest.layers[0], aset.layout.token_indices(["all"]), batch_size=8,
                         buffer_tokens=32, chunk_tokens=10)
    with pytest.raises(StreamError) as info:
        for _ in stream:
            pass
    return info.value


def test_a_transient_read_fault_stays_transient_through_the_stream(small_set, eio_file):
    store, aset = small_set
    shard = aset.manifest.shards[0]
    _link(store, aset.layer_key(shard, aset.manifest.layers[0]), eio_file)
    err = _first_batch_error(ActivationSet(_RangedReads(store.root), aset.manifest))
    assert "Input/output error" in str(err) and aset.manifest.set_id in str(err)
    assert is_transient(err)


def test_a_changed_or_removed_file_is_not_retried_through_the_stream(small_set, eio_file):
    store, aset = small_set
    shard = aset.manifest.shards[0]
    key = aset.layer_key(shard, aset.manifest.layers[0])
    _link(store, key, eio_file)  # the local fast path sees a file of the wrong size first
    err = _first_batch_error(aset)
    assert "holds 0 bytes" in str(err) and not is_transient(err)
    (store.root / key).unlink()
    err = _first_batch_error(aset)
    assert key in str(err) and not is_transient(err)


# --- S3 --------------------------------------------------------------------------------------------------


def test_s3_wrong_secret_is_denied_at_once(s3_store, monkeypatch):
    from vitscope.s3 import S3Store

    s3_store.put_bytes("k", b"v")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = S3Store(s3_store.bucket, s3_store.prefix)
    t0 = time.monotonic()
    for call in (lambda: bad.get_bytes("k"), lambda: bad.size("k"), lambda: bad.get_range("k", 0, 1),
                 lambda: bad.put_bytes("k", b"x"), bad.list):
        with pytest.raises(AccessDenied, match="denied") as info:
            call()
        assert s3_store.bucket in str(info.value) and not is_transient(info.value)
    assert "s3://" in str(_raised(lambda: bad.get_bytes("k")))  # names the object asked for
    assert time.monotonic() - t0 < 10


def test_s3_unknown_access_key_is_denied(s3_store, monkeypatch):
    from vitscope.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(AccessDenied, match=f"s3://{s3_store.bucket}/k .*InvalidAccessKeyId"):
        S3Store(s3_store.bucket).get_bytes("k")


def test_s3_missing_object_is_not_found(s3_store):
    for call in (lambda: s3_store.get_bytes("nope"), lambda: s3_store.size("nope")):
        with pytest.raises(NotFound, match=f"{s3_store.uri}/nope") as info:
            call()
        assert not is_transient(info.value)


def test_s3_endpoint_not_listening_is_transient(monkeypatch):
    from vitscope.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    store = S3Store("somebucket", endpoint_url=url, max_attempts=1)
    for call in (lambda: store.get_bytes("k"), lambda: store.size("k"), store.list):
        with pytest.raises(TransientStoreError, match=f"cannot use S3 endpoint {url} for .*somebucket") as info:
            call()
        assert is_transient(info.value)


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and, but for HEAD, an S3 error body."""

    protocol_version = "HTTP/1.1"  # so that a PUT's `Expect: 100-continue` is answered at once

    def _answer(self, body: bool) -> None:
        status, code = self.server.answer  # type: ignore[attr-defined]
        xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
               f"<Message>{code} from the test server</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(xml)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_PUT(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(body=True)

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def s3_answering(monkeypatch):
    """An HTTP endpoint that answers like an overloaded or refusing S3 server; set ``.answer``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status,code,kind", [
    (503, "SlowDown", TransientStoreError),
    (503, "ServiceUnavailable", TransientStoreError),
    (500, "InternalError", TransientStoreError),
    (400, "RequestLimitExceeded", TransientStoreError),
    (400, "Throttling", TransientStoreError),
    (502, "BadGateway", TransientStoreError),
    (403, "AccessDenied", AccessDenied),
    (403, "SignatureDoesNotMatch", AccessDenied),
    (400, "InvalidArgument", StoreError),
])
def test_s3_answers_are_classified(s3_answering, status, code, kind):
    from vitscope.s3 import S3Store

    s3_answering.answer = (status, code)
    store = S3Store("b", "p", endpoint_url=f"http://127.0.0.1:{s3_answering.server_port}", max_attempts=1)
    calls = {"get": lambda: store.get_bytes("k"), "put": lambda: store.put_bytes("k", b"x")}
    if status != 400:  # a HEAD answer has no body: its status is all there is to classify
        calls["head"] = lambda: store.size("k")
    for name, call in calls.items():
        err = _raised(call)
        assert type(err) is kind, (name, err)
        assert is_transient(err) == (kind is TransientStoreError)
        assert "s3://b/p/k" in str(err), err


# --- under Prefect ------------------------------------------------------------------------------------


def _task_runs(flow_state):
    """(task run, its state names) of a finished flow run, once the server has recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            for _ in range(100):
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
                if runs and all(r.state is not None and r.state.is_final() for r in runs):
                    return [(r, [s.name for s in await client.read_task_run_states(r.id)]) for r in runs]
                await asyncio.sleep(0.1)
            raise AssertionError(f"task runs of flow run {flow_state.state_details.flow_run_id} never finished")

    return asyncio.run(read())


@pytest.fixture
def warm_prefect(prefect_server):
    """A Prefect client that has run a flow: the first run of a session also starts the client's
    services, seconds that are no part of what a timing here measures."""
    from prefect import flow

    flow(name="vitscope-test-warm-up")(lambda: None)()


def test_a_mistyped_activation_set_fails_at_once_under_prefect(warm_prefect, tmp_path):
    from vitscope.composition.flows import sweep_flow
    from vitscope.trainer import SweepConfig

    store = LocalStore(tmp_path / "store")
    t0 = time.monotonic()
    state = sweep_flow(SweepConfig(activations=TYPO, store=store.uri), return_state=True)
    elapsed = time.monotonic() - t0
    assert state.is_failed()
    with pytest.raises(NotFound) as info:
        state.result()
    assert str(info.value) == f"no published activation set {TYPO!r} in {store.uri}"
    assert elapsed < NO_RETRY_BOUND_S, f"took {elapsed:.1f} s: retried?"
    [(run, states)] = _task_runs(state)
    assert run.run_count == 1 and not {"AwaitingRetry", "Retrying"} & set(states), states


def test_the_cli_names_a_mistyped_activation_set_and_fails_at_once(warm_prefect, tmp_path, capsys):
    from vitscope.composition.cli import main

    store = LocalStore(tmp_path / "store")
    t0 = time.monotonic()
    assert main(["sweep", "--activations", TYPO, "--store", str(store.root)]) == 2
    assert time.monotonic() - t0 < NO_RETRY_BOUND_S
    said = f"no published activation set {TYPO!r} in {store.uri}"
    assert capsys.readouterr().err.strip() == f"vitscope sweep: error: {said}"
    with pytest.raises(NotFound) as info:  # --debug: the error itself, with its traceback
        main(["sweep", "--activations", TYPO, "--store", str(store.root), "--debug"])
    assert str(info.value) == said


def test_a_transient_fault_is_retried_by_the_flow_task(prefect_server, tmp_path, eio_file):
    from prefect import flow

    from vitscope.composition.flows import sweep_task
    from vitscope.trainer import SweepConfig, sweep_configs

    store = LocalStore(tmp_path / "store")
    _link(store, f"{set_prefix(TYPO)}/manifest.json", eio_file)  # the disk fails reading the manifest
    cfgs = sweep_configs(SweepConfig(activations=TYPO, store=store.uri))

    @flow(name="vitscope-test-transient")
    def retried():
        return sweep_task.with_options(retry_delay_seconds=0)(cfgs)  # the real task and retry condition

    state = retried(return_state=True)
    with pytest.raises(TransientStoreError, match=f"{store.uri}/{set_prefix(TYPO)}/manifest.json"):
        state.result()
    [(run, states)] = _task_runs(state)
    assert run.run_count == 3 and states.count("Retrying") == 2, states
