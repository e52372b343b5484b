"""Everything the tests share, in one module: fixtures, helpers and the hooks that turn the
fixtures' needs into markers.

Layout: ``tests/conftest.py`` only loads this module as a plugin (``pytest_plugins``), so its
fixtures and hooks apply to every test; the helpers (plain functions and constants) are
imported from here by name (``from support import pipeline_config``). No test module imports
another test module, and nothing here is star-imported.

Markers come from fixtures. A test that needs a real S3 server (``s3_env`` or anything built
on it) is marked ``s3``, one that needs Chromium (``chromium``) is marked ``browser``, one that
needs a CUDA GPU (``cuda``) is marked ``gpu``; nobody marks them by hand, so
``pytest -m "not s3 and not browser"`` runs everything else on a bare machine. (Collection only
sees the fixtures a test names: a fixture that asks for ``s3_store`` at run time, through
``request.getfixturevalue``, marks that param itself, as test_store.py's ``store`` does.)

Missing tools: without radosgw or Chromium those tests skip, naming the script that installs
them (:data:`INSTALL_SCRIPT`). With ``VITSCOPE_REQUIRE_ALL=1`` (set by ``.ci/run``) they fail
instead, and any skipped test fails the session, except ``gpu`` tests: CI has no GPU."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

# Tests never reach the network for model weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect reads its settings on import: point it at a throwaway home first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="vitscope-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from vitscope.synthetic import PlantedImage  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = "deploy/install-system-deps.sh"
REQUIRE_ALL = "VITSCOPE_REQUIRE_ALL"
"""Environment variable: when set (to anything but "" or "0"), tests whose tools are missing fail
instead of skipping, and any skip (but a ``gpu`` test's) fails the session."""

MARKER_OF_FIXTURE = {"s3_env": "s3", "chromium": "browser", "cuda": "gpu"}
"""The marker each fixture gives to every test that needs it, directly or through other fixtures."""
OPTIONAL_MARKERS = ("gpu",)
"""Markers whose tests may skip even under :data:`REQUIRE_ALL` (CI has no such hardware)."""


def require_all() -> bool:
    """Whether this run makes every test mandatory (see :data:`REQUIRE_ALL`)."""
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


def missing_tool(what: str) -> NoReturn:
    """Skip the test for want of a system tool, or fail it when the run makes it mandatory."""
    message = f"{what}: run {INSTALL_SCRIPT} to install it"
    if require_all():
        pytest.fail(f"{message} ({REQUIRE_ALL} is set, so this test may not skip)", pytrace=False)
    pytest.skip(message)


# --- markers from fixtures, skips that fail CI ----------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        for fixture, marker in MARKER_OF_FIXTURE.items():
            if fixture in needs:
                item.add_marker(marker)


class _NoSkips:
    """Under :data:`REQUIRE_ALL`: collects every skip (but those of optional markers) and fails
    the session if there was any, since a skipped test in CI is a test that never ran."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        if any(m in report.keywords for m in OPTIONAL_MARKERS):
            return
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        self.skipped.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.skipped:
            terminalreporter.section(f"skipped tests fail this run ({REQUIRE_ALL} is set)", sep="=", red=True)
            for nodeid, reason in self.skipped:
                terminalreporter.line(f"SKIPPED {nodeid}: {reason}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    if require_all():
        config.pluginmanager.register(_NoSkips(), "vitscope-no-skips")


# --- S3 (radosgw) ---------------------------------------------------------------------------------
# A real S3 server: deploy/radosgw.sh starts Ceph radosgw on loopback once per session (or the
# tests use the one that AWS_ENDPOINT_URL already points at).

RADOSGW_SH = REPO / "deploy" / "radosgw.sh"
_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status counts)."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory):
    """AWS_* settings of a running S3 server, also set in ``os.environ`` for the session."""
    existing = os.environ.get("AWS_ENDPOINT_URL")
    if existing and os.environ.get("AWS_ACCESS_KEY_ID") and _answers(existing):
        yield {k: os.environ[k] for k in _AWS_VARS if k in os.environ}
        return

    missing = [b for b in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin") if not shutil.which(b)]
    if missing:
        missing_tool(f"needs Ceph radosgw for a real S3 server, but {', '.join(missing)} not found (or point "
                     "AWS_ENDPOINT_URL and AWS_* credentials at a running S3 server)")
    state = tmp_path_factory.mktemp("radosgw")
    run_env = {**os.environ, "RGW_PORT": str(free_port())}
    proc = subprocess.run(
        ["bash", str(RADOSGW_SH), "start", str(state)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:  # installed but broken: a failure even on a newcomer's machine
        subprocess.run(["bash", str(RADOSGW_SH), "stop", str(state)], capture_output=True)
        pytest.fail(f"deploy/radosgw.sh start failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    settings = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            settings[name] = value
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["bash", str(RADOSGW_SH), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture
def s3_store(s3_env):
    """A fresh :class:`vitscope.s3.S3Store` on its own bucket, removed after the test."""
    from vitscope.s3 import S3Store

    store = S3Store(bucket=f"vitscope-test-{uuid.uuid4().hex[:12]}", prefix="root")
    store.ensure_bucket()
    yield store
    try:
        S3Store(bucket=store.bucket).delete_prefix("")  # also objects a test put outside prefix
        store._client.delete_bucket(Bucket=store.bucket)
    except Exception:  # the server forgets everything at session end anyway
        pass


# --- Chromium, CUDA ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium executable that Playwright drives (the Debian package's)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing_tool("needs Chromium for the browser tests, but no chromium on PATH")
    return path


@pytest.fixture
def cuda():
    """The CUDA device; skips without one, also in CI (see :data:`OPTIONAL_MARKERS`)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda")


# --- extraction helpers -------------------------------------------------------------------------


def extract_config(data: Path, store: Path, model: str, **kw):
    """A small, fast :class:`~vitscope.extractor.ExtractConfig`: two layers, 7 images per
    shard (so sets have several shards and a short last one), in-process, no progress bar."""
    from vitscope.extractor import ExtractConfig

    base = dict(data=str(data), store=str(store), model=model, pretrained=None, layers=(0, -1),
                images_per_shard=7, workers=0, batch_size=5, progress=False)
    return ExtractConfig(**(base | kw))


def set_bytes(store: Path, set_id: str) -> dict[str, bytes]:
    """Every file of a set published in the local store at ``store``, by path."""
    from vitscope.shards import set_prefix

    root = store / set_prefix(set_id)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the pipeline, run once per session -----------------------------------------------------------
# A tiny random open_clip ViT saved to a local folder and loaded back through open_clip's own
# loading path, a planted-concept image set, and the Prefect flow on a temporary Prefect server.

TINY_IMAGE = 112  # tiny model input: 7 x 7 patches of 16 px
TINY_SQUARE = 32


@dataclass
class PipelineRun:
    store_uri: str
    set_id: str
    sae_id: str
    analysis_id: str
    data_root: Path
    model_name: str
    items: list[PlantedImage]
    skipped: list[str]


def tiny_model(folder: Path, seed: int = 0) -> str:
    """Save a randomly initialised tiny CLIP as a hub-style folder; returns its model name."""
    import open_clip
    import torch

    from vitscope.models import save_open_clip_dir, tiny_open_clip_config

    torch.manual_seed(seed)
    cfg = tiny_open_clip_config(image_size=TINY_IMAGE)
    return save_open_clip_dir(open_clip.CLIP(**cfg), cfg, folder)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the session (starting one takes ~15-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def planted_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PlantedImage]]:
    from vitscope.synthetic import make_planted_dataset

    root = tmp_path_factory.mktemp("planted") / "images"
    return root, make_planted_dataset(root, n_images=96, size=TINY_IMAGE, square=TINY_SQUARE, seed=1)


