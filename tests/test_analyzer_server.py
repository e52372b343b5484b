"""The analyzer's gRPC server, called over a real loopback port: every RPC, its status codes,
paging, heatmaps, images, health checking, bearer-token auth, TLS and deadlines."""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from support import grpc_code

from vitscope.analyzer import AnalyzeConfig, ServeConfig, analyze, serve
from vitscope.analyzer.results import LatentTable, load_analysis
from vitscope.analyzer.server import AnalyzerService
from vitscope.extractor import ExtractConfig, extract
from vitscope.proto import SERVICE, names, pb, rpc
from vitscope.sae import SaeConfig, SaeRecord, build_sae, fit_normalizer, load_sae_from, save_sae
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import open_store
from vitscope.synthetic import make_planted_dataset

D_SAE = 128
K = 8
N_IMAGES = 40
SAE_ID = "test-relu"
UNANALYSED_ID = "test-unanalysed"
SAE = names.sae(SAE_ID)
UNANALYSED = names.sae(UNANALYSED_ID)
Code = grpc.StatusCode


@dataclass
class Served:
    store_uri: str
    set_id: str
    sae_id: str
    analysis_id: str
    data_root: Path
    table: LatentTable
    aset: ActivationSet


def _random_sae(tokens: torch.Tensor, seed: int):
    """A ReLU SAE normalised for ``tokens``, with encoder biases spread from 'never fires' to
    'fires often', so the analysis has dead latents and latents with fewer than k images."""
    sae = build_sae(SaeConfig.of("relu", d_in=tokens.shape[1], d_sae=D_SAE))
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    mean, scale = fit_normalizer(tokens)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        sae.b_enc.copy_(torch.linspace(-12.0, 1.0, D_SAE))
    return sae


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_name: str) -> Served:
    """An activation set of planted images, one analysed SAE and one not, in a fresh store
    (its own image copy, so tests may remove a file)."""
    root = tmp_path_factory.mktemp("analyzer") / "images"
    make_planted_dataset(root, n_images=N_IMAGES, size=112, square=32, seed=3)
    store_uri = str(root.parent / "store")
    res = extract(ExtractConfig(data=str(root), store=store_uri, model=tiny_model_name, pretrained=None,
                                layers=(-1,), images_per_shard=8, workers=0, progress=False))
    store = open_store(store_uri)
    aset = ActivationSet.open(store, res.set_id)
    layer = aset.manifest.layers[0]
    patches = torch.cat([from_storage(a[:, aset.layout.patch_start:], aset.manifest.dtype).flatten(0, 1)
                         for _, a in aset.iter_shards(layer)])
    # The unanalysed SAE's record is as published before dead and never_fired were told apart.
    metrics = {SAE_ID: {"nmse": 0.25, "l0": 12.5, "dead": 3, "dead_window": 4096, "never_fired": 2,
                        "freq_hist": [1, 2, 3]},
               UNANALYSED_ID: {"nmse": 0.25, "l0": 12.5, "dead": 3}}
    for sae_id, seed in ((SAE_ID, 0), (UNANALYSED_ID, 1)):
        record = SaeRecord(sae_id=sae_id, config=SaeConfig.of("relu", patches.shape[1], D_SAE),
                           activation_set_id=res.set_id, layer=layer, tokens=["patches"],
                           training={"lr": 1e-3, "l1_coeff": 3.0, "schedule": "cosine"}, metrics=metrics[sae_id])
        save_sae(store, _random_sae(patches, seed), record)
    aid = analyze(AnalyzeConfig(sae=SAE_ID, store=store_uri, top_images=K, device="cpu", progress=False)).analysis_id
    return Served(store_uri, res.set_id, SAE_ID, aid, root, load_analysis(store, aid)[1], aset)


