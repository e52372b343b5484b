"""The explorer's Image probe and Concept search pages against a real analyzer: what each
page shows (compared with what the client returns for the same call) and its error states
through Streamlit's AppTest, and the click paths in the served app in headless Chromium."""

from __future__ import annotations

import pytest
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from support import no_problems

from vitscope.analyzer import ServeConfig, serve
from vitscope.explorer.client import sae_id
from vitscope.explorer.data import caption
from vitscope.explorer.live import latent_text
from vitscope.explorer.search_basket import Example, upload_name
from vitscope.proto import names, pb
from vitscope.shards import ActivationSet
from vitscope.store import open_store

PATCH = 16  # the tiny model's patch size, on images of its input size
TOP = 8  # latents the probe lists per patch and per image


@pytest.fixture(scope="module")
def rows(pipeline) -> dict[str, int]:
    """Each planted image's row in the pipeline's activation set, by its id."""
    aset = ActivationSet.open(open_store(pipeline.store_uri), pipeline.set_id)
    return {aset.image_record(i)["id"]: i for i in range(len(aset))}


@pytest.fixture(scope="module")
def squares(pipeline, rows, explorer_sae) -> list[tuple[str, int]]:
    """(name, patch) of planted images, the patch at their square's centre (always inside it)."""
    out = []
    for item in pipeline.items:
        if item.has_object:
            left, top, right, bottom = item.box
            patch = (top + bottom) // 2 // PATCH * explorer_sae.grid_cols + (left + right) // 2 // PATCH
            out.append((names.image(pipeline.set_id, rows[item.id]), patch))
    return out


@pytest.fixture(scope="module")
def plain(pipeline, rows) -> list[str]:
    """Names of images without the square."""
    return [names.image(pipeline.set_id, rows[item.id]) for item in pipeline.items if not item.has_object]


def labels_of(client, sid: str) -> dict[int, str]:
    page = client.list_latents(sid, page_size=1000, label_query="*")
    return {lat.index: lat.label.text for lat in page.latents}


def link_labels(node) -> list[str]:
    return [link.proto.label for link in node.get("page_link")]


def listed(acts, labels) -> list[str]:
    """The probe's lines for latent activations, as the page writes them."""
    return [latent_text(a.latent_index, labels, f"{a.activation:.4g}") for a in acts]


def heat_cells(at):
    """The patch picker's cells (patch, row, col, activation) as the probe's chart has them."""
    frames = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in at.get("vega_lite_chart")[0].proto.datasets]
    return next(f for f in frames if "activation" in f)


def probe_page(explorer_app, target: str, **query):
    at = explorer_app(target, **query).run()
    return at.switch_page("views/probe.py").run()


def search_page(explorer_app, target: str, **query):
    at = explorer_app(target, **query).run()
    return at.switch_page("views/search.py").run()


def region(patch: int, cols: int) -> pb.PatchRegion:
    row, col = divmod(patch, cols)
    return pb.PatchRegion(row_start=row, col_start=col, row_end=row + 1, col_end=col + 1)


# --- Image probe (AppTest) -----------------------------------------------------------------------
def test_probe_opens_the_linked_image_latent_and_patch(explorer_app, explorer_target, explorer_client, explorer_sae,
                                                       square_latent, squares):
    sid, cols = sae_id(explorer_sae), explorer_sae.grid_cols
    name, patch = squares[0]
    row = str(names.parse_image(name)[1])
    at = probe_page(explorer_app, explorer_target, sae=sid, image=row, latent=str(square_latent), patch=str(patch))
    no_problems(at)
    assert at.query_params == {"sae": sid, "image": row, "latent": str(square_latent), "patch": str(patch)}
    encoded = explorer_client.encode_image(sid, name, top_latents=TOP)
    labels = labels_of(explorer_client, sid)
    patch_tab, image_tab, *cls_tab = at.tabs
    assert patch_tab.label == "Patch ({}, {})".format(*divmod(patch, cols))
    assert link_labels(patch_tab) == listed(encoded.patches[patch].latents, labels)
    assert link_labels(image_tab) == listed(encoded.image_latents, labels) and encoded.image_latents
    assert [link_labels(t) for t in cls_tab] == ([listed(encoded.cls_latents, labels)] if encoded.cls_latents else [])

    # The chart's cells carry the latent's heatmap, as GetHeatmap has it.
    heat = explorer_client.get_heatmap(sid, square_latent, name).activation
    cells = heat_cells(at)
    assert cells["activation"].tolist() == pytest.approx(list(heat), rel=1e-6)
    assert (at.number_input(key="probe_row").value, at.number_input(key="probe_col").value) == divmod(patch, cols)

    # Picking a patch with the inputs moves the selection, its list and the URL.
    at.number_input(key="probe_row").set_value(0).run()
    at.number_input(key="probe_col").set_value(1).run()
    no_problems(at)
    assert at.query_params["patch"] == "1" and at.tabs[0].label == "Patch (0, 1)"
    assert link_labels(at.tabs[0]) == listed(encoded.patches[1].latents, labels)

    # A list's layers button shows that latent's heatmap instead.
    other = encoded.image_latents[-1].latent_index
    at.button(key=f"probe_image_latent_{other}").click().run()
    assert at.number_input(key="probe_latent").value == other and at.query_params["latent"] == str(other)
    assert at.query_params["patch"] == "1"  # the patch stays

    # Plus and minus add the patch, or the whole image, to the concept search.
    at.button(key="probe_add_patch_pos").click().run()
    at.button(key="probe_add_image_neg").click().run()
    assert at.session_state["search_positives"] == [Example(name, 1)]
    assert at.session_state["search_negatives"] == [Example(name, None)]
    at.switch_page("views/search.py").run()
    no_problems(at)
    assert at.query_params["pos"] == f"{name}@1" and at.query_params["neg"] == name


