"""Explorer benchmark: how long the pages a researcher opens take to render in a real browser.

In headless Chromium (Debian's, driven by Playwright) against `vitscope explore --store S`, the
command a user runs (it starts the analyzer and the Streamlit app):

- **first SAE page after start**: a fresh `vitscope explore` process, then its SAE page until
  its health metrics are drawn; timed from the process start and from the moment its port
  answers, over --starts restarts; then, after the 3 s a researcher spends reading it, the first
  latent page (the analyzer's first calls that need torch, the SAE and the dataset's images);
- **latent page** (a latent with 16 top images and their heatmaps, the server's caches warm),
  until every tile has decoded and the page's controls are drawn, three ways:
  - opened --loads times in a *fresh browser context* each: a new Streamlit session with no
    HTTP cache, so the front end's ~100 JavaScript modules are fetched every time (the cold
    case);
  - opened --loads times in *one browser context*, a new page each: a new Streamlit session,
    its front end from the browser's cache (Streamlit serves it as immutable), as a researcher's
    browser has it after the first visit;
  - *inside the open page*: the researcher types another latent's number and presses Enter,
    between two latents visited before (--loads times), until the new latent's tiles and
    controls are drawn and nothing of the previous one is left; and then to --new-latents
    latents not visited yet (the analyzer computes their heatmaps then).

Each is measured against a baseline, interleaved with it load by load: a bare Streamlit app that
draws the same number of images of the same size (or, for the start, one line of text), served
and loaded the same way (with a number input that switches between two latents' images for the
navigation), so the ratio is what the explorer adds to what Streamlit costs anyway. The
1-minute load average is sampled at every load and reported per measurement: this is meant for a
small shared machine.

Without --store, the demo store is built first with `vitscope pipeline --store <tmp>` on its
embedded defaults (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import Figure, base_parser, interleaved, paired_ratios, print_environment, report
from PIL import Image

from vitscope.explorer.client import AnalyzerClient
from vitscope.explorer.launch import explorer_command, explorer_env
from vitscope.proto import names

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1100}
BARE_APP = """
import streamlit as st
from pathlib import Path
navigable = "nav" in st.query_params
shown = st.number_input("Latent", min_value=0, max_value=1, step=1, key="shown") if navigable else 0
tiles = sorted((Path({folder!r}) / str(shown)).glob("*.png"))
if not tiles:
    st.title("bare app")
for start in range(0, len(tiles), 4):
    for col, tile in zip(st.columns(4), tiles[start:start + 4]):
        col.image(tile.read_bytes(), caption=tile.name, width="stretch", output_format="PNG")
if navigable:
    st.title(f"tiles {{shown}}")