@pytest.fixture(scope="module")
def server(served: Served):
    running = serve(ServeConfig(store=served.store_uri, port=0, workers=4))
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def stub(server) -> Iterator[rpc.AnalyzerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield rpc.AnalyzerStub(channel)


def _alive(stub: rpc.AnalyzerStub) -> None:
    assert stub.GetSae(pb.GetSaeRequest(name=SAE), timeout=10).name == SAE


# --- health ------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", ["", "vitscope.v2.Analyzer"])
def test_health_check_serving(server, service: str):
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- SAEs --------------------------------------------------------------------------------------
def test_list_saes_reports_metrics_and_analysis(stub, served: Served):
    saes = {s.name: s for s in stub.ListSaes(pb.ListSaesRequest(), timeout=10).saes}
    assert set(saes) == {SAE, UNANALYSED}
    sae = saes[SAE]
    assert sae.analysis == f"analyses/{served.analysis_id}"
    assert (sae.variant, sae.d_in, sae.d_sae, sae.activation_set) == ("relu", 64, D_SAE, f"activationSets/{served.set_id}")
    assert (sae.image_count, sae.grid_rows, sae.grid_cols) == (N_IMAGES, 7, 7)
    assert dict(sae.metrics) == {"nmse": 0.25, "l0": 12.5, "dead": 3.0, "dead_window": 4096.0,
                                 "never_fired": 2.0}  # the list is not a number
    assert dict(sae.config) == {"lr": "0.001", "l1_coeff": "3.0", "schedule": "cosine"}
    assert list(sae.tokens) == ["patches"] and sae.model
    dead = int((served.table.frequency == 0).sum())
    assert dead > 0 and sae.HasField("never_fired") and sae.never_fired == dead  # over the analysis pass
    assert len(sae.log_frequency_edges) == len(sae.log_frequency_counts) + 1
    assert sum(sae.log_frequency_counts) + sae.never_fired == D_SAE

    other = saes[UNANALYSED]
    assert other.analysis == "" and not other.log_frequency_counts
    assert not other.HasField("never_fired")
    # An old record's "dead" counted latents that never fired in its evaluation pass.
    assert dict(other.metrics) == {"nmse": 0.25, "l0": 12.5, "never_fired": 3.0}


def test_get_sae_equals_its_listing(stub):
    listed = next(s for s in stub.ListSaes(pb.ListSaesRequest(), timeout=10).saes if s.name == SAE)
    assert stub.GetSae(pb.GetSaeRequest(name=SAE), timeout=10) == listed


# --- latents -----------------------------------------------------------------------------------
def _walk(stub, page_size: int, **query) -> list[pb.Latent]:
    """Every page of a ListLatents query, checking total_size on the way."""
    out, token, totals = [], "", set()
    while True:
        page = stub.ListLatents(pb.ListLatentsRequest(parent=SAE, page_size=page_size, page_token=token,
                                                      **query), timeout=10)
        assert len(page.latents) <= page_size
        out += page.latents
        totals.add(page.total_size)
        token = page.next_page_token
        if not token:
            break
    assert totals == {len(out)}
    return out


_SORT_KEY = {
    "": lambda s: (-s.frequency, s.index),
    "frequency desc": lambda s: (-s.frequency, s.index),
    "frequency": lambda s: (s.frequency, s.index),
    " frequency   asc ": lambda s: (s.frequency, s.index),
    "max_activation desc": lambda s: (-s.max_activation, s.index),
    "mean_activation desc": lambda s: (-s.mean_activation, s.index),
    "mean_activation asc": lambda s: (s.mean_activation, s.index),
    "index": lambda s: s.index,
    "index desc": lambda s: -s.index,
}


@pytest.mark.parametrize("order_by", list(_SORT_KEY))
def test_paging_visits_every_latent_once_in_order(stub, served: Served, order_by: str):
    latents = _walk(stub, page_size=7, order_by=order_by)
    assert sorted(s.index for s in latents) == list(range(D_SAE))
    assert latents == sorted(latents, key=_SORT_KEY[order_by])
    t = served.table
    for s in latents:
        assert s.name == names.latent(SAE_ID, s.index) and not s.examples  # statistics only
        assert s.frequency == t.frequency[s.index] and s.max_activation == pytest.approx(t.max_activation[s.index])


def test_page_size_defaults_and_caps(stub):
    first = stub.ListLatents(pb.ListLatentsRequest(parent=SAE), timeout=10)
    assert len(first.latents) == 50 and first.next_page_token
    everything = stub.ListLatents(pb.ListLatentsRequest(parent=SAE, page_size=10**6), timeout=10)
    assert len(everything.latents) == D_SAE and everything.next_page_token == ""


@pytest.mark.parametrize("low,high", [(0.01, 0.0), (0.0, 0.05), (0.01, 0.2)])
def test_frequency_filter(stub, served: Served, low: float, high: float):
    latents = _walk(stub, page_size=9, min_frequency=low, max_frequency=high)
    freq = served.table.frequency
    expected = np.flatnonzero((freq >= low) & (freq <= (high or np.inf)))
    assert 0 < len(expected) < D_SAE  # the filter actually filters
    assert sorted(s.index for s in latents) == expected.tolist()


def _index(example: pb.Example) -> int:
    return names.parse_image(example.image)[1]


def _image(served: Served, index: int) -> pb.ImageSource:
    """A dataset image of the SAE's own activation set, by name."""
    return pb.ImageSource(image=names.image(served.set_id, index))


def _png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _busiest_latent(table: LatentTable) -> int:
    return int(np.argmax(table.max_activation))


def test_get_latent_stats_and_examples(stub, served: Served):
    t, latent = served.table, _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent)), timeout=10)
    assert (reply.grid_rows, reply.grid_cols) == (7, 7)
    assert reply.name == names.latent(SAE_ID, latent) and reply.index == latent
    assert reply.frequency == t.frequency[latent]
    assert len(reply.examples) == K  # default min(16, the analysis' k)
    for j, ex in enumerate(reply.examples):
        set_id, image = names.parse_image(ex.image)
        info = served.aset.image_record(image)
        assert set_id == served.set_id
        assert (image, ex.patch) == (t.top["best_patch"].image[latent, j], t.top["best_patch"].patch[latent, j])
        assert ex.score == pytest.approx(float(t.top["best_patch"].score[latent, j]))
        assert (ex.source_id, ex.label) == (info["id"], info["label"])
        assert (ex.patch_row, ex.patch_col) == divmod(ex.patch, 7)
        assert not ex.heatmap
    fewer = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent), top_images=3), timeout=10)
    assert list(fewer.examples) == list(reply.examples[:3])


@pytest.mark.parametrize(("view", "name"), [(pb.TOP_IMAGES_VIEW_BEST_PATCH, "best_patch"),
                                            (pb.TOP_IMAGES_VIEW_CLS, "cls"), (pb.TOP_IMAGES_VIEW_MEAN, "mean")])
