"""The explorer against a real analyzer: the typed client, the heatmap overlay, every page
through Streamlit's AppTest, and the served app in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from vitscope.analyzer import ServeConfig, serve
from vitscope.explorer.client import AnalyzerClient, AnalyzerError, image_index, sae_id
from vitscope.explorer.heatmap import overlay, to_png
from vitscope.explorer.launch import APP, explorer_command, explorer_env
from vitscope.proto import names, pb
from vitscope.sae import ReluHyper

os.environ["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"

TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_store(pipeline, tmp_path_factory) -> tuple[str, str]:
    """A copy of the pipeline's store plus a second SAE that is trained but not analysed, so
    the sweep has two points and the 'not analysed' path is real. Returns (store, second id)."""
    from vitscope.trainer.training import TrainConfig, train

    store = tmp_path_factory.mktemp("explorer") / "store"
    shutil.copytree(pipeline.store_uri, store)
    second = train(TrainConfig(activations=pipeline.set_id, store=str(store), expansion=4, sae=ReluHyper(l1_coeff=1.0),
                               lr=1e-3, batch_size=1024, n_tokens=50_000, seed=1, device="cpu", progress=False))
    return str(store), second.sae_id


@pytest.fixture(scope="module")
def target(sweep_store) -> str:
    server = serve(ServeConfig(store=sweep_store[0], port=0))
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def client(target) -> AnalyzerClient:
    with AnalyzerClient(target) as c:
        yield c


@pytest.fixture(scope="module")
def sae(client, pipeline) -> pb.Sae:
    return client.get_sae(pipeline.sae_id)


@pytest.fixture(scope="module")
def square_latent(client, pipeline) -> int:
    """A latent whose top images carry the planted red square (the most such among the most
    frequent latents), so the browser screenshot shows something meaningful."""
    page = client.list_latents(pipeline.sae_id, page_size=64)

    def squares(i: int) -> int:
        return sum(e.label == "square" for e in client.get_latent(pipeline.sae_id, i, heatmaps=False).examples)

    return max((s.index for s in page.latents), key=squares)


@pytest.fixture
def app(monkeypatch):
    """Make an AppTest of the explorer talking to ``target``, with optional URL parameters."""

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


def _no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert not at.warning, [w.value for w in at.warning]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


# --- heatmap overlay ---------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_overlay_colours_only_active_patches_and_boxes_the_best():
    grey = np.full((64, 96, 3), 128, np.uint8)  # 2 x 3 patches of 32 px
    heat = [0, 0, 0, 0, 0, 2.0]
    out = np.asarray(overlay(_png(grey), heat, (2, 3), best_patch=5))
    assert out.shape == (64, 96, 3)
    assert (out[:32] == 128).all() and (out[32:, :64] == 128).all()  # silent patches untouched
    inside = out[40:56, 72:88].reshape(-1, 3)
    assert (np.abs(inside.astype(int) - 128).max(axis=1) > 40).all()  # the hot patch is coloured
    box = out[32, 64:96]  # the top edge of the best patch's box
    assert (box == (0, 255, 170)).all()


def test_overlay_scale_and_size():
    img = _png(np.zeros((32, 32, 3), np.uint8))
    weak = np.asarray(overlay(img, [1.0] * 4, (2, 2), vmax=10.0)).astype(int)
    strong = np.asarray(overlay(img, [1.0] * 4, (2, 2))).astype(int)
    assert weak.sum() < strong.sum()  # a shared vmax dims an image whose peak is lower
    assert overlay(img, [0.0] * 4, (2, 2), size=128).size == (128, 128)
    assert Image.open(io.BytesIO(to_png(overlay(img, [0.0] * 4, (2, 2))))).format == "PNG"
    with pytest.raises(ValueError, match="needs 4"):
        overlay(img, [0.0] * 3, (2, 2))


# --- client ------------------------------------------------------------------------------------
def test_client_returns_the_api_messages(client, sae, pipeline):
    saes = {sae_id(s): s for s in client.list_saes()}
    assert pipeline.sae_id in saes and len(saes) == 2 and isinstance(saes[pipeline.sae_id], pb.Sae)
    assert sae.analysis == names.analysis(pipeline.analysis_id)
    assert sum(sae.log_frequency_counts) + sae.never_fired == sae.d_sae
    page = client.list_latents(pipeline.sae_id, page_size=10, order_by="index")
    assert [s.index for s in page.latents] == list(range(10)) and page.total_size == sae.d_sae
    lat = client.get_latent(pipeline.sae_id, page.latents[0].index, top_images=3)
    assert len(lat.examples) <= 3 and all(len(e.heatmap) == lat.grid_rows * lat.grid_cols for e in lat.examples)
    img = client.get_image(names.image(pipeline.set_id, 0))
    assert Image.open(io.BytesIO(img.data)).size == (img.width, img.height) and image_index(img) == 0


def test_client_live_calls(client, pipeline):
    """Encode, heatmap and search through the client, with dataset images and an upload."""
    image = names.image(pipeline.set_id, 0)
    encoded = client.encode_image(pipeline.sae_id, image, top_latents=3)
    assert len(encoded.patches) == encoded.grid_rows * encoded.grid_cols and len(encoded.image_latents) <= 3
    top = encoded.image_latents[0].latent_index
    heat = client.get_heatmap(pipeline.sae_id, top, image)
    assert max(heat.activation) == pytest.approx(encoded.image_latents[0].activation, rel=1e-5)
    png = client.get_image(image).data
    assert client.encode_image(pipeline.sae_id, png).grid_rows == encoded.grid_rows  # an upload
    found = client.search_latents(pipeline.sae_id, [image], top_latents=5)
    assert 0 < len(found.latents) <= 5 and found.latents[0].positives_fired == 1


def test_client_errors_carry_status(client, pipeline, sweep_store):
    with pytest.raises(AnalyzerError) as e:
        client.get_sae("0" * 20)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and not e.value.unreachable
    with pytest.raises(AnalyzerError) as e:
        client.get_latent(pipeline.sae_id, 0, top_images=10_000)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_images must be" in e.value.details

    server = serve(ServeConfig(store=sweep_store[0], port=0, token=TOKEN))
    try:
        with AnalyzerClient(f"127.0.0.1:{server.port}", token=TOKEN) as ok:
            assert len(ok.list_saes()) == 2
        with AnalyzerClient(f"127.0.0.1:{server.port}") as anonymous, pytest.raises(AnalyzerError) as e:
            anonymous.list_saes()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=None)

    with AnalyzerClient(f"127.0.0.1:{_free_port()}", timeout=5) as nowhere, pytest.raises(AnalyzerError) as e:
        nowhere.list_saes()
    assert e.value.unreachable


# --- pages (AppTest) ---------------------------------------------------------------------------
def test_saes_page_shows_the_linked_saes_health_and_the_sweep(app, target, sae, sweep_store):
    sid = sae_id(sae)
    at = app(target, sae=sid).run()
    _no_problems(at)
    assert at.sidebar.selectbox(key="sae").value == sid
    m = _metrics(at)
    assert m["NMSE"] == f"{sae.metrics['nmse']:.4f}" and m["L0"] == f"{sae.metrics['l0']:.2f}"
    assert m["Never fired"] == str(sae.never_fired) and m["Dense"] == str(int(sae.metrics["dense"]))
    assert m["Dead"] == str(int(sae.metrics["dead"]))  # the training window's, not the analysis'
    helps = {x.label: x.proto.help for x in at.metric}
    assert f"(here {int(sae.metrics['dead_window']):,} tokens)" in helps["Dead"]
    assert "analysis pass" in helps["Never fired"]
    assert m["d_sae"] == str(sae.d_sae) and m["Layer"] == str(sae.layer) and m["Model"] == sae.model

    histogram, scatter = at.get("vega_lite_chart")
    bars = convert_arrow_bytes_to_pandas_df(histogram.proto.datasets[0].data.data)
    assert bars["latents"].tolist() == list(sae.log_frequency_counts)
    points = convert_arrow_bytes_to_pandas_df(scatter.proto.datasets[0].data.data)
    assert points.loc[points["selected"], "sae"].tolist() == [sid]

    table = at.dataframe[0].value
    assert sorted(table["sae"]) == sorted([sid, sweep_store[1]])
    assert table.loc[table["selected"], "sae"].tolist() == [sid]

    # Picking the other SAE in the sidebar updates the page and the URL.
    at.sidebar.selectbox(key="sae").set_value(sweep_store[1]).run()
    _no_problems(at)
    assert at.query_params["sae"] == sweep_store[1]
    assert sweep_store[1] in at.caption[0].value


def test_latents_page_pages_sorts_and_filters(app, target, client, sae):
    at = app(target, sae=sae_id(sae)).run()
    at.switch_page("views/latents.py").run()
    _no_problems(at)
    expected = client.list_latents(sae_id(sae), page_size=50)
    assert at.dataframe[0].value["latent"].tolist() == [s.index for s in expected.latents]
    assert len(at.dataframe[0].value) == min(50, sae.d_sae)

    at.selectbox(key="latents_order").set_value("index").run()
    assert at.dataframe[0].value["latent"].tolist() == list(range(50))
    at.button[1].click().run()  # Next
    assert at.dataframe[0].value["latent"].tolist() == list(range(50, 100))

    # Only latents firing on at least 1% of tokens; the pager restarts on page 1.
    at.slider(key="latents_freq").set_value((-2.0, 0.0)).run()
    _no_problems(at)
    frequent = client.list_latents(sae_id(sae), page_size=50, order_by="index", min_frequency=0.01)
    shown = at.dataframe[0].value
    assert shown["latent"].tolist() == [s.index for s in frequent.latents]
    assert (shown["frequency"] >= 0.01).all()
    assert any(f"{frequent.total_size} latents match" in md.value for md in at.markdown)


def test_latents_page_opens_a_latent(app, target, sae):
    at = app(target, sae=sae_id(sae)).run()
    at.switch_page("views/latents.py").run()
    at.number_input(key="latents_open").set_value(7)
    at.button[-1].click().run()  # the form's Open button: switches to the Latent page
    _no_problems(at)
    assert at.title[0].value == "Latent 7"
    assert at.query_params == {"sae": sae_id(sae), "latent": "7", "latent_view": "best_patch"}


def test_latent_page_from_a_link_renders_top_k_heatmaps(app, target, client, sae, square_latent):
    at = app(target, sae=sae_id(sae), latent=str(square_latent)).run()
    at.switch_page("views/latent.py").run()
    _no_problems(at)
    lat = client.get_latent(sae_id(sae), square_latent, heatmaps=False)
    assert len(lat.examples) == 8  # the pipeline's analysis keeps k=8, all filled for this latent
    assert at.title[0].value == f"Latent {square_latent}"
    m = _metrics(at)
    assert m["Frequency"] == f"{lat.frequency:.3e}" and m["Max activation"] == f"{lat.max_activation:.4f}"
    assert m["Top images"] == "8"
    top = at.tabs[0]  # "Top images"; the other tabs hold band samples
    captions = [img.proto.imgs[0].caption for img in top.image]
    assert captions == [f"{e.label} · {e.score:.3g} · #{image_index(e)}" for e in lat.examples]

    at.selectbox(key="latent_top_images").set_value(4).run()
    assert len(at.tabs[0].image) == 4
    at.button[1].click().run()  # next latent
    assert at.title[0].value == f"Latent {square_latent + 1}"
    assert at.query_params["latent"] == str(square_latent + 1)


def test_unanalysed_sae_explains_what_to_run(app, target, sweep_store):
    at = app(target, sae=sweep_store[1]).run()
    at.switch_page("views/latent.py").run()
    assert not at.exception
    assert any(f"vitscope analyze --sae {sweep_store[1]}" in i.value for i in at.info)


def test_messages_instead_of_tracebacks(app, sweep_store, tmp_path):
    at = app(f"127.0.0.1:{_free_port()}").run()
    assert not at.exception
    assert "Cannot reach the analyzer" in at.error[0].value

    empty = serve(ServeConfig(store=str(tmp_path / "empty"), port=0))
    guarded = serve(ServeConfig(store=sweep_store[0], port=0, token=TOKEN))
    try:
        at = app(f"127.0.0.1:{empty.port}").run()
        assert not at.exception and "no SAEs" in at.info[0].value
        at = app(f"127.0.0.1:{guarded.port}").run()
        assert not at.exception and "refused this explorer's token" in at.error[0].value
        at = app(f"127.0.0.1:{guarded.port}", token=TOKEN).run()
        _no_problems(at)
    finally:
        empty.stop(grace=None)
        guarded.stop(grace=None)


# --- the served app in a real browser ------------------------------------------------------------
def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"streamlit did not listen on {port} within {timeout} s")


def test_latent_page_in_headless_chromium(target, client, sae, square_latent, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    k = len(client.get_latent(sae_id(sae), square_latent, heatmaps=False).examples)

    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(explorer_command(port, address="127.0.0.1"), env=explorer_env(target),
                            stdout=log, stderr=subprocess.STDOUT)
    shot = tmp_path / "latent.png"
    try:
        _wait_for_port(port, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/latent?sae={sae_id(sae)}&latent={square_latent}")
                # The "Top images" tab; the others (band samples) are in the page too, hidden.
                images = page.locator("[role='tabpanel']").first.locator("[data-testid='stImage'] img")
                images.nth(k - 1).wait_for(timeout=45_000)
                # Wait until every tile has decoded, not merely been inserted.
                page.wait_for_function(
                    "() => { const imgs = [...document.querySelectorAll(\"[role='tabpanel'] [data-testid='stImage'] img\")];"
                    " return imgs.every(i => i.complete && i.naturalWidth > 0); }", timeout=30_000)
                assert images.count() == k
                text = page.inner_text("body")
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()

    assert f"Latent {square_latent}" in text and sae_id(sae) in text
    assert "Cannot reach" not in text
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1100, 1400, 3) and shot.stat().st_size > 50_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # photos and heatmaps, not a blank page
    if out := os.environ.get("VITSCOPE_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / "explorer-latent.png")