def test_probe_an_upload(explorer_app, explorer_target, explorer_client, explorer_sae, pipeline):
    sid = sae_id(explorer_sae)
    item = next(it for it in pipeline.items if it.has_object)
    data = (pipeline.data_root / item.id).read_bytes()
    at = probe_page(explorer_app, explorer_target, sae=sid, image="3")
    picked = at.number_input(key="probe_latent").value, at.query_params["patch"]
    at.radio(key="probe_source").set_value("upload").run()
    no_problems(at)
    assert "Upload an image" in at.info[0].value and "image" not in at.query_params
    at.file_uploader(key="probe_upload").set_value(("photo.jpg", data, "image/jpeg")).run()
    no_problems(at)
    encoded = explorer_client.encode_image(sid, data, top_latents=TOP)
    labels = labels_of(explorer_client, sid)
    assert link_labels(at.tabs[1]) == listed(encoded.image_latents, labels)
    # The latent and the patch picked on the dataset image stay, now over the upload.
    latent = at.number_input(key="probe_latent").value
    patch = at.number_input(key="probe_row").value * explorer_sae.grid_cols + at.number_input(key="probe_col").value
    assert (latent, str(patch)) == picked
    assert link_labels(at.tabs[0]) == listed(encoded.patches[patch].latents, labels)
    heat = explorer_client.get_heatmap(sid, latent, data).activation
    assert heat_cells(at)["activation"].tolist() == pytest.approx(list(heat), rel=1e-6)
    assert set(at.query_params) == {"sae"}  # an upload cannot be linked to
    assert any("cannot carry" in c.value for c in at.caption)
    at.button(key="probe_add_image_pos").click().run()
    assert at.session_state["search_positives"] == [Example(upload_name(data), None, data)]

    at.file_uploader(key="probe_upload").set_value(("broken.png", b"\x89PNG\r\n\x1a\n but no image", "image/png")).run()
    assert not at.exception and not at.error
    assert "`broken.png` is not an image" in at.warning[0].value and not at.tabs


def test_probe_ignores_malformed_link_parameters(explorer_app, explorer_target, explorer_client, explorer_sae,
                                                 pipeline):
    sid = sae_id(explorer_sae)
    at = probe_page(explorer_app, explorer_target, sae=sid, image="abc", latent=str(explorer_sae.d_sae), patch="-1")
    assert not at.exception and not at.error
    warned = " ".join(w.value for w in at.warning)
    assert "`image=abc`" in warned and f"`latent={explorer_sae.d_sae}`" in warned and "`patch=-1`" in warned
    first = explorer_client.encode_image(sid, names.image(pipeline.set_id, 0), top_latents=1).image_latents[0]
    assert at.query_params["image"] == "0" and at.query_params["latent"] == str(first.latent_index)
    assert 0 <= int(at.query_params["patch"]) < explorer_sae.grid_rows * explorer_sae.grid_cols
    at.number_input(key="probe_image").set_value(1).run()  # the URL now holds valid values only
    no_problems(at)


def test_probe_and_search_say_when_the_analyzer_is_gone(explorer_app, explorer_sae, sweep_store, pipeline):
    sid = sae_id(explorer_sae)
    server = serve(ServeConfig(store=sweep_store[0], port=0))
    try:
        at = probe_page(explorer_app, f"127.0.0.1:{server.port}", sae=sid, image="0")
        no_problems(at)
    finally:
        server.stop(grace=None)
    at.number_input(key="probe_image").set_value(2).run()  # a call the page has not cached
    assert not at.exception and "Cannot reach the analyzer" in at.error[0].value
    at.query_params["pos"] = names.image(pipeline.set_id, 5)
    at.switch_page("views/search.py").run()
    assert not at.exception and "Cannot reach the analyzer" in at.error[0].value