def test_get_latent_ranks_top_images_in_the_view_asked_for(stub, served: Served, view, name):
    t, latent = served.table, _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent), view=view, heatmaps=True), timeout=10)
    assert reply.view == view
    top = t.top[name]
    used = int((top.image[latent] >= 0).sum())
    assert [_index(e) for e in reply.examples] == top.image[latent, :min(used, K)].tolist()
    scores = [e.score for e in reply.examples]
    assert scores == sorted(scores, reverse=True)
    for e in reply.examples:  # every view's example points at the image's best patch
        assert int(np.argmax(e.heatmap)) == e.patch
    if name == "mean":
        for e in reply.examples:
            assert e.score == pytest.approx(float(np.mean(e.heatmap)), rel=1e-4, abs=1e-6)
    # The default is the best-patch view (the SAE trained on patches), as GetSae says.
    sae = stub.GetSae(pb.GetSaeRequest(name=SAE), timeout=10)
    assert sae.default_view == pb.TOP_IMAGES_VIEW_BEST_PATCH
    assert set(sae.views) == {pb.TOP_IMAGES_VIEW_BEST_PATCH, pb.TOP_IMAGES_VIEW_CLS, pb.TOP_IMAGES_VIEW_MEAN}


def test_get_latent_carries_the_activation_histogram(stub, served: Served):
    t, latent = served.table, _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent)), timeout=10)
    assert list(reply.activation_histogram) == t.histogram[latent].tolist()
    assert len(reply.activation_log10_edges) == len(reply.activation_histogram) + 1
    n_tokens = len(served.aset) * served.aset.layout.n_patches
    assert sum(reply.activation_histogram) == round(t.frequency[latent] * n_tokens)


def test_get_latent_carries_band_samples_of_typical_activations(stub, served: Served):
    t, latent = served.table, _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent)), timeout=10)
    assert reply.bands, "the busiest latent has images in some band"
    lows = [b.log10_low for b in reply.bands]
    assert lows == sorted(lows)
    for band in reply.bands:
        assert 0 < len(band.examples) <= t.samples.image.shape[2]
        for e in band.examples:
            assert not e.heatmap and e.source_id == served.aset.image_record(_index(e))["id"]
            inner = band.log10_low > -4 and band.log10_high < 4  # the end bands are open
            if inner:
                assert band.log10_low - 1e-6 <= np.log10(e.score) < band.log10_high + 1e-6


def test_get_latent_lists_the_latents_that_co_fire_with_it(stub, served: Served):
    t, latent = served.table, _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent)), timeout=10)
    want = [int(j) for j in t.cofiring.latent[latent] if j >= 0]
    assert want and [c.latent_index for c in reply.cofiring] == want and latent not in want
    jaccards = [c.jaccard for c in reply.cofiring]
    assert jaccards == sorted(jaccards, reverse=True) and all(0 < j <= 1 for j in jaccards)
    assert all(c.count > 0 for c in reply.cofiring)


def test_encode_image_of_an_upload_agrees_with_the_stored_activations(stub, served: Served):
    """The live path (bytes -> the SAE's ViT, layer and transform -> the SAE) against the
    stored rows of the same dataset image."""
    t = served.table
    latent = _busiest_latent(t)
    image = int(t.top["best_patch"].image[latent, 0])
    path = served.data_root / served.aset.image_record(image)["id"]
    stored = stub.EncodeImage(pb.EncodeImageRequest(sae=SAE, image=_image(served, image)),
                              timeout=30)
    live = stub.EncodeImage(pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image_data=path.read_bytes()),
                                                  top_latents=4), timeout=60)
    assert (live.grid_rows, live.grid_cols) == (stored.grid_rows, stored.grid_cols) == (7, 7)
    assert len(live.patches) == len(stored.patches) == 49 and all(len(p.latents) <= 4 for p in live.patches)
    # The stored path is exactly the SAE on the stored rows.
    sae = load_sae_from(open_store(served.store_uri), SAE_ID)[0]
    codes = sae.encode(served.aset.image_tokens(served.aset.manifest.layers[0], image))
    best = codes[served.aset.layout.patch_start:].amax(dim=0)
    assert [a.latent_index for a in stored.image_latents] == best.topk(len(stored.image_latents)).indices.tolist()
    assert stored.image_latents[0].activation == pytest.approx(float(best.max()))
    assert [a.latent_index for a in stored.cls_latents] == [i for i in codes[0].topk(8).indices.tolist() if codes[0, i] > 0]
    # The live encode agrees with the stored one up to the float16 the set is stored in.
    maps = [stub.GetHeatmap(pb.GetHeatmapRequest(latent=names.latent(SAE_ID, latent), image=source),
                            timeout=60).activation
            for source in (_image(served, image), pb.ImageSource(image_data=path.read_bytes()))]
    np.testing.assert_allclose(maps[1], maps[0], atol=0.02 * max(maps[0]) + 1e-4, rtol=0.02)
    np.testing.assert_allclose(maps[0], codes[served.aset.layout.patch_start:, latent].numpy(), rtol=1e-5, atol=1e-6)
    assert live.image_latents[0].latent_index == stored.image_latents[0].latent_index


def test_an_image_of_another_activation_set_is_encoded_through_the_sae_vit(stub, served: Served, tiny_model_name):
    """Images are addressed through their activation set: one of another set (here the same
    images extracted again with another shard size, so another set id) is loaded from that
    set's dataset and run through the SAE's own ViT, agreeing with the SAE's stored rows."""
    other = extract(ExtractConfig(data=str(served.data_root), store=served.store_uri, model=tiny_model_name,
                                  pretrained=None, layers=(-1,), images_per_shard=16, workers=0, progress=False))
    assert other.set_id != served.set_id
    latent = _busiest_latent(served.table)
    image = int(served.table.top["best_patch"].image[latent, 0])
    maps = [np.asarray(stub.GetHeatmap(pb.GetHeatmapRequest(latent=names.latent(SAE_ID, latent), image=pb.ImageSource(
        image=names.image(set_id, image))), timeout=60).activation) for set_id in (served.set_id, other.set_id)]
    assert maps[0].max() > 0
    np.testing.assert_allclose(maps[1], maps[0], atol=0.02 * maps[0].max() + 1e-4, rtol=0.02)
    encoded = [stub.EncodeImage(pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image=names.image(set_id, image))),
                                timeout=60) for set_id in (served.set_id, other.set_id)]
    assert encoded[1].image_latents[0].latent_index == encoded[0].image_latents[0].latent_index


