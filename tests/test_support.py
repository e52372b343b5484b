"""The test machinery of tests/support.py: markers come from fixtures, missing tools skip on a
newcomer's machine and fail under VITSCOPE_REQUIRE_ALL, where any skip but a gpu test's fails
the run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import INSTALL_SCRIPT, REPO, REQUIRE_ALL

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Needs reached directly and through another fixture, a GPU, and a skip of the test's own.
INNER_TESTS = """
import pytest

@pytest.fixture
def bucket(s3_store):
    return s3_store

def test_pure():
    pass

def test_s3_direct(s3_env):
    pass

def test_s3_through_a_fixture(bucket):
    pass

def test_browser(chromium):
    pass

def test_gpu(cuda):
    pass

def test_skips_itself():
    pytest.skip("not today")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch, tmp_path) -> pytest.Pytester:
    """A test project that loads tests/support.py, declares the repository's markers strictly,
    and runs on a machine without radosgw, Chromium or an S3 server."""
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    markers = "".join(f"    {m!r},\n" for m in ini["markers"])
    pytester.makepyprojecttoml(f'[tool.pytest.ini_options]\naddopts = "--strict-markers"\nmarkers = [\n{markers}]\n')
    pytester.makeconftest('pytest_plugins = ("support",)')
    pytester.makepyfile(test_inner=INNER_TESTS)
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", REQUIRE_ALL):
        monkeypatch.delenv(var, raising=False)
    return pytester


def _selected(p: pytest.Pytester, expr: str) -> set[str]:
    out = p.runpytest("--collect-only", "-q", "-m", expr).stdout.lines
    return {line.split("::")[1] for line in out if line.startswith("test_inner.py::")}


def test_markers_come_from_the_fixtures_a_test_needs(inner):
    assert _selected(inner, "not s3 and not browser") == {"test_pure", "test_gpu", "test_skips_itself"}
    assert _selected(inner, "s3") == {"test_s3_direct", "test_s3_through_a_fixture"}
    assert _selected(inner, "browser") == {"test_browser"}
    assert _selected(inner, "gpu") == {"test_gpu"}


def test_missing_tools_skip_naming_the_install_script(inner):
    rec = inner.inline_run()
    passed, skipped, failed = rec.listoutcomes()
    reasons = {r.nodeid.split("::")[1]: r.longrepr[2] for r in skipped}
    assert not failed and rec.ret == pytest.ExitCode.OK
    assert {r.nodeid.split("::")[1] for r in passed} == {"test_pure"} | ({"test_gpu"} - reasons.keys())
    for name, what in (("test_s3_direct", "radosgw"), ("test_s3_through_a_fixture", "radosgw"),
                       ("test_browser", "Chromium")):
        assert what in reasons[name] and INSTALL_SCRIPT in reasons[name], reasons
    assert reasons["test_skips_itself"].endswith("not today")
    if not torch.cuda.is_available():
        assert "CUDA" in reasons["test_gpu"]


def test_under_require_all_missing_tools_fail_and_any_skip_fails_the_run(inner, monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL, "1")
    res = inner.runpytest()
    gpu = torch.cuda.is_available()
    res.assert_outcomes(passed=1 + gpu, errors=3, skipped=2 - gpu)  # failed in set-up
    for name in ("test_s3_direct", "test_s3_through_a_fixture", "test_browser"):
        res.stdout.fnmatch_lines([f"*ERROR at setup of {name} *", f"*{INSTALL_SCRIPT}*{REQUIRE_ALL} is set*"])
    summary = res.outlines[res.outlines.index(next(s for s in res.outlines if "skipped tests fail" in s)):]
    assert any("test_skips_itself" in s and "not today" in s for s in summary)
    assert not any("test_gpu" in s for s in summary)  # CI has no GPU: a gpu test may skip

    only_a_gpu_skip = inner.runpytest("-k", "test_pure or test_gpu")
    only_a_gpu_skip.assert_outcomes(passed=1 + gpu, skipped=1 - gpu)
    assert only_a_gpu_skip.ret == pytest.ExitCode.OK
    one_skip = inner.runpytest("-k", "test_pure or test_skips_itself")
    one_skip.assert_outcomes(passed=1, skipped=1)
    assert one_skip.ret == pytest.ExitCode.TESTS_FAILED


def test_the_suite_deselects_its_s3_and_browser_tests_by_marker():
    """On the real test modules: tests that need radosgw or Chromium only through their
    fixtures are deselected by ``-m "not s3 and not browser"``, the others are kept."""
    files = ["tests/test_store.py", "tests/test_datasets.py", "tests/test_explorer.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not s3 and not browser", *files], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = set(proc.stdout.split())
    assert "tests/test_store.py::test_put_get_bytes[local]" in kept
    assert "tests/test_explorer.py::test_overlay_scale_and_size" in kept
    for gone in ("tests/test_store.py::test_put_get_bytes[s3]", "tests/test_store.py::test_s3_missing_bucket",
                 "tests/test_datasets.py::test_tars_and_uri_lists_from_and_to_radosgw",
                 "tests/test_explorer.py::test_latent_page_in_headless_chromium"):
        assert gone not in kept
