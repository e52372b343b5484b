"""The explorer's Compare and Sweep pages: two SAEs side by side (in one space and across
spaces), every SAE of an activation set on the NMSE-vs-L0 plane, their error states, and both
pages served in headless Chromium."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from support import extract_config, free_port, no_problems

from vitscope.analyzer import AnalyzeConfig, ServeConfig, analyze, serve
from vitscope.explorer.client import AnalyzerClient, sae_id
from vitscope.explorer.summary import fmt, frequency_fractions, pareto_front
from vitscope.metrics import METRICS
from vitscope.proto import names, pb


@dataclass
class Stores:
    """An analyzer over a copy of the explorer's store with more SAEs: two more on the pipeline's
    set (``sweep``, unanalysed) and an analysed one on another layer, in another set (``deep``)."""

    target: str
    client: AnalyzerClient
    set_id: str
    deep: str
    deep_set: str
    sweep: list[str]


@pytest.fixture(scope="module")
def stores(sweep_store, pipeline, tmp_path_factory):
    from vitscope.extractor import extract
    from vitscope.sae import ReluHyper, TopKHyper
    from vitscope.trainer.training import TrainConfig, train, train_sweep

    store = tmp_path_factory.mktemp("compare") / "store"
    shutil.copytree(sweep_store[0], store)
    deep_set = extract(extract_config(pipeline.data_root, store, pipeline.model_name, layers=(-2,))).set_id

    def config(set_id: str, **kw) -> TrainConfig:
        return TrainConfig(**({"activations": set_id, "store": str(store), "lr": 1e-3, "batch_size": 1024,
                               "n_tokens": 20_000, "device": "cpu", "progress": False} | kw))

    deep = train(config(deep_set, expansion=4, sae=ReluHyper(l1_coeff=1.0))).sae_id
    analyze(AnalyzeConfig(sae=deep, store=str(store), top_images=8, progress=False))
    sweep = [r.sae_id for r in train_sweep([config(pipeline.set_id, expansion=2, sae=TopKHyper(k=4)),
                                            config(pipeline.set_id, expansion=4, sae=TopKHyper(k=12))])]
    server = serve(ServeConfig(store=str(store), port=0))
    target = f"127.0.0.1:{server.port}"
    try:
        with AnalyzerClient(target, timeout=120) as client:
            yield Stores(target, client, pipeline.set_id, deep, deep_set, sweep)
    finally:
        server.stop(grace=None)


def _chart_data(chart) -> pd.DataFrame:
    """The data of an AppTest's Altair chart (its one dataset)."""
    return convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data)


def _links(at) -> list[tuple[str, str]]:
    """(label, query string) of every page link the run showed."""
    return [(e.proto.label, e.proto.query_string) for e in at.get("page_link")]


def _open(explorer_app, target: str, page: str, **query: str):
    at = explorer_app(target, **query).run()
    at.switch_page(f"views/{page}.py").run()
    return at


# --- pure helpers -------------------------------------------------------------------------------
def test_pareto_front_keeps_the_points_nothing_beats():
    l0 = [10, 20, 30, 20, 40, 30, 10]
    nmse = [0.5, 0.3, 0.3, 0.4, 0.1, 0.3, 0.5]
    # (20, 0.4) loses to (20, 0.3); (30, 0.3) twice loses to (20, 0.3); the tie at (10, 0.5) stays.
    assert pareto_front(l0, nmse).tolist() == [True, True, False, False, True, False, True]
    assert pareto_front([], []).tolist() == []
    assert fmt(-3.0, "+d") == "-3" and fmt(0.25, "+.2f") == "+0.25" and fmt(None, ".4f") == "–"
    sae = pb.Sae(d_sae=8, log_frequency_counts=[1, 0, 3])
    assert frequency_fractions(sae) == [0.125, 0.0, 0.375]


