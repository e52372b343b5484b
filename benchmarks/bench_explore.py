"""Explorer benchmark: how long the pages a researcher opens take to render in a real browser.

In headless Chromium (Debian's, driven by Playwright) against `vitscope explore --store S`, the
command a user runs (it starts the analyzer and the Streamlit app):

- **first SAE page after start**: a fresh `vitscope explore` process, then its SAE page until
  its health metrics are drawn; timed from the process start and from the moment its port
  answers, over --starts restarts;
- **warm latent page**: a latent with 16 top images and their heatmaps, opened --loads times
  in a fresh browser page each (a new Streamlit session, the server's caches warm), until every
  tile has decoded and the page's controls are drawn.

Each is measured against a baseline in the same run: a bare Streamlit app that draws the same
number of images of the same size (or, for the start, one line of text), served and loaded the
same way, so the ratio is what the explorer adds to what Streamlit costs anyway.

Without --store, the demo store is built first with `vitscope pipeline --store <tmp>` on its
embedded defaults (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Figure, base_parser, print_environment, report
from PIL import Image

from vitscope.explorer.client import AnalyzerClient
from vitscope.explorer.launch import explorer_command, explorer_env
from vitscope.proto import names

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TILES = 16
BARE_APP = """
import streamlit as st
from pathlib import Path
tiles = sorted(Path({folder!r}).glob("*.png"))
if not tiles:
    st.title("bare app")
for start in range(0, len(tiles), 4):
    for col, tile in zip(st.columns(4), tiles[start:start + 4]):
        col.image(tile.read_bytes(), caption=tile.name, width="stretch", output_format="PNG")