"""
"""Streamlit alone: the PNGs of folder/0 (the same images as the explorer's tiles), one title when
there are none; with ?nav, a number input that shows folder/0 or folder/1 and a title naming it
last, drawn after the images."""
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
SAE_PAGE_READY = "() => [...document.querySelectorAll(\"[data-testid='stMetricLabel']\")].some(e => e.innerText.includes('NMSE'))"
BARE_READY = "() => [...document.querySelectorAll('h1')].some(e => e.innerText.includes('bare app'))"
READING_S = 3.0
"""How long the first SAE page is read before a latent is opened."""


def shown(done: str) -> str:
    """The JS predicate of a navigation inside the page, given ``[title, n]``: the title names
    what was asked for, no element of the previous run is left (Streamlit marks each stale until
    the new run redraws or drops it), and ``done`` holds for ``n`` images."""
    return f"""([title, n]) => {{
        const h = document.querySelector("h1");
        return h !== null && (h.innerText === title || h.innerText.startsWith(title + ":"))
            && document.querySelector("[data-stale='true']") === null && ({done})(n);
    }}"""


def parse_args():
    p = base_parser(__doc__, repeats=1)
    p.add_argument("--store", help="a store with an analysed SAE (default: build the demo store)")
    p.add_argument("--loads", type=int, default=20, help="latent-page loads per measurement (and as many of the bare app)")
    p.add_argument("--new-latents", type=int, default=10, help="navigations to latents not visited yet")
    p.add_argument("--starts", type=int, default=5, help="explorer restarts for the first-page time")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args()
    if args.quick:
        args.loads, args.starts, args.new_latents = 4, 2, 2
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
        self.url = f"http://127.0.0.1:{port}/"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, self.proc)
        self.listening = time.perf_counter()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def explore(store: str) -> Served:
    """`vitscope explore` as a user starts it (an analyzer in-process, the app on loopback)."""
    port = free_port()
    argv = [sys.executable, "-m", "vitscope.composition.cli", "explore", "--store", store, "--port", str(port)]
    return Served(argv, {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}, port)


def bare(folder: Path) -> Served:
    """Streamlit alone, serving :data:`BARE_APP` on the PNGs under ``folder``."""
    folder.mkdir(exist_ok=True)
    app = folder / "bare_app.py"
    app.write_text(BARE_APP.format(folder=str(folder)))
    port = free_port()
    argv = explorer_command(port)
    argv[argv.index("run") + 1] = str(app)
    return Served(argv, explorer_env("127.0.0.1:1"), port)


class LoadAverage:
    """The 1-minute load average, sampled while a measurement runs."""

    def __init__(self):
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def __str__(self) -> str:
        return f"load average {min(self.samples):.1f} to {max(self.samples):.1f}" if self.samples else "load not sampled"


def load(new_page: Callable[[], Any], url: str, ready: str, arg: object, loads: LoadAverage) -> float:
    """Seconds from opening ``url`` in a page from ``new_page`` until the JS predicate ``ready``
    holds: a Browser's :func:`fresh` page (a context of its own, no HTTP cache) or a
    BrowserContext's ``new_page`` (its cache kept)."""
    loads.sample()
    page = new_page()
    try:
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function(ready, arg=arg, timeout=120_000, polling=20)
        return time.perf_counter() - t0
    finally:
        page.close()


def fresh(browser) -> Callable[[], Any]:
    """Pages of ``browser`` each in a fresh context, as a new browser profile would open them."""
    return functools.partial(browser.new_page, viewport=VIEWPORT)


def navigate(page, value: int, title: str, n: int, done: str, loads: LoadAverage) -> float:
    """Seconds from typing ``value`` into the page's number input and pressing Enter until the
    page shows ``title`` with its ``n`` images drawn (the ``done`` predicate) and nothing left of
    what it showed before."""
    loads.sample()
    box = page.locator("[data-testid='stNumberInput'] input")
    box.fill(str(value))
    t0 = time.perf_counter()
    box.press("Enter")
    page.wait_for_function(shown(done), arg=[title, n], timeout=120_000, polling=20)
    return time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def latency(name: str, xs: list[float], target: str = "", limit: float | None = None) -> list[Figure]:
    p50 = statistics.median(xs)
    return [Figure(f"{name}: p50", p50, "s", (min(xs), max(xs)), target, None if limit is None else p50 < limit),
            Figure(f"{name}: p95", percentile(xs, 95), "s")]


def against_bare(timings: dict[str, list[float]], n: int, limit: float | None = 1.0) -> list[Figure]:
    """The explorer's figures (held to the target when ``limit``), the bare app's, and their ratio."""
    target = f"p50 < {limit:g} s" if limit is not None else ""
    return [*latency("explorer", timings["explorer"], target, limit),
            *latency(f"bare Streamlit app showing the same {n} images", timings["bare"]),
            Figure.ratio("ratio explorer / bare app (load by load)", paired_ratios(timings["explorer"], timings["bare"]))]


@dataclass(frozen=True)
class Latent:
    """A latent the benchmark opens."""

    index: int
    images: int  # top images at the page's default count


def main() -> None:
    args = parse_args()
    print_environment(args)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vitscope-bench-explore-") as tmp:
        tmp = Path(tmp)
        store = args.store or demo_store(tmp)
        tiles = tmp / "tiles"
        sid, latents = pick_latents(store, tiles, 2 + args.new_latents)
        a, b, fresh_latents = latents[0], latents[1], latents[2:]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                first = first_pages(browser, store, tmp / "empty", sid, a, args.starts)
                with explore(store) as ex, bare(tiles) as ba:
                    latent_url = f"{ex.url}latent?sae={sid}&latent={a.index}"
                    pages = latent_pages(browser, {"explorer": (latent_url, LATENT_PAGE_DONE),
                                                   "bare": (ba.url, IMAGES_DONE)}, a.images, args.loads)
                    moves = in_page(browser, ex.url, ba.url, sid, a, b, fresh_latents, args.loads)
            finally:
                browser.close()

    report(f"first SAE page after `vitscope explore` starts ({args.starts} starts, store {store}, {first.loads})", [
        *latency("from the process start", first.from_start, "p50 < 3 s", 3.0),
        *latency("from the port answering (cold caches)", first.from_port),
        *latency("bare Streamlit app, from its process start", first.bare_start),
        Figure("ratio explorer / bare app, from the process start",
               statistics.median(first.from_start) / statistics.median(first.bare_start), "x"),
        *latency(f"{READING_S:g} s later, latent {a.index}'s page (first heatmaps, images)", first.latent),
    ])
    title = f"latent {a.index}'s page with {a.images} top images and heatmaps ({args.loads} loads each"
    report(f"{title}, a fresh browser context each: no HTTP cache; {pages['fresh'].loads})",
           against_bare(pages["fresh"].timings, a.images, limit=None))
    report(f"{title}, one browser context: the front end cached, a new page and session each; "
           f"{pages['cached'].loads})", against_bare(pages["cached"].timings, a.images))
    report(f"latent {a.index} <-> {b.index} inside the open page, both visited before (number typed, Enter; "
           f"{args.loads} moves; {moves.loads})", against_bare(moves.timings, a.images))
    report(f"to a latent not visited yet, inside the open page ({len(fresh_latents)} latents: its heatmaps "
           f"computed then; {moves.new_loads})", latency("explorer", moves.new))


@dataclass
class FirstPages:
    from_start: list[float]
    from_port: list[float]
    bare_start: list[float]
    latent: list[float]
    loads: LoadAverage


def first_pages(browser, store: str, empty: Path, sid: str, a: Latent, starts: int) -> FirstPages:
    """The first SAE page of --starts fresh `vitscope explore` processes (each in a fresh browser
    context), the latent page opened :data:`READING_S` after it, and a bare app's first page
    after its start."""
    out = FirstPages([], [], [], [], LoadAverage())
    for _ in range(starts):
        with explore(store) as served:
            t = load(fresh(browser), served.url, SAE_PAGE_READY, None, out.loads)
            out.from_port.append(t)
            out.from_start.append(served.listening - served.started + t)
            time.sleep(READING_S)
            out.latent.append(load(fresh(browser), f"{served.url}latent?sae={sid}&latent={a.index}", LATENT_PAGE_DONE,
                                   a.images, out.loads))
        with bare(empty) as served:
            out.bare_start.append(served.listening - served.started
                                  + load(fresh(browser), served.url, BARE_READY, None, out.loads))
    return out


@dataclass
class Timed:
    timings: dict[str, list[float]]
    loads: LoadAverage


def latent_pages(browser, apps: dict[str, tuple[str, str]], n: int, loads: int) -> dict[str, Timed]:
    """Each app's page (name -> (url, drawn predicate)) opened ``loads`` times, interleaved, in
    a fresh browser context each ("fresh") and in one context that keeps its cache ("cached");
    the first load of each app (untimed) warms the servers' caches and the context's."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        out = {}
        for mode, new_page in (("fresh", fresh(browser)), ("cached", context.new_page)):
            average = LoadAverage()
            measures = {name: functools.partial(load, new_page, url, ready, n, average)
                        for name, (url, ready) in apps.items()}
            out[mode] = Timed(interleaved(measures, loads), average)
        return out
    finally:
        context.close()


@dataclass
class Moves:
    timings: dict[str, list[float]]
    loads: LoadAverage
    new: list[float]
    new_loads: LoadAverage


def in_page(browser, explorer_url: str, bare_url: str, sid: str, a: Latent, b: Latent, fresh: list[Latent],
            moves: int) -> Moves:
    """Latent ``a`` to ``b`` and back inside one open page of each app, ``moves`` times
    interleaved (both visited once first, untimed); then the explorer to each latent of ``fresh``."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        explorer = context.new_page()
        explorer.goto(f"{explorer_url}latent?sae={sid}&latent={a.index}")
        explorer.wait_for_function(LATENT_PAGE_DONE, arg=a.images, timeout=120_000, polling=20)
        plain = context.new_page()
        plain.goto(f"{bare_url}?nav=1")
        plain.wait_for_function(IMAGES_DONE, arg=a.images, timeout=120_000, polling=20)
        average = LoadAverage()
        at = {"explorer": a, "bare": a}

        def move(name: str) -> float:
            to = b if at[name] == a else a
            at[name] = to
            if name == "explorer":
                return navigate(explorer, to.index, f"Latent {to.index}", to.images, LATENT_PAGE_DONE, average)
            return navigate(plain, int(to == b), f"tiles {int(to == b)}", to.images, IMAGES_DONE, average)

        timings = interleaved({"explorer": lambda: move("explorer"), "bare": lambda: move("bare")}, moves)
        new_average = LoadAverage()
        new = [navigate(explorer, m.index, f"Latent {m.index}", m.images, LATENT_PAGE_DONE, new_average)
               for m in fresh]
        return Moves(timings, average, new, new_average)
    finally:
        context.close()


def pick_latents(store: str, tiles: Path, count: int) -> tuple[str, list[Latent]]:
    """(SAE id, its ``count`` most frequent latents) of the store's first SAE, each with its
    number of top images at the page's default count (16 when the analysis kept as many). The
    first two latents' top images are written to ``tiles``/0 and /1 at the explorer's tile size,
    for the bare app."""
    from vitscope.analyzer import ServeConfig, serve

    server = serve(ServeConfig(store=store, port=0))
    try:
        with AnalyzerClient(f"127.0.0.1:{server.port}") as client:
            sid = names.parse_sae(client.list_saes()[0].name)
            picked = []
            for rank, lat in enumerate(client.list_latents(sid, page_size=count).latents):
                examples = client.get_latent(sid, lat.index, heatmaps=False).examples
                picked.append(Latent(lat.index, len(examples)))
                if rank < 2:
                    (tiles / str(rank)).mkdir(parents=True)
                    for i, e in enumerate(examples):
                        _tile(client.get_image(e.image).data, tiles / str(rank) / f"{i:02d}.png")
    finally:
        server.stop(grace=None)
    return sid, picked


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