def pipeline_config(store: str, data: Path, model: str, train: dict | None = None):
    """The test pipeline on the tiny model; ``train`` overrides training settings, in the flat
    form of `vitscope train` (e.g. ``{"l1_coeff": 4.0}``)."""
    from vitscope.composition.pipeline import AnalyzeStage, ExtractStage, PipelineConfig, TrainStage
    from vitscope.trainer import train_config

    return PipelineConfig(
        data=str(data), store=store,
        extract=ExtractStage(model=model, pretrained=None, layers=(-1,), workers=0, images_per_shard=16,
                             progress=False),
        train=train_config({"expansion": 8, "l1_coeff": 3.0, "lr": 1e-3, "batch_size": 1024, "n_tokens": 300_000,
                            "progress": False, **(train or {})}, TrainStage),
        analyze=AnalyzeStage(top_images=8, progress=False),
    )


@pytest.fixture(scope="session")
def pipeline(prefect_server, tiny_model_name, planted_data, tmp_path_factory) -> PipelineRun:
    """The whole pipeline, run once through the Prefect flow into a local store."""
    from vitscope.composition.flows import pipeline_flow

    data_root, items = planted_data
    store = str(tmp_path_factory.mktemp("store"))
    result = pipeline_flow(pipeline_config(store, data_root, tiny_model_name))
    return PipelineRun(store, result.set_id, result.sae_id, result.analysis_id, data_root, tiny_model_name,
                       items, result.skipped)


@pytest.fixture(scope="session")
def analyzer_server(pipeline):
    """A real analyzer gRPC server on a free loopback port over the pipeline's store;
    yields its target ("127.0.0.1:PORT")."""
    from vitscope.analyzer import ServeConfig, serve

    server = serve(ServeConfig(store=pipeline.store_uri, port=0))
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=None)


def grpc_code(call) -> object:
    """The status code a gRPC call ends with (``grpc.StatusCode.OK`` when it returns)."""
    import grpc

    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