# --- Compare ------------------------------------------------------------------------------------
def test_compare_in_one_space_by_decoder_cosine(explorer_app, explorer_target, explorer_client, explorer_sae,
                                                sweep_store):
    """The unanalysed SAE on the left, the analysed one on the right: their metrics side by side,
    the right one's histogram only, and the right one's latents nearest by decoder direction,
    each with its top images and a link to its latent page."""
    left, right, latent = sweep_store[1], sae_id(explorer_sae), 5
    at = _open(explorer_app, explorer_target, "compare", sae=left, other=right, latent=str(latent))
    assert not at.exception and not at.error and not at.warning
    assert at.query_params["other"] == right and at.query_params["latent"] == str(latent)
    table = at.table[0].value
    left_sae = explorer_client.get_sae(left)
    values = {**explorer_sae.metrics, "never_fired": explorer_sae.never_fired}  # analysed: the analysis pass's
    for key, m in METRICS.items():
        assert table.loc[m.label, f"right · {right[:12]}"] == fmt(values.get(key), m.format)
    assert table.loc["NMSE", f"left · {left[:12]}"] == f"{left_sae.metrics['nmse']:.4f}"
    assert table.loc["NMSE", "right − left"] == f"{explorer_sae.metrics['nmse'] - left_sae.metrics['nmse']:+.4f}"
    assert table.loc["Analysed"].tolist() == ["no", "yes", ""]
    assert table.loc["Never fired", "right − left"] == ""  # the trainer's evaluation against the analysis pass

    (histogram,) = at.get("vega_lite_chart")
    bars = _chart_data(histogram)
    assert set(bars["sae"]) == {f"right · {right[:12]}"}  # the left one has no histogram yet
    assert any(f"vitscope analyze --sae {left}" in i.value for i in at.info)

    expected = explorer_client.find_similar_latents(left, latent, right)
    assert expected.method == pb.SIMILARITY_METHOD_DECODER_COSINE
    assert any("decoder cosine" in c.value for c in at.caption)
    matches = [(label, query) for label, query in _links(at) if f"sae={right}" in query]
    assert [label for label, _ in matches] == [f"Latent {m.latent_index} · cosine {m.similarity:.3f}"
                                            for m in expected.latents]
    assert [query for _, query in matches] == [f"sae={right}&latent={m.latent_index}" for m in expected.latents]
    strips = [img for img in at.image if len(img.proto.imgs) > 0]
    assert len(strips) == len(expected.latents)  # the left latent has none: its SAE is not analysed
    first = explorer_client.get_latent(right, expected.latents[0].latent_index, heatmaps=False)
    assert [i.caption for i in strips[0].proto.imgs] == [
        f"{e.label} · {e.score:.3g} · #{names.parse_image(e.image)[1]}" for e in first.examples[:6]]

    # Another latent: new matches, and the URL follows.
    at.number_input(key="latent").set_value(latent + 1).run()
    assert not at.exception and at.query_params["latent"] == str(latent + 1)
    again = explorer_client.find_similar_latents(left, latent + 1, right)
    assert [lab for lab, q in _links(at) if f"sae={right}" in q][0] == (
        f"Latent {again.latents[0].latent_index} · cosine {again.latents[0].similarity:.3f}")


def test_compare_across_spaces_by_co_firing(explorer_app, stores, pipeline):
    """An SAE on another layer (so in another activation set) and half as wide: histograms as
    fractions of each one's latents, matches by co-firing on sampled images."""
    at = _open(explorer_app, stores.target, "compare", sae=pipeline.sae_id, other=stores.deep)
    no_problems(at)
    left, right = stores.client.get_sae(pipeline.sae_id), stores.client.get_sae(stores.deep)
    assert left.d_sae != right.d_sae and left.layer != right.layer
    table = at.table[0].value
    assert table.loc["Layer"].tolist() == [str(left.layer), str(right.layer), ""]
    assert table.loc["Never fired", "right − left"] == f"{right.never_fired - left.never_fired:+d}"

    (histogram,) = at.get("vega_lite_chart")
    bars = _chart_data(histogram)
    for side, s in ((f"left · {pipeline.sae_id[:12]}", left), (f"right · {stores.deep[:12]}", right)):
        mine = bars[bars["sae"] == side]
        assert mine["fraction"].tolist() == pytest.approx([c / s.d_sae for c in s.log_frequency_counts])
        assert mine["lo"].tolist() == list(s.log_frequency_edges)[:-1]
        assert mine["fraction"].sum() == pytest.approx(1 - s.never_fired / s.d_sae)

    expected = stores.client.find_similar_latents(pipeline.sae_id, 0, stores.deep, 10)
    assert expected.method == pb.SIMILARITY_METHOD_COFIRING and expected.sampled_images > 0
    assert any("co-firing" in c.value and f"over {expected.sampled_images} images" in c.value for c in at.caption)
    shown = [label for label, query in _links(at) if f"sae={stores.deep}" in query]
    assert shown == [f"Latent {m.latent_index} · Jaccard {m.similarity:.3f}" for m in expected.latents]
    # Both sides analysed: the left latent's strip, then one per match.
    assert len([img for img in at.image if img.proto.imgs]) == 1 + len(expected.latents)