@pytest.mark.parametrize(("request_", "code"), [
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image_data=b"not an image")), "INVALID_ARGUMENT"),
    (lambda served: pb.EncodeImageRequest(sae=SAE), "INVALID_ARGUMENT"),
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=_image(served, 10**9)), "NOT_FOUND"),
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image_data=_png_bytes(4000, 100))),
     "INVALID_ARGUMENT"),
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=_image(served, 0), top_latents=0), "INVALID_ARGUMENT"),
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image=f"saes/{SAE_ID}/latents/0")),
     "INVALID_ARGUMENT"),
    (lambda served: pb.EncodeImageRequest(sae=SAE, image=pb.ImageSource(image="activationSets/nope/images/0")),
     "NOT_FOUND"),
    (lambda served: pb.EncodeImageRequest(sae="saes/nope", image=_image(served, 0)), "NOT_FOUND"),
    (lambda served: pb.EncodeImageRequest(sae=SAE_ID, image=_image(served, 0)), "INVALID_ARGUMENT"),  # an id, not a name
], ids=["not an image", "no image", "image past the end", "a 40:1 strip", "top_latents 0", "latent name as image",
        "unknown activation set", "unknown sae", "bare id"])
def test_encode_image_refuses_bad_requests_clearly(stub, served: Served, request_, code):
    with pytest.raises(grpc.RpcError) as e:
        stub.EncodeImage(request_(served), timeout=10)
    assert e.value.code().name == code
    assert stub.EncodeImage(pb.EncodeImageRequest(sae=SAE, image=_image(served, 0)),
                            timeout=10).patches  # and a good call still works


def test_a_version_1_analysis_still_loads_and_serves_its_one_view(served: Served, tmp_path):
    """An analysis published before views and histograms: best-patch examples only."""
    import json
    import shutil

    from safetensors.torch import save

    from vitscope.analyzer.results import analysis_prefix

    store_dir = tmp_path / "store"
    shutil.copytree(served.store_uri, store_dir)
    store = open_store(store_dir)
    prefix = analysis_prefix(served.analysis_id)
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    v1 = {k: v for k, v in manifest.items() if k not in ("views", "default_view", "histogram_log10_edges")}
    v1.update(version=1, k=v1.pop("top_images"))
    t, best = served.table, served.table.top["best_patch"]
    tensors = {"frequency": t.frequency, "mean_activation": t.mean_activation, "max_activation": t.max_activation,
               "topk_score": best.score, "topk_image": best.image, "topk_patch": best.patch}
    store.put_bytes(f"{prefix}/stats.safetensors", save({k: torch.from_numpy(v) for k, v in tensors.items()}))
    store.put_bytes(f"{prefix}/manifest.json", json.dumps(v1).encode())
    running = serve(ServeConfig(store=str(store_dir), port=0, workers=2))
    try:
        with grpc.insecure_channel(running.address) as channel:
            old = rpc.AnalyzerStub(channel)
            latent = _busiest_latent(t)
            reply = old.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent)), timeout=10)
            assert [_index(e) for e in reply.examples] == best.image[latent, :K].tolist()
            assert reply.view == pb.TOP_IMAGES_VIEW_BEST_PATCH and not reply.activation_histogram and not reply.bands
            assert not reply.cofiring
            with pytest.raises(grpc.RpcError) as e:
                old.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent), view=pb.TOP_IMAGES_VIEW_CLS),
                              timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no cls view" in e.value.details()
    finally:
        running.stop(grace=None)


def test_empty_top_k_slots_are_skipped(stub, served: Served):
    used = (served.table.top["best_patch"].image >= 0).sum(axis=1)
    partial = int(np.flatnonzero((used > 0) & (used < K))[0])
    dead = int(np.flatnonzero(used == 0)[0])
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, partial), top_images=K), timeout=10)
    assert len(reply.examples) == used[partial] and all(_index(ex) >= 0 for ex in reply.examples)
    assert not stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, dead), heatmaps=True), timeout=10).examples


def test_heatmap_peaks_at_the_stored_best_patch(stub, served: Served):
    latent = _busiest_latent(served.table)
    reply = stub.GetLatent(pb.GetLatentRequest(name=names.latent(SAE_ID, latent), heatmaps=True), timeout=30)
    assert reply.examples
    for ex in reply.examples:
        heatmap = np.asarray(ex.heatmap)
        assert heatmap.shape == (49,)
        assert int(heatmap.argmax()) == ex.patch
        assert heatmap.max() == pytest.approx(ex.score, rel=1e-2)


# --- images ------------------------------------------------------------------------------------
def test_get_image_is_a_png_of_the_model_input_size(stub, served: Served):
    reply = stub.GetImage(pb.GetImageRequest(name=names.image(served.set_id, N_IMAGES - 1)), timeout=10)
    image = Image.open(io.BytesIO(reply.data))
    size = tuple(served.aset.manifest.transform["size"])
    assert image.format == "PNG" and reply.mime_type == "image/png"
    assert image.size == size[::-1] and (reply.width, reply.height) == image.size
    info = served.aset.image_record(N_IMAGES - 1)
    assert (reply.name, reply.source_id, reply.label) == (names.image(served.set_id, N_IMAGES - 1), info["id"], info["label"])


