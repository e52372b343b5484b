"""The explorer against a real analyzer: the typed client, the heatmap overlay, every page
through Streamlit's AppTest, and the served app in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import re

import grpc
import numpy as np
import pytest
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from support import free_port, metrics, no_problems

from vitscope.analyzer import ServeConfig, serve
from vitscope.explorer.client import AnalyzerClient, AnalyzerError, image_index, sae_id
from vitscope.explorer.heatmap import overlay, to_png
from vitscope.explorer.search_basket import Example
from vitscope.proto import names, pb

TOKEN = "s3cret-token"


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


# --- explorer_client ------------------------------------------------------------------------------------
def test_client_returns_the_api_messages(explorer_client, explorer_sae, pipeline):
    saes = {sae_id(s): s for s in explorer_client.list_saes()}
    assert pipeline.sae_id in saes and len(saes) == 2 and isinstance(saes[pipeline.sae_id], pb.Sae)
    assert explorer_sae.analysis == names.analysis(pipeline.analysis_id)
    assert sum(explorer_sae.log_frequency_counts) + explorer_sae.never_fired == explorer_sae.d_sae
    page = explorer_client.list_latents(pipeline.sae_id, page_size=10, order_by="index")
    assert [s.index for s in page.latents] == list(range(10)) and page.total_size == explorer_sae.d_sae
    lat = explorer_client.get_latent(pipeline.sae_id, page.latents[0].index, top_images=3)
    assert len(lat.examples) <= 3 and all(len(e.heatmap) == lat.grid_rows * lat.grid_cols for e in lat.examples)
    img = explorer_client.get_image(names.image(pipeline.set_id, 0))
    assert Image.open(io.BytesIO(img.data)).size == (img.width, img.height) and image_index(img) == 0


def test_client_live_calls(explorer_client, pipeline):
    """Encode, heatmap and search through the explorer_client, with dataset images and an upload."""
    image = names.image(pipeline.set_id, 0)
    encoded = explorer_client.encode_image(pipeline.sae_id, image, top_latents=3)
    assert len(encoded.patches) == encoded.grid_rows * encoded.grid_cols and len(encoded.image_latents) <= 3
    top = encoded.image_latents[0].latent_index
    heat = explorer_client.get_heatmap(pipeline.sae_id, top, image)
    assert max(heat.activation) == pytest.approx(encoded.image_latents[0].activation, rel=1e-5)
    png = explorer_client.get_image(image).data
    assert explorer_client.encode_image(pipeline.sae_id, png).grid_rows == encoded.grid_rows  # an upload
    found = explorer_client.search_latents(pipeline.sae_id, [image], top_latents=5)
    assert 0 < len(found.latents) <= 5 and found.latents[0].positives_fired == 1


def test_client_errors_carry_status(explorer_client, pipeline, sweep_store):
    with pytest.raises(AnalyzerError) as e:
        explorer_client.get_sae("0" * 20)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and not e.value.unreachable
    with pytest.raises(AnalyzerError) as e:
        explorer_client.get_latent(pipeline.sae_id, 0, top_images=10_000)
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

    with AnalyzerClient(f"127.0.0.1:{free_port()}", timeout=5) as nowhere, pytest.raises(AnalyzerError) as e:
        nowhere.list_saes()
    assert e.value.unreachable


# --- pages (AppTest) ---------------------------------------------------------------------------
def test_saes_page_shows_the_linked_saes_health_and_links_its_sweep(explorer_app, explorer_target, explorer_sae,
                                                                   sweep_store):
    sid = sae_id(explorer_sae)
    at = explorer_app(explorer_target, sae=sid).run()
    no_problems(at)
    assert at.sidebar.selectbox(key="sae").value == sid
    m = metrics(at)
    assert m["NMSE"] == f"{explorer_sae.metrics['nmse']:.4f}" and m["L0"] == f"{explorer_sae.metrics['l0']:.2f}"
    assert m["Never fired"] == str(explorer_sae.never_fired) and m["Dense"] == str(int(explorer_sae.metrics["dense"]))
    assert m["Dead"] == str(int(explorer_sae.metrics["dead"]))  # the training window's, not the analysis'
    helps = {x.label: x.proto.help for x in at.metric}
    assert f"(here {int(explorer_sae.metrics['dead_window']):,} tokens)" in helps["Dead"]
    assert "analysis pass" in helps["Never fired"]
    assert m["d_sae"] == str(explorer_sae.d_sae) and m["Layer"] == str(explorer_sae.layer) and m["Model"] == explorer_sae.model

    (histogram,) = at.get("vega_lite_chart")  # the sweep is a page of its own now
    bars = convert_arrow_bytes_to_pandas_df(histogram.proto.datasets[0].data.data)
    assert bars["latents"].tolist() == list(explorer_sae.log_frequency_counts)
    assert not at.dataframe
    sweep = {e.proto.page: e.proto.query_string for e in at.get("page_link")}["sweep"]
    assert sweep == f"sae={sid}&set={names.parse_activation_set(explorer_sae.activation_set)}"

    # Picking the other SAE in the sidebar updates the page and the URL.
    at.sidebar.selectbox(key="sae").set_value(sweep_store[1]).run()
    no_problems(at)
    assert at.query_params["sae"] == sweep_store[1]
    assert sweep_store[1] in at.caption[0].value


def test_latents_page_pages_sorts_and_filters(explorer_app, explorer_target, explorer_client, explorer_sae):
    at = explorer_app(explorer_target, sae=sae_id(explorer_sae)).run()
    at.switch_page("views/latents.py").run()
    no_problems(at)
    expected = explorer_client.list_latents(sae_id(explorer_sae), page_size=50)
    assert at.dataframe[0].value["latent"].tolist() == [s.index for s in expected.latents]
    assert len(at.dataframe[0].value) == min(50, explorer_sae.d_sae)

    at.selectbox(key="latents_order").set_value("index").run()
    assert at.dataframe[0].value["latent"].tolist() == list(range(50))
    at.button[1].click().run()  # Next
    assert at.dataframe[0].value["latent"].tolist() == list(range(50, 100))

    # Only latents firing on at least 1% of tokens; the pager restarts on page 1.
    at.slider(key="latents_freq").set_value((-2.0, 0.0)).run()
    no_problems(at)
    frequent = explorer_client.list_latents(sae_id(explorer_sae), page_size=50, order_by="index", min_frequency=0.01)
    shown = at.dataframe[0].value
    assert shown["latent"].tolist() == [s.index for s in frequent.latents]
    assert (shown["frequency"] >= 0.01).all()
    assert any(f"{frequent.total_size} latents match" in md.value for md in at.markdown)


def test_latents_page_opens_a_latent(explorer_app, explorer_target, explorer_sae):
    at = explorer_app(explorer_target, sae=sae_id(explorer_sae)).run()
    at.switch_page("views/latents.py").run()
    at.number_input(key="latents_open").set_value(7)
    at.button[-1].click().run()  # the form's Open button: switches to the Latent page
    no_problems(at)
    assert at.title[0].value == "Latent 7"
    assert at.query_params == {"sae": sae_id(explorer_sae), "latent": "7", "latent_view": "best_patch"}


def test_latent_page_from_a_link_renders_top_k_heatmaps(explorer_app, explorer_target, explorer_client, explorer_sae, square_latent):
    at = explorer_app(explorer_target, sae=sae_id(explorer_sae), latent=str(square_latent)).run()
    at.switch_page("views/latent.py").run()
    no_problems(at)
    lat = explorer_client.get_latent(sae_id(explorer_sae), square_latent, heatmaps=False)
    assert len(lat.examples) == 8  # the pipeline's analysis keeps k=8, all filled for this latent
    assert at.title[0].value == f"Latent {square_latent}"
    m = metrics(at)
    assert m["Frequency"] == f"{lat.frequency:.3e}" and m["Max activation"] == f"{lat.max_activation:.4f}"
    assert m["Top images"] == "8"
    tiles = _tiles(at)
    assert [caption for caption, _, _ in tiles] == [f"{e.label} · {e.score:.3g} · #{image_index(e)}"
                                                    for e in lat.examples]
    for (_, link, picture), e in zip(tiles, lat.examples, strict=True):
        assert link == f"probe?sae={sae_id(explorer_sae)}&image={image_index(e)}&latent={square_latent}&patch={e.patch}"
        assert picture.size == (256, 256)  # a heatmap tile at the explorer's tile size
    # The grid's picker adds a tile's boxed patch to the concept search.
    at.selectbox(key=f"top_pick_{sae_id(explorer_sae)}").set_value(2).run()
    at.button(key=f"top_{sae_id(explorer_sae)}_neg").click().run()
    assert at.session_state["search_negatives"] == [Example(lat.examples[2].image, lat.examples[2].patch)]

    at.selectbox(key="latent_top_images").set_value(4).run()
    assert len(_tiles(at)) == 4
    at.button[1].click().run()  # next latent
    assert at.title[0].value == f"Latent {square_latent + 1}"
    assert at.query_params["latent"] == str(square_latent + 1)


def _tiles(at) -> list[tuple[str, str, Image.Image]]:
    """(caption, link, picture) of each tile of the Latent page's top-images grid, in order."""
    (grid,) = at.tabs[0].html  # "Top images"; the other tabs hold band samples
    found = re.findall(r'<a href="([^"]+)"[^>]*><img class="vitscope-tile"[^>]* src="data:image/jpeg;base64,([^"]+)">'
                       r"</a><figcaption[^>]*><b>(\d+)</b> · (.*?)</figcaption>", grid.value)
    assert [int(n) for _, _, n, _ in found] == list(range(1, len(found) + 1))
    return [(html.unescape(caption), html.unescape(link), Image.open(io.BytesIO(base64.b64decode(data))))
            for link, data, _, caption in found]