def test_compare_handles_odd_choices(explorer_app, explorer_target, explorer_sae, analyzer_server, pipeline):
    sid = sae_id(explorer_sae)
    # An unknown right-hand id: said, and another SAE is shown (not the left one twice).
    at = _open(explorer_app, explorer_target, "compare", sae=sid, other="no-such-sae", latent="999999")
    assert not at.exception and not at.error
    assert "No SAE `no-such-sae`" in at.warning[0].value
    assert at.selectbox(key="other").value != sid and at.query_params["other"] != "no-such-sae"
    assert at.query_params["latent"] == "0"  # out of range: the first latent
    # The same SAE on both sides.
    at.selectbox(key="other").set_value(sid).run()
    assert not at.exception and any("Both sides are the same SAE" in i.value for i in at.info)
    assert all(f"sae={sid}&" in q for _, q in _links(at) if "latent=" in q)
    # An unknown left-hand id: the sidebar says so, and the page compares another.
    at = explorer_app(explorer_target, sae="no-such-sae").run()
    assert "No SAE `no-such-sae`" in at.sidebar.warning[0].value
    at.switch_page("views/compare.py").run()
    no_problems(at)
    assert at.query_params["sae"] != "no-such-sae" and at.query_params["other"] != at.query_params["sae"]
    # A store of one SAE: it is compared with itself.
    at = _open(explorer_app, analyzer_server, "compare", sae=pipeline.sae_id)
    assert not at.exception and any("the store has no other" in i.value for i in at.info)


def test_compare_says_when_the_analyzer_goes_away(explorer_app, sweep_store, explorer_sae):
    server = serve(ServeConfig(store=sweep_store[0], port=0))
    at = _open(explorer_app, f"127.0.0.1:{server.port}", "compare", sae=sae_id(explorer_sae), other=sweep_store[1])
    no_problems(at)
    server.stop(grace=None)
    at.number_input(key="latent").set_value(5).run()  # the SAE list is cached; the new matches are not
    assert not at.exception
    assert "Cannot reach the analyzer" in at.error[0].value


# --- Sweep --------------------------------------------------------------------------------------
def _expected_front(saes: list[pb.Sae]) -> set[str]:
    points = {sae_id(s): (s.metrics["l0"], s.metrics["nmse"]) for s in saes}
    return {i for i, (l0, nmse) in points.items()
            if not any(a <= l0 and b <= nmse and (a, b) != (l0, nmse) for a, b in points.values())}


def test_sweep_plots_every_sae_of_the_set_with_its_pareto_front(explorer_app, stores, pipeline):
    at = _open(explorer_app, stores.target, "sweep", sae=pipeline.sae_id)
    no_problems(at)
    assert at.selectbox(key="set").value == stores.set_id and at.query_params["set"] == stores.set_id
    saes = [s for s in stores.client.list_saes() if s.activation_set == names.activation_set(stores.set_id)]
    assert len(saes) == 4 and {sae_id(s) for s in saes} >= set(stores.sweep)

    (chart,) = at.get("vega_lite_chart")
    points = _chart_data(chart)
    assert sorted(points["sae"]) == sorted(sae_id(s) for s in saes)
    assert set(points.loc[points["pareto"], "sae"]) == _expected_front(saes)
    assert points.loc[points["selected"], "sae"].tolist() == [pipeline.sae_id]
    assert (points["open"] == "./?sae=" + points["sae"]).all()
    for s in saes:
        row = points[points["sae"] == sae_id(s)].iloc[0]
        assert (row["l0"], row["nmse"], row["variant"], row["d_sae"]) == pytest.approx(
            (s.metrics["l0"], s.metrics["nmse"], s.variant, s.d_sae))
    spec = chart.proto.spec
    assert '"href"' in spec and '"shape"' in spec and '"strokeDash"' in spec

    table = at.dataframe[0].value
    assert sorted(table["sae"]) == sorted(points["sae"])
    assert table.loc[table["selected"], "sae"].tolist() == [pipeline.sae_id]
    assert set(table.loc[table["pareto"], "sae"]) == _expected_front(saes)
    assert not table.loc[table["sae"].isin(stores.sweep), "analysed"].any()

    # Another set: its one SAE, and a note that the sidebar's SAE is not in it.
    at.selectbox(key="set").set_value(stores.deep_set).run()
    no_problems(at)
    assert at.query_params["set"] == stores.deep_set
    assert _chart_data(at.get("vega_lite_chart")[0])["sae"].tolist() == [stores.deep]
    assert any("trained on another set" in c.value for c in at.caption)
    # Picking another SAE in the sidebar follows it to its set.
    at.sidebar.selectbox(key="sae").set_value(stores.sweep[0]).run()
    assert at.selectbox(key="set").value == stores.set_id
    assert _chart_data(at.get("vega_lite_chart")[0]).query("selected")["sae"].tolist() == [stores.sweep[0]]


