"""`vitscope evaluate` end to end on the pipeline's tiny CLIP and planted-square images: the
report's figures pinned down by SAEs whose answer is known (an identity, a zero map, a random
initialisation, a permuted copy, true directions), the splice and interventions, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vitscope.evaluator import EvaluateConfig, evaluate
from vitscope.evaluator.evaluation import EvaluationError, spread
from vitscope.groundtruth import GroundTruth, write_ground_truth_set
from vitscope.models import load_vit
from vitscope.reports import (
    FORMAT,
    VERSION,
    ReportFormatError,
    list_reports,
    load_plot,
    load_report,
    report_prefix,
)
from vitscope.sae import SaeConfig, SaeRecord, build_sae, load_sae_from, save_sae
from vitscope.splice import Splice, intervene
from vitscope.store import LocalStore, open_store

IMAGES = 96


@pytest.fixture(scope="module")
def store_uri(pipeline, tmp_path_factory) -> str:
    """A copy of the pipeline's store: this module publishes SAEs, sets and reports, and other
    tests count the shared store's."""
    import shutil

    copy = tmp_path_factory.mktemp("evaluation") / "store"
    shutil.copytree(pipeline.store_uri, copy)
    return str(copy)


def _cfg(store_uri: str, sae_id: str, **kw) -> EvaluateConfig:
    return EvaluateConfig(**({"sae": sae_id, "store": store_uri, "images": IMAGES, "device": "cpu",
                              "progress": False} | kw))


def _publish(store, like: SaeRecord, sae, sae_id: str) -> str:
    save_sae(store, sae, dataclasses.replace(like, sae_id=sae_id, metrics={}, histogram={}, extra={}))
    return sae_id


