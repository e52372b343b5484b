from __future__ import annotations

import os

# Tests never reach the network for model weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The pipeline fixtures (tiny model, planted images, one Prefect run shared by the session).
from pipeline_fixtures import *  # noqa: E402,F401,F403

# --- S3 (radosgw) ---------------------------------------------------------------------------
# A real S3 server for the tests: deploy/radosgw.sh starts Ceph radosgw on loopback once per
# session (or the tests reuse the one that AWS_ENDPOINT_URL already points at).
# isort: split

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
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


def _free_port() -> int:
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
        pytest.fail(
            f"the S3 tests need Ceph radosgw but {', '.join(missing)} not found: run "
            "deploy/install-system-deps or `apt-get install radosgw ceph-mon ceph-osd ceph-common` "
            "(or point AWS_ENDPOINT_URL and AWS_* credentials at a running S3 server)",
            pytrace=False,
        )
    state = tmp_path_factory.mktemp("radosgw")
    run_env = {**os.environ, "RGW_PORT": str(_free_port())}
    proc = subprocess.run(
        ["bash", str(RADOSGW_SH), "start", str(state)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
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
    except Exception:  # memstore forgets everything at session end anyway
        pass


# --- end S3 (radosgw) -----------------------------------------------------------------------