def test_unanalysed_sae_explains_what_to_run(explorer_app, explorer_target, sweep_store):
    at = explorer_app(explorer_target, sae=sweep_store[1]).run()
    at.switch_page("views/latent.py").run()
    assert not at.exception
    assert any(f"vitscope analyze --sae {sweep_store[1]}" in i.value for i in at.info)


def test_messages_instead_of_tracebacks(explorer_app, sweep_store, tmp_path):
    at = explorer_app(f"127.0.0.1:{free_port()}").run()
    assert not at.exception
    assert "Cannot reach the analyzer" in at.error[0].value

    empty = serve(ServeConfig(store=str(tmp_path / "empty"), port=0))
    guarded = serve(ServeConfig(store=sweep_store[0], port=0, token=TOKEN))
    try:
        at = explorer_app(f"127.0.0.1:{empty.port}").run()
        assert not at.exception and "no SAEs" in at.info[0].value
        at = explorer_app(f"127.0.0.1:{guarded.port}").run()
        assert not at.exception and "refused this explorer's token" in at.error[0].value
        at = explorer_app(f"127.0.0.1:{guarded.port}", token=TOKEN).run()
        no_problems(at)
    finally:
        empty.stop(grace=None)
        guarded.stop(grace=None)


# --- the served app in a real browser ------------------------------------------------------------
def test_latent_page_in_headless_chromium(explorer_browser, explorer_client, explorer_sae, square_latent):
    sid = sae_id(explorer_sae)
    k = len(explorer_client.get_latent(sid, square_latent, heatmaps=False).examples)
    page = explorer_browser.goto(f"latent?sae={sid}&latent={square_latent}")
    # The "Top images" tab; the others (band samples) are in the page too, hidden.
    images = page.locator("[role='tabpanel']").first.locator("img.vitscope-tile")
    images.nth(k - 1).wait_for(timeout=45_000)
    # Wait until every tile has decoded, not merely been inserted.
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[role='tabpanel'] img.vitscope-tile\")]"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    assert images.count() == k
    text = page.inner_text("body")
    shot = explorer_browser.shot("explorer-latent")
    assert f"Latent {square_latent}" in text and sid in text
    assert "Cannot reach" not in text
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[1] == 1400 and shot.stat().st_size > 50_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # photos and heatmaps, not a blank page