def test_sweep_links_and_error_states(explorer_app, stores, pipeline, sweep_store):
    # A link to another set than the sidebar SAE's wins.
    at = _open(explorer_app, stores.target, "sweep", sae=pipeline.sae_id, set=stores.deep_set)
    no_problems(at)
    assert at.selectbox(key="set").value == stores.deep_set
    # An unknown set: said, and the sidebar SAE's set is shown.
    at = _open(explorer_app, stores.target, "sweep", sae=pipeline.sae_id, set="no-such-set")
    assert not at.exception and "activation set `no-such-set`" in at.warning[0].value
    assert at.selectbox(key="set").value == stores.set_id
    # The analyzer down.
    at = _open(explorer_app, f"127.0.0.1:{free_port()}", "sweep")
    assert not at.exception and "Cannot reach the analyzer" in at.error[0].value


def test_the_saes_page_links_to_compare_it(explorer_app, explorer_target, explorer_sae):
    at = explorer_app(explorer_target, sae=sae_id(explorer_sae)).run()
    pages = {e.proto.page: e.proto.query_string for e in at.get("page_link")}  # by url_path
    assert pages["compare"] == f"sae={sae_id(explorer_sae)}"


# --- the served pages in a real browser ----------------------------------------------------------
def _at(page, path: str, **query: str) -> bool:
    """Whether the browser's address is the app's ``path`` with (at least) these query parameters."""
    url = urlparse(page.url)
    found = parse_qs(url.query)
    return url.path == path and all(found.get(k) == [v] for k, v in query.items())


def test_compare_and_sweep_in_headless_chromium(explorer_browser, explorer_client, explorer_sae, sweep_store):
    right, left, chosen = sae_id(explorer_sae), sweep_store[1], 9
    page = explorer_browser.goto(f"compare?sae={left}&other={right}")
    latent = page.get_by_label("Latent of the left SAE")
    latent.fill(str(chosen))
    latent.press("Enter")
    page.wait_for_function(f"() => location.search.includes('latent={chosen}')", timeout=45_000)
    explorer_browser.settle()
    expected = explorer_client.find_similar_latents(left, chosen, right)
    first = expected.latents[0].latent_index
    link = page.locator(f"a[href*='latent?sae={right}&latent={first}']").first
    link.wait_for(timeout=45_000)
    # Every match's strip, decoded: up to 6 top images each (the left SAE is not analysed: none).
    thumbs = sum(min(6, len(explorer_client.get_latent(right, m.latent_index, heatmaps=False).examples))
                 for m in expected.latents)
    page.wait_for_function(
        "n => [...document.querySelectorAll(\"[data-testid='stImage'] img\")]"
        ".filter(i => i.complete && i.naturalWidth > 0).length === n", arg=thumbs, timeout=45_000)
    text = page.inner_text("body")
    assert "Compare SAEs" in text and "decoder cosine" in text
    assert f"Latent {first} · cosine {expected.latents[0].similarity:.3f}" in text
    assert page.locator("[data-testid='stImage'] img").count() == thumbs
    link.scroll_into_view_if_needed()
    explorer_browser.shot("explorer-compare")
    link.click()
    page.wait_for_url(lambda _: _at(page, "/latent", sae=right, latent=str(first)), timeout=45_000)
    page.get_by_role("heading", name=re.compile(rf"^Latent {first}\b")).wait_for(timeout=45_000)

    page = explorer_browser.goto(f"sweep?sae={right}")
    chart = page.locator("[data-testid='stVegaLiteChart'] svg").first
    chart.wait_for(timeout=45_000)
    dots = chart.locator("g.mark-symbol.role-mark").nth(0).locator("path")
    ring = chart.locator("g.mark-symbol.role-mark").nth(1).locator("path")
    assert dots.count() == len(explorer_client.list_saes()) == 2 and ring.count() == 1
    assert f"sae: {right}" in ring.first.get_attribute("aria-label")
    explorer_browser.shot("explorer-sweep")
    assert np.asarray(Image.open(explorer_browser.shots / "explorer-sweep.png")).shape[1] == 1400
    # A click on the other SAE's point opens its SAE page.
    dots.and_(page.locator(f"[aria-label*='sae: {left}']")).click()
    page.wait_for_url(lambda _: _at(page, "/", sae=left), timeout=45_000)
    explorer_browser.settle()
    page.get_by_role("heading", name="SAE health").wait_for(timeout=45_000)
    assert left in page.inner_text("body")
