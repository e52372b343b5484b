"""Start the explorer: ``streamlit run`` on this package's app, pointed at an analyzer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def explorer_command(port: int = 8501, headless: bool = True, address: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line for the explorer app, listening on ``address`` (this
    machine only by default, where Streamlit's own default is every interface)."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port),
        "--server.headless", str(headless).lower(),
        "--browser.gatherUsageStats", "false",
        # A served app's code does not change under it: skip the file watcher's polling.
        "--server.fileWatcherType", "none",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this is a served tool
        "--server.address", address,
    ]
    return cmd


def explorer_env(analyzer: str, token: str | None = None) -> dict[str, str]:
    """This process's environment plus the settings the app reads."""
    env = {**os.environ, "VITSCOPE_ANALYZER": analyzer, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    if token:
        env["VITSCOPE_TOKEN"] = token
    return env


def start_explorer(analyzer: str, port: int = 8501, headless: bool = True, token: str | None = None,
                   address: str = "127.0.0.1") -> subprocess.Popen:
    """Start serving the explorer on ``port`` against the analyzer at ``analyzer`` (host:port),
    without waiting: the app only calls the analyzer when a page is opened, so the analyzer may
    still be starting."""
    return subprocess.Popen(explorer_command(port, headless, address), env=explorer_env(analyzer, token))


def run_explorer(analyzer: str, port: int = 8501, headless: bool = True, token: str | None = None,
                 address: str = "127.0.0.1") -> int:
    """Serve the explorer on ``port`` against the analyzer at ``analyzer`` (host:port) until
    interrupted; returns Streamlit's exit status."""
    proc = start_explorer(analyzer, port, headless, token, address)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches streamlit too, which shuts down on its own
        return proc.wait()