def _lan_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_explorer_listens_on_loopback_by_default(explorer_target, tmp_path):
    """Streamlit's own default is every interface; the explorer's is this machine only."""
    import socket
    import subprocess

    from support import wait_for_port

    from vitscope.composition.cli import ExploreConfig
    from vitscope.explorer.launch import explorer_command, explorer_env

    assert ExploreConfig().host == "127.0.0.1"
    port = free_port()
    cmd = explorer_command(port)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, env=explorer_env(explorer_target), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            lan = _lan_address()
            if lan is not None:
                with pytest.raises(OSError):
                    socket.create_connection((lan, port), timeout=2).close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)


# --- labels ------------------------------------------------------------------------------------------
def _latent_page(explorer_app, target: str, sid: str, latent: int, author: str):
    at = explorer_app(target, sae=sid, latent=str(latent), latent_tab="Label & notes")
    at.session_state["author"] = author
    at.run()
    at.switch_page("views/latent.py").run()
    no_problems(at)
    return at


def _save_label(at, text: str, notes: str = "") -> None:
    at.text_input(key="label_text").set_value(text)
    at.text_area(key="label_notes").set_value(notes)
    next(b for b in at.button if b.label == "Save label").click().run()


def test_a_label_saved_on_the_latent_page_is_shown_and_found(explorer_app, explorer_target, explorer_client,
                                                             explorer_sae):
    sid, latent = sae_id(explorer_sae), 11
    at = _latent_page(explorer_app, explorer_target, sid, latent, "ada")
    _save_label(at, "red squares, top left", "fires on the planted square's corner patches")
    no_problems(at)
    stored = explorer_client.get_label(sid, latent)
    assert (stored.text, stored.notes, stored.author) == ("red squares, top left",
                                                          "fires on the planted square's corner patches", "ada")
    again = _latent_page(explorer_app, explorer_target, sid, latent, "ada")  # a reload
    assert again.title[0].value == f"Latent {latent}: red squares, top left"
    assert again.text_input(key="label_text").value == "red squares, top left"
    assert any("Revision 1 by ada" in c.value for c in again.caption)

    table = explorer_app(explorer_target, sae=sid, latents_query="SQUARES corner").run()
    table.switch_page("views/latents.py").run()
    no_problems(table)
    shown = table.dataframe[0].value
    assert shown["latent"].tolist() == [latent] and shown["label"].tolist() == ["red squares, top left"]
    assert table.query_params["latents_query"] == "SQUARES corner"
    table.text_input(key="latents_query").set_value("wing tips").run()
    assert not table.dataframe and "No labelled latent matches" in table.info[0].value