def test_probe_and_search_before_analysis(explorer_app, explorer_target, explorer_client, sweep_store, pipeline):
    """The live calls need no analysis: an SAE without one is probed and searched, its results
    without labels or top images."""
    second = sweep_store[1]
    name = names.image(pipeline.set_id, 1)
    at = probe_page(explorer_app, explorer_target, sae=second, image="1")
    no_problems(at)
    encoded = explorer_client.encode_image(second, name, top_latents=TOP)
    assert link_labels(at.tabs[1]) == listed(encoded.image_latents, {})
    at.query_params["pos"] = name
    at.switch_page("views/search.py").run()
    no_problems(at)
    found = explorer_client.search_latents(second, [name], top_latents=20)
    assert link_labels(at) == [f"{rank + 1}. **{m.latent_index}**" for rank, m in enumerate(found.latents)]
    assert any(f"Analyse SAE `{second}`" in c.value for c in at.caption) and not at.image[1:]


# --- Concept search (AppTest) --------------------------------------------------------------------
def test_search_asks_for_a_positive_example(explorer_app, explorer_target, explorer_sae, plain):
    sid = sae_id(explorer_sae)
    at = search_page(explorer_app, explorer_target, sae=sid)
    no_problems(at)
    assert "Add at least one positive example" in at.info[0].value
    at = search_page(explorer_app, explorer_target, sae=sid, neg=plain[0])
    no_problems(at)
    assert "Add at least one positive example" in at.info[0].value
    assert at.session_state["search_negatives"] == [Example(plain[0])] and not at.get("page_link")


def test_search_from_a_link_ranks_like_the_api_and_refines(explorer_app, explorer_target, explorer_client,
                                                           explorer_sae, squares, plain):
    sid, cols = sae_id(explorer_sae), explorer_sae.grid_cols
    positives, negative = squares[:2], plain[0]
    link = ",".join(f"{name}@{patch}" for name, patch in positives)
    at = search_page(explorer_app, explorer_target, sae=sid, pos=link, neg=negative)
    no_problems(at)
    assert at.query_params["pos"] == link and at.query_params["neg"] == negative
    found = explorer_client.search_latents(
        sid, [pb.SearchExample(image=pb.ImageSource(image=n), region=region(p, cols)) for n, p in positives],
        [negative], top_latents=20)
    labels = labels_of(explorer_client, sid)
    assert link_labels(at) == [f"{rank + 1}. " + latent_text(m.latent_index, labels)
                               for rank, m in enumerate(found.latents)]
    best = found.latents[0]
    assert any(f"score **{best.score:.3f}**" in md.value and f"{best.positives_fired}/2 positives" in md.value
               for md in at.markdown)
    # The best match's grid: its top images, as GetLatent ranks them; the planted square's latent.
    top = explorer_client.get_latent(sid, best.latent_index, heatmaps=False).examples[:8]
    grid = [img.proto.imgs[0].caption for img in at.image if " · #" in img.proto.imgs[0].caption][:len(top)]
    assert grid == [caption(e) for e in top]
    assert sum(e.label == "square" for e in top) >= 6, [e.label for e in top]
    shown = [img.proto.imgs[0].caption for img in at.image]
    assert "#{} · patch ({}, {})".format(names.parse_image(positives[0][0])[1], *divmod(positives[0][1], cols)) in shown

    # Remove one positive, add another through the form: the link follows.
    name, patch = positives[0]
    at.button(key=f"search_remove_positives_{name}_{patch}").click().run()
    assert at.query_params["pos"] == f"{positives[1][0]}@{positives[1][1]}"
    extra, extra_patch = squares[2]
    at.number_input(key="search_add_index").set_value(names.parse_image(extra)[1])
    at.number_input(key="search_add_row").set_value(extra_patch // cols)
    at.number_input(key="search_add_col").set_value(extra_patch % cols)
    at.button(key="search_add_dataset_pos").click().run()
    no_problems(at)
    assert at.session_state["search_positives"] == [Example(*positives[1]), Example(extra, extra_patch)]
    assert at.query_params["pos"] == f"{positives[1][0]}@{positives[1][1]},{extra}@{extra_patch}"


def test_search_drops_malformed_link_parts_and_refuses_bad_examples(explorer_app, explorer_target, explorer_sae,
                                                                     squares):
    sid = sae_id(explorer_sae)
    name, patch = squares[0]
    at = search_page(explorer_app, explorer_target, sae=sid, pos=f"garbage,{name}@zz,{name}@999,{name}@{patch}")
    assert not at.exception and not at.error
    assert "Ignored 3 example(s)" in at.warning[0].value
    assert at.session_state["search_positives"] == [Example(name, patch)] and at.get("page_link")

    at.button(key="search_add_dataset_neg").click().run()  # no image given
    assert not at.exception and "Nothing added: give the row of a dataset image" in at.warning[0].value
    at.number_input(key="search_add_index").set_value(4)
    at.number_input(key="search_add_row").set_value(2)
    at.button(key="search_add_dataset_neg").click().run()
    assert "give both a patch row and a column" in at.warning[0].value
    at.file_uploader(key="search_upload").set_value(("notes.png", b"plain text", "image/png"))
    at.button(key="search_add_upload_pos").click().run()
    assert not at.exception and "`notes.png` is not an image" in at.warning[0].value
    assert at.session_state["search_positives"] == [Example(name, patch)] and not at.session_state["search_negatives"]


# --- the served app in a real browser ------------------------------------------------------------
def test_probe_in_chromium_upload_click_a_patch_open_its_latent(explorer_browser, explorer_client, explorer_sae,
                                                               pipeline):
    sid, grid_rows, cols = sae_id(explorer_sae), explorer_sae.grid_rows, explorer_sae.grid_cols
    item = [it for it in pipeline.items if it.has_object][1]
    path = pipeline.data_root / item.id
    left, top, right, bottom = item.box
    row, col = (top + bottom) // 2 // PATCH, (left + right) // 2 // PATCH
    page = explorer_browser.goto(f"probe?sae={sid}")
    page.get_by_text("Upload", exact=True).click()
    explorer_browser.settle()
    page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(path))
    picture = page.locator("[data-testid='stVegaLiteChart'] image").first
    picture.wait_for(timeout=45_000)
    explorer_browser.settle()
    box = picture.bounding_box()
    page.mouse.click(box["x"] + (col + 0.5) * box["width"] / cols, box["y"] + (row + 0.5) * box["height"] / grid_rows)
    page.get_by_role("tab", name=f"Patch ({row}, {col})").wait_for(timeout=45_000)
    explorer_browser.settle()

    expected = explorer_client.encode_image(sid, path.read_bytes(), top_latents=TOP).patches[row * cols + col].latents
    links = page.locator("[role='tabpanel']").first.locator("[data-testid='stPageLink'] a")
    shown = [int(text.split("·")[0]) for text in links.all_inner_texts()]
    assert shown == [a.latent_index for a in expected] and shown
    assert "Cannot reach" not in page.inner_text("body")
    explorer_browser.shot("explorer-probe")

    links.first.click()
    page.get_by_role("heading", name=f"Latent {shown[0]}").wait_for(timeout=45_000)
    explorer_browser.settle()
    assert f"latent={shown[0]}" in page.url and "/latent?" in page.url