def test_missing_image_file_is_not_found(stub, served: Served):
    path = served.data_root / served.aset.image_record(0)["id"]
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    try:
        assert grpc_code(lambda: stub.GetImage(pb.GetImageRequest(name=names.image(served.set_id, 0)), timeout=10)) \
            == Code.NOT_FOUND
    finally:
        moved.rename(path)
    _alive(stub)


# --- bad requests --------------------------------------------------------------------------------
def _other_query_token(stub) -> str:
    return stub.ListLatents(pb.ListLatentsRequest(parent=SAE, page_size=5, order_by="index"),
                            timeout=10).next_page_token


def _latent(n: int, sae: str = SAE) -> str:
    return f"{sae}/latents/{n}"


BAD_REQUESTS = {
    "unknown sae: GetSae": (lambda s, _: s.GetSae(pb.GetSaeRequest(name="saes/nope")), Code.NOT_FOUND),
    "unknown sae: ListLatents": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent="saes/nope")), Code.NOT_FOUND),
    "unknown sae: GetLatent": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name="saes/nope/latents/0")), Code.NOT_FOUND),
    "unknown set: GetImage": (lambda s, _: s.GetImage(pb.GetImageRequest(name="activationSets/nope/images/0")),
                              Code.NOT_FOUND),
    "empty name": (lambda s, _: s.GetSae(pb.GetSaeRequest()), Code.INVALID_ARGUMENT),
    "bare id as name": (lambda s, _: s.GetSae(pb.GetSaeRequest(name=SAE_ID)), Code.INVALID_ARGUMENT),
    "path in name": (lambda s, _: s.GetSae(pb.GetSaeRequest(name="saes/../saes/x")), Code.INVALID_ARGUMENT),
    "latent name as sae": (lambda s, _: s.GetSae(pb.GetSaeRequest(name=_latent(0))), Code.INVALID_ARGUMENT),
    "sae name as latent": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=SAE)), Code.INVALID_ARGUMENT),
    "latent -1": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(-1))), Code.INVALID_ARGUMENT),
    "latent 07": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=f"{SAE}/latents/07")), Code.INVALID_ARGUMENT),
    "latent d_sae": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(D_SAE))), Code.NOT_FOUND),
    "latent huge": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(10**30))), Code.INVALID_ARGUMENT),
    "latent 10^17": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(10**17))), Code.NOT_FOUND),
    "view unknown": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0), view=99)), Code.INVALID_ARGUMENT),
    "top_images 0": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0), top_images=0)), Code.INVALID_ARGUMENT),
    "top_images -3": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0), top_images=-3)), Code.INVALID_ARGUMENT),
    "top_images huge": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0), top_images=10**6)),
                        Code.INVALID_ARGUMENT),
    "top_images above analysis": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0), top_images=K + 1)),
                                  Code.INVALID_ARGUMENT),
    "garbage token": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, page_token="garbage!")),
                      Code.INVALID_ARGUMENT),
    "token of another query": (
        lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, page_token=_other_query_token(s))),
        Code.INVALID_ARGUMENT),
    "negative page size": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, page_size=-1)),
                           Code.INVALID_ARGUMENT),
    "unknown order field": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, order_by="loudness")),
                            Code.INVALID_ARGUMENT),
    "bad order direction": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, order_by="index up")),
                            Code.INVALID_ARGUMENT),
    "two order fields": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, order_by="index, frequency")),
                         Code.INVALID_ARGUMENT),
    "min above max": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, min_frequency=0.5,
                                                                       max_frequency=0.1)), Code.INVALID_ARGUMENT),
    "negative frequency": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=SAE, min_frequency=-1)),
                           Code.INVALID_ARGUMENT),
    "image -1": (lambda s, served: s.GetImage(pb.GetImageRequest(name=f"activationSets/{served.set_id}/images/-1")),
                 Code.INVALID_ARGUMENT),
    "image past the end": (lambda s, served: s.GetImage(pb.GetImageRequest(name=names.image(served.set_id, N_IMAGES))),
                           Code.NOT_FOUND),
    "not analysed: ListLatents": (lambda s, _: s.ListLatents(pb.ListLatentsRequest(parent=UNANALYSED)),
                                  Code.FAILED_PRECONDITION),
    "not analysed: GetLatent": (lambda s, _: s.GetLatent(pb.GetLatentRequest(name=_latent(0, UNANALYSED))),
                                Code.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(stub, served: Served, name: str):
    call, code = BAD_REQUESTS[name]
    assert grpc_code(lambda: call(stub, served)) == code
    _alive(stub)


def test_unexpected_error_is_internal_and_the_server_keeps_serving(stub, monkeypatch):
    def broken(*_args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(AnalyzerService, "_sae_message", broken)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListSaes(pb.ListSaesRequest(), timeout=10)
    # The message is generic (the exception's text can name internals); the log has the traceback.
    assert err.value.code() == Code.INTERNAL and "disk on fire" not in err.value.details()
    assert err.value.details().startswith("ListSaes failed: internal error (incident ")
    monkeypatch.undo()
    _alive(stub)


def test_unanalysed_sae_still_serves_its_images(stub, served: Served):
    sae = stub.GetSae(pb.GetSaeRequest(name=UNANALYSED), timeout=10)
    assert stub.GetImage(pb.GetImageRequest(name=f"{sae.activation_set}/images/1"), timeout=10).data


def test_tiny_deadline_fails_fast_or_succeeds(stub, served: Served):
    request = pb.GetLatentRequest(name=names.latent(SAE_ID, _busiest_latent(served.table)), heatmaps=True)
    assert grpc_code(lambda: stub.GetLatent(request, timeout=0.001)) in (Code.OK, Code.DEADLINE_EXCEEDED)
    _alive(stub)


# --- auth and TLS --------------------------------------------------------------------------------
@pytest.fixture(params=["config", "env"])
def token_server(request, served: Served, monkeypatch):
    """A server that requires a bearer token, given in its config or in $VITSCOPE_TOKEN."""
    token = "s3cret-token"
    if request.param == "env":
        monkeypatch.setenv("VITSCOPE_TOKEN", token)
    running = serve(ServeConfig(store=served.store_uri, port=0, token=token if request.param == "config" else None))
    yield running, token
    running.stop(grace=None)


def test_bearer_token_auth(token_server):
    running, token = token_server
    with grpc.insecure_channel(running.address) as channel:
        stub = rpc.AnalyzerStub(channel)
        request = pb.GetSaeRequest(name=SAE)
        assert grpc_code(lambda: stub.GetSae(request, timeout=10)) == Code.UNAUTHENTICATED
        wrong = [("authorization", "Bearer not-it")]
        assert grpc_code(lambda: stub.GetSae(request, timeout=10, metadata=wrong)) == Code.UNAUTHENTICATED
        right = [("authorization", f"Bearer {token}")]
        assert stub.GetSae(request, timeout=10, metadata=right).name == SAE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # exempt from auth


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(served: Served, tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    running = serve(ServeConfig(store=served.store_uri, port=0, tls_cert=str(cert), tls_key=str(key)))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(running.address, creds, options=options) as channel:
            assert rpc.AnalyzerStub(channel).GetSae(pb.GetSaeRequest(name=SAE), timeout=10).name == SAE
        with grpc.insecure_channel(running.address) as channel:  # plaintext is refused
            assert grpc_code(lambda: rpc.AnalyzerStub(channel).GetSae(pb.GetSaeRequest(name=SAE), timeout=5)) \
                == Code.UNAVAILABLE
    finally:
        running.stop(grace=None)


def test_tls_needs_both_files(served: Served):
    with pytest.raises(ValueError, match="both"):
        serve(ServeConfig(store=served.store_uri, port=0, tls_cert="cert.pem"))


# --- the real pipeline's output --------------------------------------------------------------------
def test_serves_the_pipeline_run(pipeline, analyzer_server: str):
    """The session's Prefect pipeline run (a trained SAE), through the shared server fixture."""
    with grpc.insecure_channel(analyzer_server) as channel:
        stub = rpc.AnalyzerStub(channel)
        sae = stub.GetSae(pb.GetSaeRequest(name=names.sae(pipeline.sae_id)), timeout=10)
        assert sae.analysis == names.analysis(pipeline.analysis_id)
        assert sae.activation_set == names.activation_set(pipeline.set_id)
        top = stub.ListLatents(pb.ListLatentsRequest(parent=sae.name, page_size=1, order_by="max_activation desc"),
                               timeout=10).latents[0]
        latent = stub.GetLatent(pb.GetLatentRequest(name=top.name, heatmaps=True), timeout=30)
        best = latent.examples[0]
        assert int(np.argmax(best.heatmap)) == best.patch
        assert max(best.heatmap) == pytest.approx(best.score, rel=1e-2)
        image = stub.GetImage(pb.GetImageRequest(name=best.image), timeout=10)
        assert image.name == best.image and image.source_id == best.source_id
        assert (pipeline.data_root / image.source_id).is_file()


def test_search_latents_finds_the_planted_square_from_a_few_examples(pipeline, analyzer_server):
    """Three planted images (their square's patches) against three plain ones: the best match
    is a latent whose top images are planted ones, and each score is explained by its figures."""
    aset = ActivationSet.open(open_store(pipeline.store_uri), pipeline.set_id)
    index = {aset.image_record(i)["id"]: i for i in range(len(aset))}
    planted = [it for it in pipeline.items if it.has_object][:3]
    plain = [it for it in pipeline.items if not it.has_object][:3]
    patch = 16  # the tiny model's patches, on images of its input size

    def region(box):
        left, top, right, bottom = box
        return pb.PatchRegion(row_start=top // patch, col_start=left // patch,
                              row_end=-(-bottom // patch), col_end=-(-right // patch))

    def image(it) -> pb.ImageSource:
        return pb.ImageSource(image=names.image(pipeline.set_id, index[it.id]))

    sae = names.sae(pipeline.sae_id)
    request = pb.SearchLatentsRequest(
        sae=sae, top_latents=5,
        positives=[pb.SearchExample(image=image(it), region=region(it.box)) for it in planted],
        negatives=[pb.SearchExample(image=image(it)) for it in plain])
    with grpc.insecure_channel(analyzer_server) as channel:
        stub = rpc.AnalyzerStub(channel)
        reply = stub.SearchLatents(request, timeout=60)
        assert 0 < len(reply.latents) <= 5
        scores = [m.score for m in reply.latents]
        assert scores == sorted(scores, reverse=True)
        for m in reply.latents:
            assert m.score == pytest.approx(m.positive_mean - m.negative_mean, abs=1e-6)
            assert len(m.positive_activations) == 3 and len(m.negative_activations) == 3
            assert m.positives_fired == sum(a > 0 for a in m.positive_activations) >= 1
        best = reply.latents[0]
        assert best.positives_fired == 3 and best.score > 0.3
        top = stub.GetLatent(pb.GetLatentRequest(name=names.latent(pipeline.sae_id, best.latent_index), top_images=8),
                             timeout=30)
        assert sum(e.label == "square" for e in top.examples) >= 6, [e.label for e in top.examples]
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchLatents(pb.SearchLatentsRequest(sae=sae), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            bad = pb.SearchExample(image=image(planted[0]), region=pb.PatchRegion(row_end=99, col_end=1))
            stub.SearchLatents(pb.SearchLatentsRequest(sae=sae, positives=[bad]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "region" in e.value.details()


def test_list_saes_pages_and_reflection_names_the_services(served: Served):
    running = serve(ServeConfig(store=served.store_uri, port=0, workers=2))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.AnalyzerStub(channel)
            everything = stub.ListSaes(pb.ListSaesRequest(), timeout=10)
            assert everything.total_size == len(everything.saes) == 2 and not everything.next_page_token
            first = stub.ListSaes(pb.ListSaesRequest(page_size=1), timeout=10)
            second = stub.ListSaes(pb.ListSaesRequest(page_size=1, page_token=first.next_page_token), timeout=10)
            assert first.next_page_token and not second.next_page_token
            assert [s.name for s in (*first.saes, *second.saes)] == [s.name for s in everything.saes]
            assert grpc_code(lambda: stub.ListSaes(pb.ListSaesRequest(page_token="garbage"), timeout=10)) \
                == Code.INVALID_ARGUMENT
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                       timeout=10))
            services = {s.name for s in answer.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= services and SERVICE == "vitscope.v2.Analyzer"
    finally:
        running.stop(grace=None)


# --- similar latents ---------------------------------------------------------------------------------
def _unit_rows(store_uri: str, sae_id: str) -> torch.Tensor:
    w = load_sae_from(open_store(store_uri), sae_id)[0].W_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True)


def test_similar_latents_by_decoder_cosine_in_one_space(stub, served: Served):
    latent = _busiest_latent(served.table)
    mine, theirs = _unit_rows(served.store_uri, SAE_ID), _unit_rows(served.store_uri, UNANALYSED_ID)
    same = stub.FindSimilarLatents(pb.FindSimilarLatentsRequest(latent=_latent(latent), top_latents=5), timeout=30)
    assert same.method == pb.SIMILARITY_METHOD_DECODER_COSINE
    cos = mine @ mine[latent]
    cos[latent] = -2  # never itself
    assert [m.latent_index for m in same.latents] == cos.topk(5).indices.tolist()
    assert [m.similarity for m in same.latents] == pytest.approx(cos.topk(5).values.tolist(), abs=1e-6)
    assert all(m.latent == names.latent(SAE_ID, m.latent_index) for m in same.latents)
    # Another SAE on the same activation set and layer shares the space.
    other = stub.FindSimilarLatents(pb.FindSimilarLatentsRequest(latent=_latent(latent), other_sae=UNANALYSED),
                                    timeout=30)
    assert other.method == pb.SIMILARITY_METHOD_DECODER_COSINE and len(other.latents) == 10
    assert [m.latent_index for m in other.latents] == (theirs @ mine[latent]).topk(10).indices.tolist()
    assert all(m.latent.startswith(f"{UNANALYSED}/latents/") for m in other.latents)


def test_similar_latents_across_spaces_by_co_firing_on_the_same_images(stub, served: Served, tiny_model_name):
    """An SAE on another layer reads another space: its latents are matched by the sampled
    images both fire on, which the test recomputes from the other layer's stored activations."""
    from vitscope.analyzer.server import COFIRING_IMAGES

    res = extract(ExtractConfig(data=str(served.data_root), store=served.store_uri, model=tiny_model_name,
                                pretrained=None, layers=(-2,), images_per_shard=8, workers=0, progress=False))
    store = open_store(served.store_uri)
    aset = ActivationSet.open(store, res.set_id)
    layer = aset.manifest.layers[0]
    assert layer != served.aset.manifest.layers[0]
    patches = torch.cat([from_storage(a[:, aset.layout.patch_start:], aset.manifest.dtype).flatten(0, 1)
                         for _, a in aset.iter_shards(layer)])
    other_id = "test-other-layer"
    save_sae(store, _random_sae(patches, seed=5), SaeRecord(
        sae_id=other_id, config=SaeConfig.of("relu", patches.shape[1], D_SAE), activation_set_id=res.set_id,
        layer=layer, tokens=["patches"], metrics={}))
    latent = _busiest_latent(served.table)
    reply = stub.FindSimilarLatents(pb.FindSimilarLatentsRequest(latent=_latent(latent), other_sae=names.sae(other_id),
                                                                 top_latents=100), timeout=120)
    assert reply.method == pb.SIMILARITY_METHOD_COFIRING and reply.sampled_images == min(N_IMAGES, COFIRING_IMAGES)

    images = sorted({int(i) for i in np.linspace(0, N_IMAGES - 1, reply.sampled_images)})
    start = served.aset.layout.patch_start

    def firing(sae_id: str, a: ActivationSet, at: int) -> torch.Tensor:
        sae = load_sae_from(store, sae_id)[0]
        return torch.stack([sae.encode(a.image_tokens(at, i))[start:].amax(dim=0) > 0 for i in images])

    mine = firing(SAE_ID, served.aset, served.aset.manifest.layers[0])[:, latent]
    theirs = firing(other_id, aset, layer)
    jaccard = (theirs & mine[:, None]).sum(0) / (theirs | mine[:, None]).sum(0).clamp_min(1)
    got = {m.latent_index: m.similarity for m in reply.latents}
    assert got and all(s > 0 for s in got.values())
    # The live path (the other SAE's ViT on these images) against float16 stored rows: a
    # latent on the edge of firing may flip, so compare the clear cases.
    expected = {i: float(j) for i, j in enumerate(jaccard) if j > 0}
    agree = [i for i in got if i in expected and abs(got[i] - expected[i]) < 1e-6]
    assert len(agree) >= 0.9 * len(got), (got, expected)
    assert list(got.values()) == sorted(got.values(), reverse=True)


# --- labels ------------------------------------------------------------------------------------------
def _update(stub, latent: int, text: str, etag: str, notes: str = "", author: str = "ada", sae: str = SAE):
    label = pb.LatentLabel(name=f"{sae}/latents/{latent}/label", text=text, notes=notes, author=author)
    return stub.UpdateLatentLabel(pb.UpdateLatentLabelRequest(label=label, etag=etag), timeout=10)


def test_a_label_is_written_read_versioned_and_refused_when_stale(stub, served: Served):
    name = f"{SAE}/latents/3/label"
    empty = stub.GetLatentLabel(pb.GetLatentLabelRequest(name=name), timeout=10)
    assert (empty.name, empty.text, empty.revision, empty.etag) == (name, "", 0, "")
    first = _update(stub, 3, "  birds with black eye markings ", "", notes="seen in top 16", author="ada")
    assert (first.text, first.notes, first.author, first.revision) == ("birds with black eye markings", "seen in top 16",
                                                                       "ada", 1)
    assert first.etag and first.update_time.seconds > 0
    # A second browser that read the empty label cannot overwrite the first one's.
    assert grpc_code(lambda: _update(stub, 3, "something else", "")) == Code.ABORTED
    second = _update(stub, 3, "bird eye markings", first.etag, author="grace")
    assert second.revision == 2 and grpc_code(lambda: _update(stub, 3, "again", first.etag)) == Code.ABORTED
    assert stub.GetLatentLabel(pb.GetLatentLabelRequest(name=name), timeout=10) == second
    history = stub.ListLatentLabelRevisions(pb.ListLatentLabelRevisionsRequest(name=name), timeout=10)
    assert [r.text for r in history.labels] == ["bird eye markings", "birds with black eye markings"]
    assert history.total_size == 2
    # Shown with the latent, in the latent table, and found by text.
    assert stub.GetLatent(pb.GetLatentRequest(name=_latent(3)), timeout=10).label == second
    listed = stub.ListLatents(pb.ListLatentsRequest(parent=SAE, order_by="index", page_size=5), timeout=10).latents
    assert listed[3].label == second and not listed[2].HasField("label")
    for query, found in (("EYE", [3]), ("bird markings", [3]), ("wing", []), ("*", [3])):
        page = stub.ListLatents(pb.ListLatentsRequest(parent=SAE, label_query=query, page_size=1000), timeout=10)
        assert [x.index for x in page.latents if x.index == 3] == found, query
    # Kept in the store: a fresh server reads it back.
    running = serve(ServeConfig(store=served.store_uri, port=0, workers=2))
    try:
        with grpc.insecure_channel(running.address) as channel:
            again = rpc.AnalyzerStub(channel).GetLatentLabel(pb.GetLatentLabelRequest(name=name), timeout=10)
        assert again == second
    finally:
        running.stop(grace=None)


def test_two_writers_racing_on_one_latent_lose_no_write(stub, served: Served):
    """Eight clients update latent 5 from the same revision at once: one wins, the others are
    told (ABORTED) and retry from what they then read, until every edit is a revision."""
    from concurrent.futures import ThreadPoolExecutor

    base = _update(stub, 5, "start", stub.GetLatentLabel(pb.GetLatentLabelRequest(name=f"{SAE}/latents/5/label"),
                                                         timeout=10).etag)
    aborted = []

    def writer(n: int) -> None:
        etag = base.etag
        while True:
            try:
                _update(stub, 5, f"edit {n}", etag, author=f"writer {n}")
                return
            except grpc.RpcError as e:
                assert e.code() == Code.ABORTED, e
                aborted.append(n)
                etag = stub.GetLatentLabel(pb.GetLatentLabelRequest(name=f"{SAE}/latents/5/label"), timeout=10).etag

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    history = stub.ListLatentLabelRevisions(pb.ListLatentLabelRevisionsRequest(name=f"{SAE}/latents/5/label"),
                                            timeout=10)
    assert sorted(r.text for r in history.labels[:8]) == sorted(f"edit {n}" for n in range(8))
    assert [r.revision for r in history.labels] == list(range(base.revision + 8, 0, -1))
    assert aborted  # they did race


@pytest.mark.parametrize(("label", "code"), [
    (dict(text="x" * 201), Code.INVALID_ARGUMENT),
    (dict(text="ok", notes="n" * 4001), Code.INVALID_ARGUMENT),
    (dict(text="ok", author="a" * 101), Code.INVALID_ARGUMENT),
    (dict(text="ok", name=f"{SAE}/latents/{D_SAE}/label"), Code.NOT_FOUND),
    (dict(text="ok", name=f"{SAE}/latents/1"), Code.INVALID_ARGUMENT),
    (dict(text="ok", name="saes/nope/latents/1/label"), Code.NOT_FOUND),
], ids=["text too long", "notes too long", "author too long", "latent out of range", "latent name", "unknown sae"])
def test_bad_labels_are_refused(stub, label, code):
    msg = pb.LatentLabel(**{"name": f"{SAE}/latents/9/label", **label})
    assert grpc_code(lambda: stub.UpdateLatentLabel(pb.UpdateLatentLabelRequest(label=msg), timeout=10)) == code
    assert stub.GetLatentLabel(pb.GetLatentLabelRequest(name=f"{SAE}/latents/9/label"), timeout=10).revision == 0