def test_two_browsers_editing_one_label_lose_no_write(explorer_app, explorer_target, explorer_client, explorer_sae):
    """Both open the latent; the first saves; the second's save is refused with the first's words
    shown and its own kept in the form; saving again writes it over them. Both are revisions."""
    sid, latent = sae_id(explorer_sae), 12
    first = _latent_page(explorer_app, explorer_target, sid, latent, "ada")
    second = _latent_page(explorer_app, explorer_target, sid, latent, "grace")
    _save_label(first, "vertical edges")
    _save_label(second, "edges of the square", "the square's left and right sides")
    assert not second.exception
    assert "ada changed this label" in second.warning[0].value and "vertical edges" in second.warning[0].value
    assert second.text_input(key="label_text").value == "edges of the square"  # nothing typed is lost
    assert explorer_client.get_label(sid, latent).text == "vertical edges"
    next(b for b in second.button if b.label == "Save label").click().run()
    no_problems(second)
    revisions = explorer_client.label_revisions(sid, latent)
    assert [(r.text, r.author) for r in revisions] == [("edges of the square", "grace"), ("vertical edges", "ada")]


def test_label_a_latent_in_headless_chromium(explorer_browser, explorer_client, explorer_sae):
    """SAE page -> latent table -> a latent -> label it -> reload shows the label -> the table
    finds it by a word of it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    sid = sae_id(explorer_sae)
    page = explorer_browser.goto(f"?sae={sid}")
    explorer_browser.shot("explorer-sae")
    page.get_by_role("link", name="Latents").click()
    explorer_browser.settle()
    first_row = explorer_client.list_latents(sid, page_size=1).latents[0].index
    grid = page.locator("[data-testid='stDataFrame']").first
    # The grid is a canvas; its accessible table says when the rows are there, and which is selected.
    grid.locator("[data-testid='glide-cell-1-0']").filter(has_text=str(first_row)).wait_for(
        state="attached", timeout=30_000)
    explorer_browser.shot("explorer-latents")
    explorer_browser.settle()
    box = grid.bounding_box()
    opened = f"() => new URLSearchParams(location.search).get('latent') === '{first_row}'"
    for _ in range(4):  # a click can land before the canvas takes pointer events
        page.mouse.move(box["x"] + 18, box["y"] + 35 + 17)  # the first row's selection box
        page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)
        try:
            page.wait_for_function(opened, timeout=10_000)
            break
        except PlaywrightTimeout:
            if grid.locator("tr[aria-rowindex='2'][aria-selected='true']").count():
                break  # selected, and the page is on its way: a second click would unselect it
    else:
        # The canvas grid ignored every click (seen on a loaded machine, about one run in four):
        # open the same latent with the page's own "Open latent #" form, so that the rest of the
        # path is still tested; the table's selection is covered by the runs where it works.
        page.get_by_role("spinbutton", name="Open latent #").fill(str(first_row))
        page.locator("[data-testid='stFormSubmitButton'] button").click()
    page.wait_for_function(opened, timeout=30_000)
    assert f"latent={first_row}" in page.url, page.url
    explorer_browser.settle()
    page.get_by_role("tab", name="Label & notes").click()
    page.get_by_role("textbox", name="Label", exact=True).fill("browser-made label: planted squares")
    page.get_by_role("textbox", name="Notes").fill("written by the Playwright test")
    page.get_by_role("button", name="Save label").click()
    page.get_by_text("Revision 1 by anonymous").wait_for(timeout=30_000)
    assert explorer_client.get_label(sid, first_row).text == "browser-made label: planted squares"

    page.reload()
    explorer_browser.settle()
    page.get_by_role("heading", name=f"Latent {first_row}: browser-made label: planted squares").wait_for(timeout=30_000)
    explorer_browser.shot("explorer-latent-labelled")
    page.get_by_role("link", name="Latents").click()
    explorer_browser.settle()
    search = page.get_by_role("textbox", name="Search labels")
    search.fill("browser-made")
    search.press("Enter")
    explorer_browser.settle()
    page.wait_for_url("**latents_query=browser-made*", timeout=30_000)
    page.get_by_text("1 latents match").wait_for(timeout=30_000)
    cells = grid.locator("tr[aria-rowindex='2'] td")
    assert cells.nth(0).text_content() == str(first_row)
    assert cells.nth(1).text_content() == "browser-made label: planted squares"
    explorer_browser.shot("explorer-latents-search")


def test_latent_page_tabs_run_alone_and_are_in_the_url(explorer_app, explorer_target, explorer_client, explorer_sae,
                                                       square_latent):
    sid = sae_id(explorer_sae)
    lat = explorer_client.get_latent(sid, square_latent, heatmaps=False)
    at = explorer_app(explorer_target, sae=sid, latent=str(square_latent), latent_tab="Distribution").run()
    at.switch_page("views/latent.py").run()
    no_problems(at)
    assert not at.tabs[0].image  # the top images did not run
    assert len(at.tabs[1].image) == sum(len(b.examples) for b in lat.bands) > 0
    bars = convert_arrow_bytes_to_pandas_df(at.tabs[1].get("vega_lite_chart")[0].proto.datasets[0].data.data)
    assert bars["tokens"].sum() == sum(lat.activation_histogram)

    at = explorer_app(explorer_target, sae=sid, latent=str(square_latent), latent_tab="Related latents").run()
    at.switch_page("views/latent.py").run()
    no_problems(at)
    near = explorer_client.find_similar_latents(sid, square_latent)
    links = [p.proto.label for p in at.tabs[2].get("page_link")]
    assert links[:len(near.latents)] == [f"{m.latent_index} · {m.similarity:.3f}" for m in near.latents]
    assert links[len(near.latents):] == [f"{c.latent_index} · {c.jaccard:.3f} · {c.count} tokens" for c in lat.cofiring]
    assert at.query_params["latent_tab"] == "Related latents"
