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
import sys
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


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Puts back ``sys.modules["__main__"]`` after each test. Streamlit's script runner (AppTest)
    installs the page script as ``__main__`` and leaves it there; a process started later with
    the spawn method (a Dask worker, a DataLoader worker) re-runs ``__main__``'s file, so it ran
    the explorer's app.py and died before its work began."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


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
    report_id: str | None = None


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
                       items, result.skipped, result.report_id)


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


# --- the explorer ---------------------------------------------------------------------------------
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
"""Chromium as root on a machine without a display or network, as every browser test runs it."""
SCREENSHOT_DIR = "VITSCOPE_SCREENSHOT_DIR"
"""Environment variable: a folder where the browser tests save a screenshot of every page they see."""


@pytest.fixture(scope="session")
def sweep_store(pipeline, tmp_path_factory) -> tuple[str, str]:
    """A copy of the pipeline's store plus a second SAE that is trained but not analysed, so the
    explorer's sweep has two points and its 'not analysed' path is real. Returns (store, second id)."""
    from vitscope.sae import ReluHyper
    from vitscope.trainer.training import TrainConfig, train

    store = tmp_path_factory.mktemp("explorer") / "store"
    shutil.copytree(pipeline.store_uri, store)
    second = train(TrainConfig(activations=pipeline.set_id, store=str(store), expansion=4, sae=ReluHyper(l1_coeff=1.0),
                               lr=1e-3, batch_size=1024, n_tokens=50_000, seed=1, device="cpu", progress=False))
    return str(store), second.sae_id


@pytest.fixture(scope="session")
def explorer_target(sweep_store) -> str:
    """An analyzer over :func:`sweep_store`, for the explorer to talk to ("127.0.0.1:PORT")."""
    from vitscope.analyzer import ServeConfig, serve

    server = serve(ServeConfig(store=sweep_store[0], port=0))
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=None)


@pytest.fixture(scope="session")
def explorer_client(explorer_target):
    """The explorer's own gRPC client on :func:`explorer_target`, to say what a page should show."""
    from vitscope.explorer.client import AnalyzerClient

    with AnalyzerClient(explorer_target) as c:
        yield c


@pytest.fixture(scope="session")
def explorer_sae(explorer_client, pipeline):
    """The pipeline's (analysed) SAE, as the analyzer describes it (``pb.Sae``)."""
    return explorer_client.get_sae(pipeline.sae_id)


@pytest.fixture(scope="session")
def square_latent(explorer_client, pipeline) -> int:
    """A latent whose top images carry the planted red square (the most such among the most
    frequent latents), so pages and screenshots show something meaningful."""
    page = explorer_client.list_latents(pipeline.sae_id, page_size=64)

    def squares(i: int) -> int:
        return sum(e.label == "square" for e in explorer_client.get_latent(pipeline.sae_id, i, heatmaps=False).examples)

    return max((s.index for s in page.latents), key=squares)


@pytest.fixture
def explorer_app(monkeypatch):
    """Make a Streamlit AppTest of the explorer talking to an analyzer, with URL parameters:
    ``explorer_app(target, token=None, **query)``."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from vitscope.explorer.launch import APP

    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")

    def make(target: str, token: str | None = None, **query: str) -> AppTest:
        monkeypatch.setenv("VITSCOPE_ANALYZER", target)
        if token:
            monkeypatch.setenv("VITSCOPE_TOKEN", token)
        else:
            monkeypatch.delenv("VITSCOPE_TOKEN", raising=False)
        # Caches live in the process: a port reused by a later server must not see old answers.
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params.update(query)
        return at

    return make


def no_problems(at) -> None:
    """An AppTest run showed no exception, error or warning."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert not at.warning, [w.value for w in at.warning]


def metrics(at) -> dict[str, str]:
    """An AppTest run's ``st.metric`` values by label."""
    return {m.label: m.value for m in at.metric}


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``proc`` listens on ``port`` of 127.0.0.1 (raises if it exits or takes too long)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {port} within {timeout} s")


SETTLED_JS = """() => {
    const busy = document.querySelector("[data-testid='stStatusWidget'], [data-testid='stSkeleton']");
    if (busy) { window.__vitscopeIdleSince = 0; return false; }
    if (!window.__vitscopeIdleSince) { window.__vitscopeIdleSince = Date.now(); return false; }
    return Date.now() - window.__vitscopeIdleSince > 500;
}"""
"""True once the explorer page has been idle (no run, no skeleton) for 500 ms."""


@dataclass
class ExplorerBrowser:
    """A served explorer and a headless Chromium on it: ``goto`` a path, ``shot`` a screenshot."""

    url: str
    page: object  # playwright.sync_api.Page
    shots: Path

    def goto(self, path: str):
        """Open ``path`` (e.g. "latent?sae=...&latent=3") and wait for Streamlit to finish running."""
        self.page.goto(f"{self.url}/{path.lstrip('/')}")
        self.settle()
        return self.page

    def settle(self, timeout_ms: int = 45_000) -> None:
        """Wait until the app has rendered: no script run in progress and no placeholder
        (skeleton) left, for half a second on end (a rerun may start just after one ends)."""
        self.page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
        self.page.evaluate("() => { window.__vitscopeIdleSince = 0; }")
        self.page.wait_for_function(SETTLED_JS, timeout=timeout_ms, polling=100)

    def shot(self, name: str) -> Path:
        """Save a full-page screenshot as ``<name>.png`` (also to $VITSCOPE_SCREENSHOT_DIR if set)."""
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if out := os.environ.get(SCREENSHOT_DIR):
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(out) / path.name)
        return path


@pytest.fixture
def explorer_browser(explorer_target, chromium, tmp_path):
    """The explorer served by ``vitscope.explorer``'s own command line on a free port against
    :func:`explorer_target`, and a Chromium page on it (1400 x 1100)."""
    from playwright.sync_api import sync_playwright

    from vitscope.explorer.launch import explorer_command, explorer_env

    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(explorer_command(port), env=explorer_env(explorer_target),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                yield ExplorerBrowser(f"http://127.0.0.1:{port}", page, tmp_path)
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