def test_search_in_chromium_two_squares_against_a_plain_image(explorer_browser, explorer_client, explorer_sae,
                                                              squares, plain):
    sid, cols = sae_id(explorer_sae), explorer_sae.grid_cols
    page = explorer_browser.goto(f"search?sae={sid}")
    examples = [(*squares[0], "Positive"), (*squares[1], "Positive"), (plain[0], None, "Negative")]
    for name, patch, kind in examples:
        form = page.locator("[data-testid='stForm']").first
        form.get_by_label(f"Dataset image # (0 to {explorer_sae.image_count - 1})").fill(str(names.parse_image(name)[1]))
        for label, value in (("Patch row", None if patch is None else patch // cols),
                             ("Patch column", None if patch is None else patch % cols)):
            form.get_by_label(label).fill("" if value is None else str(value))
        form.get_by_label("Patch column").press("Tab")
        form.get_by_role("button", name=kind).click()
        explorer_browser.settle()
    first = page.locator(".st-key-search_result_0")
    first.wait_for(timeout=45_000)
    explorer_browser.settle()

    found = explorer_client.search_latents(
        sid, [pb.SearchExample(image=pb.ImageSource(image=n), region=region(p, cols)) for n, p, _ in examples[:2]],
        [plain[0]], top_latents=1).latents[0]
    top = explorer_client.get_latent(sid, found.latent_index, heatmaps=False).examples[:8]
    assert first.locator("[data-testid='stPageLink'] a").inner_text().startswith(f"1. {found.latent_index}")
    tiles = first.locator("[data-testid='stImage']")
    tiles.nth(len(top) - 1).wait_for(timeout=45_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll(\".st-key-search_result_0 [data-testid='stImage'] img\")]"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    captions = first.locator("[data-testid='stImageCaption']").all_inner_texts()
    assert captions == [caption(e) for e in top]
    assert sum(c.startswith("square") for c in captions) >= 6, captions
    assert f"pos={squares[0][0]}" in page.url.replace("%2F", "/").replace("%40", "@")
    first.scroll_into_view_if_needed()  # the page scrolls inside the app, so a screenshot shows one screen
    explorer_browser.shot("explorer-search")