def _identity_sae(d: int):
    """A ReLU 'SAE' whose reconstruction is its input, bit for bit: codes relu(x), relu(-x)."""
    sae = build_sae(SaeConfig.of("relu", d, 2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.norm_mean.zero_()
        sae.norm_scale.fill_(1.0)
    return sae.eval()


@pytest.fixture(scope="module")
def layer0(pipeline, store_uri, tmp_path_factory):
    """Planted squares on the patch grid (so every patch is plainly on or off the square)
    extracted at the tiny ViT's first block (the pipeline's own SAE reads the last block's
    patches, which a CLS-pooled model's embedding never sees), and an SAE trained there as the
    pipeline trains: (store, SAE id)."""
    from support import TINY_IMAGE, TINY_SQUARE, extract_config

    from vitscope.extractor import extract
    from vitscope.synthetic import make_planted_dataset
    from vitscope.trainer import train, train_config

    root = tmp_path_factory.mktemp("aligned") / "images"
    make_planted_dataset(root, n_images=IMAGES, size=TINY_IMAGE, square=TINY_SQUARE, seed=2, align=16)
    set_id = extract(extract_config(root, store_uri, pipeline.model_name, layers=(0,),
                                    images_per_shard=16)).set_id
    cfg = train_config({"activations": set_id, "store": store_uri, "expansion": 8, "l1_coeff": 3.0,
                        "lr": 1e-3, "batch_size": 1024, "n_tokens": 300_000, "progress": False, "device": "cpu"})
    return open_store(store_uri), train(cfg).sae_id


@pytest.fixture(scope="module")
def known(layer0):
    """The layer-0 SAE, and beside it an identity, a zero map, a random initialisation and a
    latent-permuted copy of it, each published."""
    store, trained_id = layer0
    trained, record = load_sae_from(store, trained_id)
    d = trained.cfg.d_in
    ids = {"trained": trained_id, "identity": _publish(store, record, _identity_sae(d), "identitysae")}
    zero = _identity_sae(d)
    with torch.no_grad():
        zero.W_dec.zero_()
    ids["zero"] = _publish(store, record, zero, "zerosae")
    torch.manual_seed(7)
    rand = build_sae(trained.cfg)
    rand.load_state_dict({**rand.state_dict(), "norm_mean": trained.norm_mean, "norm_scale": trained.norm_scale})
    ids["random"] = _publish(store, record, rand, "randomsae")
    perm = build_sae(trained.cfg)
    order = torch.randperm(trained.cfg.d_sae, generator=torch.Generator().manual_seed(3))
    state = trained.state_dict()
    perm.load_state_dict({**state, "W_dec": state["W_dec"][order], "W_enc": state["W_enc"][:, order],
                          "b_enc": state["b_enc"][order]})
    ids["permuted"] = _publish(store, record, perm, "permutedsae")
    return ids


@pytest.fixture(scope="module")
def reports(store_uri, known):
    return {name: evaluate(_cfg(store_uri, sae_id, compare=(known["permuted"], known["random"])
                                if name == "trained" else ())).report
            for name, sae_id in known.items()}


def test_identity_recovers_everything_and_zero_recovers_nothing(reports):
    ident, zero = reports["identity"], reports["zero"]
    assert ident["reconstruction"]["nmse"] == pytest.approx(0.0, abs=1e-12)
    assert ident["reconstruction"]["shrinkage"] == pytest.approx(1.0, abs=1e-12)
    for readout in ("linear_probe", "zero_shot"):
        for metric in ("accuracy", "log_likelihood"):
            scores = ident["substitution"][readout][metric]
            assert scores["sae"] == scores["clean"]  # the spliced network is the network
            if scores["clean"] != scores["ablated"]:
                assert scores["recovered"] == 1.0
            z = zero["substitution"][readout][metric]
            assert z["sae"] == z["ablated"]  # a zero reconstruction is the zero ablation
            if z["clean"] != z["ablated"]:
                assert z["recovered"] == 0.0
    assert ident["substitution"]["cosine_sae"] == pytest.approx(1.0, abs=1e-6)
    # the probe's readout does move when the layer is ablated, so the two checks above bite
    assert ident["substitution"]["linear_probe"]["log_likelihood"]["ablated"] != \
        ident["substitution"]["linear_probe"]["log_likelihood"]["clean"]


def test_a_trained_sae_beats_a_random_one(reports):
    trained, rand = reports["trained"], reports["random"]
    assert trained["reconstruction"]["nmse"] < 0.5 * rand["reconstruction"]["nmse"]
    assert trained["substitution"]["cosine_sae"] > rand["substitution"]["cosine_sae"]
    t, r = (x["substitution"]["linear_probe"]["log_likelihood"]["recovered"] for x in (trained, rand))
    assert t > r
    t, r = (x["substitution"]["linear_probe"]["accuracy"]["recovered"] for x in (trained, rand))
    assert t > r + 0.1
    # sparse probes read a few latents, which is where a trained SAE's concepts show (a dense
    # probe on 48 images is within noise of chance for both)
    assert trained["probing"]["sparse"]["ap_k5"] > rand["probing"]["sparse"]["ap_k5"] + 0.05


def test_the_planted_latent_aligns_with_the_square_patches_better_than_pca(reports):
    align = reports["trained"]["label_alignment"]
    obj = align["classes"].index("object")
    assert align["class_patches"][obj] > 0 and sum(align["class_patches"]) == align["patches"]
    assert align["sae"]["ap"][obj] >= 0.9
    assert align["pca"]["ap"][obj] < align["sae"]["ap"][obj]
    assert align["sae"]["map"] == align["sae"]["ap"][obj]  # background is not scored
    assert 0.0 <= align["kmeans"]["map"] <= 1.0


def test_stability_of_a_permuted_copy_is_one_and_of_a_random_sae_is_low(reports, known):
    by_id = {s["sae_id"]: s for s in reports["trained"]["stability"]}
    assert by_id[known["permuted"]]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert by_id[known["permuted"]]["share_above_0_9"] == 1.0
    assert by_id[known["random"]]["mean_cosine"] < 0.5
    assert reports["identity"]["stability"] == {"skipped": "no other seeds given (--compare)"}


def test_the_report_is_versioned_self_describing_and_reused(store_uri, known, reports):
    store = open_store(store_uri)
    rep = reports["trained"]
    assert rep["format"] == FORMAT and rep["version"] == VERSION
    assert rep["split"] == "training" and rep["activation_set_id"] == rep["trained_on"]
    assert rep["images"] == IMAGES and rep["reconstruction"]["n_tokens"] == IMAGES * 49
    assert {"sparsity", "substitution", "label_alignment"} <= set(rep["plots"])
    assert load_plot(store, rep["report_id"], "sparsity")[:8] == b"\x89PNG\r\n\x1a\n"
    again = evaluate(_cfg(store_uri, known["trained"], compare=(known["permuted"], known["random"])))
    assert again.reused and again.report == rep
    assert rep["report_id"] in {r["report_id"] for r in list_reports(store, known["trained"])}
    # a report of a version this code does not read says what to do
    key = f"{report_prefix(rep['report_id'])}/report.json"
    future = json.loads(store.get_bytes(key)) | {"version": VERSION + 1}
    store.put_bytes(key, json.dumps(future).encode())
    try:
        with pytest.raises(ReportFormatError, match="rerun `vitscope evaluate`"):
            load_report(store, rep["report_id"])
    finally:
        store.put_bytes(key, json.dumps(rep).encode())


def test_the_pipeline_evaluated_its_sae(pipeline):
    rep = load_report(open_store(pipeline.store_uri), pipeline.report_id)
    assert rep["sae_id"] == pipeline.sae_id and rep["split"] == "training"
    sub = rep["substitution"]
    assert sub["zero_shot"]["classes"] == ["plain", "square"]
    # its SAE reads the last block's patches, which the CLS-pooled embedding never sees: said so
    assert "do not reach the readout" in sub["note"] and sub["cosine_ablated"] == 1.0


def test_a_heldout_set_is_evaluated_on_and_one_of_another_model_is_refused(pipeline, store_uri, tmp_path):
    from support import extract_config, tiny_model

    from vitscope.extractor import extract
    from vitscope.synthetic import make_planted_dataset

    store = open_store(store_uri)
    manifest = json.loads(store.get_bytes(f"activations/{pipeline.set_id}/manifest.json"))
    held_root = tmp_path / "heldout"
    make_planted_dataset(held_root, n_images=12, size=112, square=32, seed=5)
    cfg = extract_config(held_root, store_uri, pipeline.model_name, layers=tuple(manifest["layers"]))
    held = extract(cfg).set_id
    rep = evaluate(_cfg(store_uri, pipeline.sae_id, heldout=held)).report
    assert rep["split"] == "held-out" and rep["activation_set_id"] == held and rep["images"] == 12
    other = extract(dataclasses.replace(cfg, model=tiny_model(tmp_path / "other-model", seed=9))).set_id
    with pytest.raises(EvaluationError, match="same model"):
        evaluate(_cfg(store_uri, pipeline.sae_id, heldout=other))


def test_ground_truth_directions_are_recovered_by_a_decoder_made_of_them(tmp_path):
    store = LocalStore(tmp_path / "store")
    gt = GroundTruth(d_model=16, n_directions=24, n_images=8, images_per_shard=8)
    m = write_ground_truth_set(store, gt)
    sae = build_sae(SaeConfig.of("relu", 16, 24))
    with torch.no_grad():
        sae.W_dec.copy_(gt.directions(0))
        sae.W_enc.copy_(gt.directions(0).T)
    save_sae(store, sae, SaeRecord(sae_id="gtsae", config=sae.cfg, activation_set_id=m.set_id, layer=0,
                                   tokens=["patches"]))
    rep = evaluate(EvaluateConfig(sae="gtsae", store=str(store.root), images=8, device="cpu", progress=False)).report
    assert rep["ground_truth"]["recovery_at_0.9"] == 1.0
    assert rep["ground_truth"]["mean_best_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rep["substitution"] == {"skipped": "a synthetic activation set: no images"}
    assert rep["probing"]["skipped"] and rep["label_alignment"]["skipped"]


def test_interventions_change_only_what_they_touch(layer0):
    from vitscope.datasets import load_image_by_id
    from vitscope.shards import ActivationSet

    store, sae_id = layer0
    sae, record = load_sae_from(store, sae_id)
    aset = ActivationSet.open(store, record.activation_set_id)
    vit = load_vit(record.model_spec())
    image = load_image_by_id(aset.manifest.dataset, aset.image_record(1)["id"])  # odd images carry a square
    pixels = vit.preprocess(image)
    clean = vit.embed(pixels)
    splice = Splice.of(vit, sae, record)
    # no latent changed: the SAE's error term puts the tokens back as they were
    assert torch.allclose(splice.embed(pixels, splice.steer({})), clean, atol=1e-4)
    codes = sae.encode(vit.activations(pixels, record.layer)[record.layer][:, 1:])
    firing = int(codes.amax(dim=1).argmax())
    silent = int((codes.amax(dim=(0, 1)) == 0).nonzero()[0])
    out = intervene(vit, sae, record, pixels, {silent: 5.0})
    assert torch.allclose(out["after"], out["before"], atol=1e-5)  # scaling a silent latent does nothing
    # ablating the strongest latent moves the embedding; pushing it 9x as far moves it further
    ablated = intervene(vit, sae, record, pixels, {firing: 0.0})
    pushed = intervene(vit, sae, record, pixels, {firing: 10.0})
    assert 0 < 1 - float(ablated["cosine"][0]) < 1 - float(pushed["cosine"][0])
    assert ablated["change"].norm() < pushed["change"].norm()
    with pytest.raises(ValueError, match="do not exist"):
        intervene(vit, sae, record, pixels, {sae.cfg.d_sae: 0.0})


def test_the_evaluation_page_runs(layer0, known):
    from test_python_api import DOCS, run_blocks

    from vitscope.datasets import load_image_by_id
    from vitscope.shards import ActivationSet

    # the identity SAE: the trained one's newest report is served below, and for the identity
    # ablating a latent (one side of one dimension) surely moves the embedding
    store, sae_id = layer0[0], known["identity"]
    aset = ActivationSet.open(store, load_sae_from(store, sae_id)[1].activation_set_id)
    image = load_image_by_id(aset.manifest.dataset, aset.image_record(1)["id"])
    ns = run_blocks(DOCS / "evaluation.md", {"store": str(store.root), "sae_id": sae_id, "heldout": None,
                                              "image": image})
    assert ns["report"]["sae_id"] == sae_id and ns["recovered"] == \
        ns["report"]["substitution"]["linear_probe"]["accuracy"]["recovered"]
    assert ns["moved"].shape == (1,) and float(ns["moved"][0]) > 1e-6


def test_the_cli_evaluates_and_prints_the_report_id(layer0, known, capsys):
    from vitscope.composition.cli import main

    store, sae_id = layer0[0], known["random"]  # not the trained SAE: its newest report is served below
    args = ["evaluate", "--sae", sae_id, "--store", str(store.root), "--images", "6", "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    rid = capsys.readouterr().out.strip().splitlines()[-1]
    rep = load_report(store, rid)
    assert rep["sae_id"] == sae_id and rep["images"] == 6 and rep["settings"]["images"] == 6


def test_spread_picks_images_evenly_and_never_twice():
    assert spread(10, 4).tolist() == [0, 3, 6, 9]
    assert spread(3, 10).tolist() == [0, 1, 2]
    assert spread(0, 5).tolist() == []


def test_the_pipelines_evaluation_is_a_prefect_artifact(pipeline):
    import asyncio

    from prefect.client.orchestration import get_client

    async def latest_artifacts():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    rid = pipeline.report_id
    mine = [a for a in asyncio.run(latest_artifacts()) if a.key == f"evaluation-{rid[:12]}"]
    assert mine, "the evaluate task published no artifact"
    text = str(mine[0].data)
    assert pipeline.sae_id in text and f"evaluations/{rid}/report.json" in text and "| NMSE |" in text


# --- the analyzer serves reports and steering -------------------------------------------------


@pytest.fixture(scope="module")
def served_stub(store_uri, reports):
    import grpc

    from vitscope.analyzer import ServeConfig, serve
    from vitscope.proto import rpc

    server = serve(ServeConfig(store=store_uri, port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield rpc.AnalyzerStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_get_evaluation_serves_the_newest_report_and_its_plots(served_stub, known, reports):
    import grpc
    from support import grpc_code

    from vitscope.proto import names, pb

    got = served_stub.GetEvaluation(pb.GetEvaluationRequest(name=names.evaluation(known["trained"])))
    assert got.name == f"saes/{known['trained']}/evaluation"
    assert json.loads(got.report_json) == reports["trained"] and got.report_id == reports["trained"]["report_id"]
    assert sorted(p.name for p in got.plots) == reports["trained"]["plots"]
    assert all(p.png.startswith(b"\x89PNG") for p in got.plots)
    assert grpc_code(lambda: served_stub.GetEvaluation(pb.GetEvaluationRequest(name="saes/nosuchsae/evaluation"))) \
        == grpc.StatusCode.NOT_FOUND
    assert grpc_code(lambda: served_stub.GetEvaluation(pb.GetEvaluationRequest(name=f"saes/{known['trained']}"))) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_steer_latents_reads_the_zero_shot_change_and_refuses_bad_requests(served_stub, layer0):
    import grpc
    from support import grpc_code

    from vitscope.proto import names, pb
    from vitscope.shards import ActivationSet

    store, sae_id = layer0
    sae, record = load_sae_from(store, sae_id)
    aset = ActivationSet.open(store, record.activation_set_id)
    image = pb.ImageSource(image=names.image(aset.manifest.set_id, 1))
    codes = sae.encode(aset.image_tokens(record.layer, 1)[1:])
    firing = int(codes.amax(dim=0).argmax())

    def steer(scales: dict[int, float]) -> pb.SteerLatentsResponse:
        return served_stub.SteerLatents(pb.SteerLatentsRequest(
            sae=names.sae(sae_id), image=image,
            scales=[pb.LatentScale(latent_index=k, factor=v) for k, v in scales.items()]), timeout=120)

    same = steer({firing: 1.0})
    assert same.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    assert [c.label for c in same.classes] and {c.label for c in same.classes} == {"plain", "square"}
    assert sum(c.before for c in same.classes) == pytest.approx(1.0, abs=1e-4)
    assert all(c.before == pytest.approx(c.after, abs=1e-4) for c in same.classes)
    assert [c.before for c in same.classes] == sorted((c.before for c in same.classes), reverse=True)
    pushed = steer({firing: 20.0})
    assert pushed.embedding_cosine < 1 - 1e-4
    assert max(abs(c.after - c.before) for c in pushed.classes) > 0
    for bad in ({}, {sae.cfg.d_sae: 0.0}, {firing: 1000.0}):
        assert grpc_code(lambda b=bad: steer(b)) == grpc.StatusCode.INVALID_ARGUMENT
    twice = pb.SteerLatentsRequest(sae=names.sae(sae_id), image=image,
                                   scales=[pb.LatentScale(latent_index=firing, factor=0)] * 2)
    assert grpc_code(lambda: served_stub.SteerLatents(twice)) == grpc.StatusCode.INVALID_ARGUMENT


# --- the explorer shows reports and steers latents --------------------------------------------


def test_the_sae_page_shows_the_evaluation_report(explorer_app, explorer_target, explorer_client, pipeline,
                                                  sweep_store):
    from support import no_problems

    from vitscope.reports import headline

    at = explorer_app(explorer_target, sae=pipeline.sae_id).run()
    no_problems(at)
    report = json.loads(explorer_client.get_evaluation(pipeline.sae_id).report_json)
    (table,) = at.table
    shown = dict(zip(table.value["measure"], table.value["value"], strict=True))
    assert shown == dict(headline(report)) and shown["NMSE"] == f"{report['reconstruction']['nmse']:.4g}"
    captions = [i.caption for img in at.image for i in img.proto.imgs]
    assert captions == [name.replace("_", " ") for name in report["plots"]]
    assert any(report["report_id"] in c.value for c in at.caption)
    assert any("do not reach the readout" in c.value for c in at.caption)  # its substitution note
    # an SAE never evaluated says how to evaluate it
    at.sidebar.selectbox(key="sae").set_value(sweep_store[1]).run()
    assert not at.exception and any(f"vitscope evaluate --sae {sweep_store[1]}" in i.value for i in at.info)


def test_the_probe_steers_a_latent_and_shows_the_classes(explorer_app, explorer_target, pipeline):
    at = explorer_app(explorer_target, sae=pipeline.sae_id).run()
    at.switch_page("views/probe.py").run()
    assert not at.exception
    at.number_input(key="probe_steer_factor").set_value(5.0).run()
    at.button(key="probe_steer").click().run()
    assert not at.exception and not at.error
    cosine = next(m for m in at.metric if m.label.startswith("Cosine of the final embeddings"))
    assert 0.0 <= float(cosine.value) <= 1.00001
    (classes,) = at.dataframe
    assert set(classes.value["class"]) == {"plain", "square"}
    assert classes.value["before"].sum() == pytest.approx(1.0, abs=1e-4)


def test_segmentation_masks_label_the_patches(layer0, store_uri, reports):
    """Masks drawn from the planted boxes (for every other image only: the rest have none) give
    the same patches the planted boxes give, under the masks' own class names."""
    from PIL import Image

    from vitscope.shards import ActivationSet

    store, sae_id = layer0
    record = load_sae_from(store, sae_id)[1]
    aset = ActivationSet.open(store, record.activation_set_id)
    root = Path(aset.manifest.dataset["root"])
    masks = root.parent / "masks"
    items = json.loads((root.parent / f"{root.name}.planted.json").read_text())
    for n, item in enumerate(items):
        if n % 4 >= 2:
            continue  # no mask: the image is left out of label alignment
        mask = Image.new("L", (112, 112), 0)
        if item["box"]:
            mask.paste(1, tuple(item["box"]))
        (masks / item["id"]).parent.mkdir(parents=True, exist_ok=True)
        mask.save((masks / item["id"]).with_suffix(".png"))
    (masks / "classes.txt").write_text("background\nred square\n")
    rep = evaluate(_cfg(store_uri, sae_id, masks=str(masks))).report["label_alignment"]
    boxes = reports["trained"]["label_alignment"]
    assert rep["classes"] == ["background", "red square"] and rep["source"] == f"masks in {masks}"
    assert rep["patches"] == 49 * len(items[::4]) * 2 and 0 < rep["class_patches"][1] < boxes["class_patches"][1]
    assert rep["sae"]["ap"][1] >= 0.9 and rep["sae"]["ap"][1] > rep["pca"]["ap"][1]
    (masks / "classes.txt").write_text("background\n")
    with pytest.raises(ValueError, match="two or more"):
        evaluate(_cfg(store_uri, sae_id, masks=str(masks), seed=1))