"""
IMAGES_DONE = """n => {
    const imgs = [...document.querySelectorAll("[role='tabpanel'] [data-testid='stImage'] img, "
                                                + "[role='tabpanel'] img.vitscope-tile, .bare [data-testid='stImage'] img")];
    const shown = imgs.length ? imgs : [...document.querySelectorAll("[data-testid='stImage'] img")];
    return shown.length >= n && shown.every(i => i.complete && i.naturalWidth > 0);
}"""
LATENT_PAGE_DONE = "n => (" + IMAGES_DONE + ")(n) && " + """[
    "[data-testid='stNumberInput'] input", "[data-testid='stSidebar'] input[type='text']",
    "[role='tabpanel'] [data-testid='stSelectbox']", "[role='tabpanel'] [data-testid='stButton'] button",
].every(q => document.querySelector(q) !== null)"""
"""The latent page is drawn when every tile has decoded and its controls are there too (the
latent's number, the sidebar, the add-to-search picker and buttons): tiles drawn as plain HTML
need none of Streamlit's widget code, so they may show before the widgets do."""


def parse_args():
    p = base_parser(__doc__, repeats=1)
    p.add_argument("--store", help="a store with an analysed SAE (default: build the demo store)")
    p.add_argument("--loads", type=int, default=20, help="warm latent-page loads (and as many of the bare app)")
    p.add_argument("--starts", type=int, default=5, help="explorer restarts for the first-page time")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args()
    if args.quick:
        args.loads, args.starts = 4, 2
    if not args.chromium:
        sys.exit("needs Chromium (Debian: apt install chromium)")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {port} within {timeout} s")


def demo_store(folder: Path) -> str:
    store = folder / "store"
    print(f"building the demo store in {store} (vitscope pipeline on its embedded defaults)...", flush=True)
    subprocess.run([sys.executable, "-m", "vitscope.composition.cli", "pipeline", "--store", str(store)], check=True,
                   cwd=folder, env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                   stdout=subprocess.DEVNULL)
    return str(store)


class Served:
    """A server process on a free port, stopped on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int):
        self.port = port
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, self.proc)
        self.listening = time.perf_counter()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def explore(store: str, port: int) -> Served:
    """`vitscope explore` as a user starts it (an analyzer in-process, the app on loopback)."""
    argv = [sys.executable, "-m", "vitscope.composition.cli", "explore", "--store", store, "--port", str(port)]
    return Served(argv, {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}, port)


def bare(folder: Path, port: int) -> Served:
    """Streamlit alone, serving an app that shows the PNGs in ``folder`` (or one title)."""
    folder.mkdir(exist_ok=True)
    app = folder / "bare_app.py"
    app.write_text(BARE_APP.format(folder=str(folder)))
    argv = explorer_command(port)
    argv[argv.index("run") + 1] = str(app)
    return Served(argv, explorer_env("127.0.0.1:1"), port)


def load(browser, url: str, ready: str, arg: object = None) -> float:
    """Seconds from opening ``url`` in a fresh page until the JS predicate ``ready`` holds."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function(ready, arg=arg, timeout=120_000, polling=20)
        return time.perf_counter() - t0
    finally:
        page.close()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def latency(name: str, xs: list[float], target: str = "", limit: float | None = None) -> list[Figure]:
    p50 = statistics.median(xs)
    return [Figure(f"{name}: p50", p50, "s", (min(xs), max(xs)), target, None if limit is None else p50 < limit),
            Figure(f"{name}: p95", percentile(xs, 95), "s")]


SAE_PAGE_READY = "() => [...document.querySelectorAll(\"[data-testid='stMetricLabel']\")].some(e => e.innerText.includes('NMSE'))"
BARE_READY = "() => [...document.querySelectorAll('h1')].some(e => e.innerText.includes('bare app'))"


def main() -> None:
    args = parse_args()
    print_environment(args)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vitscope-bench-explore-") as tmp:
        tmp = Path(tmp)
        store = args.store or demo_store(tmp)
        tiles = tmp / "tiles"
        tiles.mkdir()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                # --- first SAE page after start -------------------------------------------------
                from_start, from_port, bare_start = [], [], []
                for _ in range(args.starts):
                    port = free_port()
                    with explore(store, port) as served:
                        t = load(browser, f"http://127.0.0.1:{port}/", SAE_PAGE_READY)
                        from_port.append(t)
                        from_start.append(served.listening - served.started + t)
                    port = free_port()
                    with bare(tmp / "empty", port) as served:
                        bare_start.append(served.listening - served.started
                                          + load(browser, f"http://127.0.0.1:{port}/", BARE_READY))

                # --- warm latent page -------------------------------------------------------------
                sid, latent, n = pick_latent(store, tiles)
                port = free_port()
                with explore(store, port):
                    url = f"http://127.0.0.1:{port}/latent?sae={sid}&latent={latent}"
                    load(browser, url, LATENT_PAGE_DONE, n)  # warms the server's caches
                    warm = [load(browser, url, LATENT_PAGE_DONE, n) for _ in range(args.loads)]
                port = free_port()
                with bare(tiles, port):
                    bare_url = f"http://127.0.0.1:{port}/"
                    load(browser, bare_url, IMAGES_DONE, n)
                    bare_warm = [load(browser, bare_url, IMAGES_DONE, n) for _ in range(args.loads)]
            finally:
                browser.close()

    report(f"first SAE page after `vitscope explore` starts ({args.starts} starts, store {store})", [
        *latency("from the process start", from_start, "p50 < 3 s", 3.0),
        *latency("from the port answering (cold caches)", from_port),
        *latency("bare Streamlit app, from its process start", bare_start),
        Figure("ratio explorer / bare app, from the process start",
               statistics.median(from_start) / statistics.median(bare_start), "x"),
    ])
    report(f"warm latent page: latent {latent} with {n} top images and heatmaps ({args.loads} loads, new page each)", [
        *latency("explorer", warm, "p50 < 1 s", 1.0),
        *latency(f"bare Streamlit app showing the same {n} images", bare_warm),
        Figure("ratio explorer / bare app", statistics.median(warm) / statistics.median(bare_warm), "x"),
    ])


def pick_latent(store: str, tiles: Path) -> tuple[str, int, int]:
    """(SAE id, latent, top images) of the store's first SAE's most frequent latent, whose top
    images (the page's default count, 16 when the analysis kept as many) are also written to
    ``tiles`` at the explorer's tile size for the bare app."""
    from vitscope.analyzer import ServeConfig, serve

    server = serve(ServeConfig(store=store, port=0))
    try:
        with AnalyzerClient(f"127.0.0.1:{server.port}") as client:
            sid = names.parse_sae(client.list_saes()[0].name)
            latent = client.list_latents(sid, page_size=1).latents[0].index
            examples = client.get_latent(sid, latent, heatmaps=False).examples
            for i, e in enumerate(examples):
                _tile(client.get_image(e.image).data, tiles / f"{i:02d}.png")
    finally:
        server.stop(grace=None)
    return sid, latent, len(examples)


def _tile(png: bytes, path: Path) -> None:
    """The image at the explorer's tile size, so the bare app sends as many bytes per image."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 256 / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


if __name__ == "__main__":
    main()
