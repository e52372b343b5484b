"""Sweeps in one data pass, the resumable stream, failure modes and the ground-truth check,
on synthetic activation sets written in the real shard format."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from vitscope.groundtruth import GroundTruth, recovery, write_ground_truth_set
from vitscope.sae import ReluHyper, TopKHyper, load_record, load_sae_from
from vitscope.shards import ActivationSet
from vitscope.store import LocalStore, open_store
from vitscope.trainer import checkpoint
from vitscope.trainer.config import ConfigError, SweepConfig, sweep_configs, train_config
from vitscope.trainer.stream import TokenStream
from vitscope.trainer.training import SaeTrainer, TrainConfig, TrainingError, plan_saes, train, train_sweep

TWO_LAYERS = GroundTruth(d_model=16, n_directions=32, active=3, n_images=96, grid=(3, 3), images_per_shard=20,
                         layers=(4, 7))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny SAEs run several times faster on one thread than on two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gt_set(tmp_path_factory):
    """A two-layer set: 96 images of 10 tokens in 5 shards (the last one short)."""
    root = tmp_path_factory.mktemp("gt-store")
    m = write_ground_truth_set(LocalStore(root), TWO_LAYERS)
    return root, m.set_id


def base(store, set_id, **kw) -> TrainConfig:
    cfg = dict(activations=set_id, store=str(store), tokens=("all",), expansion=2, batch_size=64, n_tokens=640,
               buffer_tokens=256, chunk_tokens=40, init_sample=2000, eval_tokens=512, progress=False)
    return train_config(cfg | kw)


def weights(store, sae_id):
    sae, _ = load_sae_from(open_store(store), sae_id)
    return sae.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# --- sweep files ---------------------------------------------------------------------------

def test_sweep_file_toml_and_yaml_cross_entries_with_grid(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text('activations = "abc"\nvariant = "topk"\nn_tokens = 1e6\nseed = 3\n'
                    '[grid]\nk = [8, 16]\nlayer = [4, 7]\n'
                    '[[sae]]\nlr = 1e-3\n[[sae]]\nvariant = "relu"\nl1_coeff = 2.0\n')
    cfgs = sweep_configs(SweepConfig(file=str(toml), set=("store=/tmp/s",)))
    # The k axis crosses the family that has k; relu has none, so it is crossed with layer only.
    assert len(cfgs) == 6
    assert {(c.variant, getattr(c.sae, "k", None), c.layer) for c in cfgs} == (
        {("topk", k, layer) for k in (8, 16) for layer in (4, 7)} | {("relu", None, layer) for layer in (4, 7)})
    assert {c.sae.l1_coeff for c in cfgs if c.variant == "relu"} == {2.0}
    assert all(c.n_tokens == 1_000_000 and isinstance(c.n_tokens, int) and c.store == "/tmp/s" for c in cfgs)
    assert all(c.resolved_data_seed == 3 for c in cfgs)
    yaml = tmp_path / "sweep.yaml"
    yaml.write_text("activations: abc\ntokens: [cls, patches]\nsae:\n  - {variant: topk, k: 32, seed: 1}\n"
                    "  - {variant: batchtopk, k: 32, seed: 2}\n")
    cfgs = sweep_configs(SweepConfig(file=str(yaml), grid=("lr=1e-4,4e-4",)))
    assert [(c.variant, c.seed, c.lr) for c in cfgs] == [
        ("topk", 1, 1e-4), ("topk", 1, 4e-4), ("batchtopk", 2, 1e-4), ("batchtopk", 2, 4e-4)]
    assert all(c.tokens == ("cls", "patches") and c.resolved_data_seed == 0 for c in cfgs)  # one data order
    with pytest.raises(ValueError, match="'batch_size' is shared by the whole sweep"):
        sweep_configs(SweepConfig(set=("activations=abc",), grid=("batch_size=1,2",)))
    with pytest.raises(ValueError, match="unknown setting 'kk'"):
        sweep_configs(SweepConfig(set=("activations=abc",), grid=("kk=1,2",)))
    with pytest.raises(ValueError, match="names no activation set"):
        sweep_configs(SweepConfig(grid=("k=1,2",)))
    # A family's setting: refused for an SAE of another family, or a sweep with none of its family.
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text("activations: abc\nsae:\n  - {variant: topk, l1_coeff: 1.0}\n")
    with pytest.raises(ConfigError, match="l1_coeff is not a setting of topk SAEs"):
        sweep_configs(SweepConfig(file=str(foreign)))
    with pytest.raises(ConfigError, match="no SAE of this sweep is of a family with k"):
        sweep_configs(SweepConfig(set=("activations=abc",), grid=("k=1,2",)))


def test_the_id_hashes_every_hyper_parameter_of_the_family(gt_set):
    store, set_id = gt_set
    ids = {}
    for name, cfg in {
        "topk": base(store, set_id, variant="topk", k=4),
        "topk k": base(store, set_id, variant="topk", k=5),
        "topk aux": base(store, set_id, variant="topk", k=4, aux_coeff=0.5),
        "batchtopk": base(store, set_id, variant="batchtopk", k=4),
        "relu": base(store, set_id),
        "relu l1": base(store, set_id, l1_coeff=1.0),
        "relu seed": base(store, set_id, seed=1, data_seed=0),
        "relu data seed": base(store, set_id, data_seed=1),
        "relu layer": base(store, set_id, layer=4),
    }.items():
        ids[name] = plan_saes([cfg], ActivationSet.open(open_store(store), set_id), 640)[0].sae_id
    assert len(set(ids.values())) == len(ids)
    # Execution choices do not change what is trained; a setting the family does not have is refused.
    with pytest.raises(ConfigError, match="l1_coeff is not a setting of topk SAEs"):
        base(store, set_id, variant="topk", k=4, l1_coeff=123.0)
    same = [base(store, set_id, variant="topk", k=4, sparse="off", checkpoint_every=7)]
    assert plan_saes(same, ActivationSet.open(open_store(store), set_id), 640)[0].sae_id \
        == ids["topk"]


# --- one pass, many SAEs -----------------------------------------------------------------------

def test_a_sweep_trains_each_sae_as_if_alone_reading_each_chunk_once(gt_set, tmp_path, monkeypatch):
    src, set_id = gt_set
    one_epoch = dict(n_tokens=960, eval_tokens=960, data_seed=0)
    cfgs = [base(src, set_id, variant="topk", k=3, layer=4, seed=1, lr=1e-3, **one_epoch),
            base(src, set_id, variant="relu", layer=7, seed=2, **one_epoch),
            base(src, set_id, variant="batchtopk", k=3, layer=7, seed=3, expansion=4, **one_epoch)]
    reads: list[tuple] = []
    original = TokenStream._fill

    def counting(self, shard, layer, lo, hi, out, dest):
        reads.append((shard.index, layer, lo, hi))
        return original(self, shard, layer, lo, hi, out, dest)

    monkeypatch.setattr(TokenStream, "_fill", counting)
    results = train_sweep(cfgs)
    assert [r.reused for r in results] == [False] * 3
    # One training epoch and one evaluation epoch: every chunk (4 images) is read exactly twice
    # per layer, whatever the number of SAEs.
    chunk_reads = Counter(reads)
    n_chunks = 4 * 5 + 4  # four shards of 20 images, then one of 16
    assert len(chunk_reads) == 2 * n_chunks and set(chunk_reads.values()) == {2}
    monkeypatch.setattr(TokenStream, "_fill", original)
    for cfg, r in zip(cfgs, results, strict=True):
        alone_store = tmp_path / f"alone-{cfg.seed}"
        # The same set in another store: SAE ids do not depend on where the set is kept.
        shutil.copytree(src / "activations", alone_store / "activations")
        alone = train(TrainConfig(**{**cfg.__dict__, "store": str(alone_store)}))
        assert alone.sae_id == r.sae_id
        assert_same_weights(weights(alone_store, alone.sae_id), weights(src, r.sae_id))
    again = train_sweep(cfgs)
    assert all(r.reused for r in again) and [r.sae_id for r in again] == [r.sae_id for r in results]
    rec = load_record(open_store(src), results[2].sae_id)
    assert rec.config.variant == "batchtopk" and rec.config.hyper.k == 3 and rec.layer == 7
    assert rec.training["k"] == 3 and rec.training["data_seed"] == 0 and rec.extra["threshold"] > 0
    assert {"mse", "nmse", "l0", "l1", "dead", "dense", "tokens_per_s", "sweep_size"} <= set(rec.metrics)
    assert rec.metrics["sweep_size"] == 3
    assert sum(rec.histogram["counts"]) + rec.histogram["never"] == rec.config.d_sae
    # dead: over the training window (here every training token, fewer than dead_window);
    # never_fired: over the evaluation pass, the histogram's
    assert rec.metrics["dead_window"] == rec.metrics["tokens"] == 960 < cfgs[2].dead_window
    assert rec.metrics["never_fired"] == rec.histogram["never"] and 0 <= rec.metrics["dead"] <= rec.config.d_sae


# --- the stream -------------------------------------------------------------------------------

def test_stream_any_start_position_continues_the_same_order_across_epochs(gt_set):
    store, set_id = gt_set
    aset = ActivationSet.open(open_store(store), set_id)
    positions = aset.layout.token_indices(["all"])
    stream = TokenStream(aset, [4, 7], positions, batch_size=64, seed=5, buffer_tokens=200, chunk_tokens=30)
    tpe = stream.tokens_per_epoch
    full = list(stream.batches(0, 3 * tpe))
    ids = np.concatenate([b.ids for b in full])
    for e in range(3):  # every token exactly once per epoch, a different order each epoch
        assert sorted(ids[e * tpe:(e + 1) * tpe]) == sorted(range(len(aset) * aset.layout.tokens_per_image))
    assert not np.array_equal(ids[:tpe], ids[tpe:2 * tpe])
    assert all(len(b) == 64 for b in full[:-1])
    for start in (64 * 7, tpe + 64 * 3):  # resuming anywhere continues the very same sequence
        tail = np.concatenate([b.ids for b in stream.batches(start, 3 * tpe)])
        np.testing.assert_array_equal(tail, ids[start:])
    # The layers of a batch are the same tokens.
    b = full[5]
    for tid, x4, x7 in list(zip(b.ids, b.xs[4], b.xs[7], strict=True))[:4]:
        image, pos = divmod(int(tid), aset.layout.tokens_per_image)
        torch.testing.assert_close(x4, aset.image_tokens(4, image)[pos])
        torch.testing.assert_close(x7, aset.image_tokens(7, image)[pos])


# --- resumable and safe -------------------------------------------------------------------------

class Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs (not even except Exception)."""


def test_a_killed_run_resumes_with_the_same_data_order_and_state(gt_set, tmp_path, monkeypatch):
    src, set_id = gt_set
    stores = [tmp_path / "whole", tmp_path / "killed"]
    for s in stores:
        shutil.copytree(src / "activations", s / "activations")
    cfgs = [base(s, set_id, variant="topk", k=3, n_tokens=1280, checkpoint_every=320, dead_window=100)
            for s in stores]
    cfgs = [[c, TrainConfig(**{**c.__dict__, "sae": ReluHyper(), "layer": 4})] for c in cfgs]
    whole = train_sweep(cfgs[0])

    original = SaeTrainer.step
    calls = {"n": 0}

    def dies(self, x, step, autocast):
        calls["n"] += 1
        if step == 13:  # after the checkpoint at 320 tokens * 2 = step 10
            raise Killed()
        return original(self, x, step, autocast)

    monkeypatch.setattr(SaeTrainer, "step", dies)
    with pytest.raises(Killed):
        train_sweep(cfgs[1])
    monkeypatch.setattr(SaeTrainer, "step", original)
    killed = LocalStore(stores[1])
    assert not killed.list("saes/")
    [progress_key] = [k for k in killed.list("runs/") if k.endswith("progress.json")]
    progress = json.loads(killed.get_bytes(progress_key))
    assert progress["step"] == 10 and progress["tokens"] == 640
    assert len([k for k in killed.list("runs/") if k.endswith(".pt")]) == 2  # older states dropped

    steps: list[int] = []

    def counting(self, x, step, autocast):
        steps.append(step)
        return original(self, x, step, autocast)

    monkeypatch.setattr(SaeTrainer, "step", counting)
    resumed = train_sweep(cfgs[1])
    assert min(steps) == 10 and max(steps) == 19  # picked up at the checkpoint
    assert not killed.list("runs/")  # scratch removed once published
    for a, b in zip(whole, resumed, strict=True):
        assert a.sae_id == b.sae_id
        assert_same_weights(weights(stores[0], a.sae_id), weights(stores[1], b.sae_id))


@pytest.mark.parametrize(("poisoned", "what", "kept"), [
    (12, r"loss became nan at step 12 \(768 tokens\)", 10),  # caught before the checkpoint of step 15
    (19, r"loss became nan at step 19 \(1216 tokens\)", 15),  # the last step: caught before publishing
    (-19, r"weights became non-finite at step 19 \(1216 tokens\)", 15),  # the last update, which no loss saw
])
def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(gt_set, monkeypatch, poisoned,
                                                                                  what, kept):
    """The loss is checked on the host only every few steps (a per-step read would stall a GPU),
    but always before a checkpoint is saved or an SAE published: the error names the step where
    the loss first went non-finite (every later step is non-finite too), and the kept checkpoint
    is the last one before it, with finite weights."""
    src, set_id = gt_set
    cfg = base(src, set_id, variant="topk", k=3, n_tokens=1280, checkpoint_every=320)  # 20 steps of 64
    original = SaeTrainer.step
    ran: list[int] = []

    def poisons(self, x, step, autocast):
        ran.append(step)
        original(self, x * (float("nan") if step == poisoned else 1.0), step, autocast)
        if step == -poisoned:
            with torch.no_grad():
                self.sae.W_enc[0, 0] = float("inf")

    monkeypatch.setattr(SaeTrainer, "step", poisons)
    with pytest.raises(TrainingError, match=rf"{what}: lower lr .*nothing was published; "
                                            rf"the last good checkpoint \(step {kept}\) is kept under"):
        train(cfg)
    assert max(ran) == (14 if poisoned == 12 else 19)  # ran on (lazily) up to the next check
    store = LocalStore(src)
    sae_id = plan_saes([cfg], ActivationSet.open(store, set_id), 1280)[0].sae_id
    assert not store.list(f"saes/{sae_id}/")
    [progress_key] = [k for k in store.list("runs/") if k.endswith("progress.json")]
    assert json.loads(store.get_bytes(progress_key))["step"] == kept
    state = checkpoint.load_state(store, progress_key.split("/")[1], kept, sae_id)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    store.delete_prefix("runs/")


def test_mismatched_shards_empty_sets_and_vanishing_stores_fail_clearly(gt_set, tmp_path, monkeypatch):
    src, set_id = gt_set
    # A manifest whose d_model does not match its shards' bytes.
    bad = tmp_path / "bad"
    shutil.copytree(src / "activations", bad / "activations")
    mpath = bad / "activations" / set_id / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["d_model"] = 24
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="do not match the manifest's d_model"):
        train(base(bad, set_id))
    # A set with no images.
    manifest["d_model"], manifest["shards"], manifest["n_images"] = 16, [], 0
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="no all tokens to train on"):
        train(base(bad, set_id))
    # The store disappears while training.
    gone = tmp_path / "gone"
    shutil.copytree(src / "activations", gone / "activations")
    original = SaeTrainer.step

    def removes(self, x, step, autocast):
        if step == 2:
            shutil.rmtree(gone / "activations")
        return original(self, x, step, autocast)

    monkeypatch.setattr(SaeTrainer, "step", removes)
    with pytest.raises(TrainingError, match="was the activation set removed or changed while training"):
        train(base(gone, set_id, n_tokens=5000))


def test_live_metrics_go_to_weights_and_biases_offline(gt_set, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    src, set_id = gt_set
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = train(base(src, set_id, variant="topk", k=3, seed=9, wandb_project="vitscope-test", n_tokens=64 * 40))
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{res.sae_id}"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


# --- quality ------------------------------------------------------------------------------------

def test_topk_recovers_the_ground_truth_directions(tmp_path):
    """128 unit directions in 64 dimensions, 4 active per token with noise: a TopK SAE with
    k = 4 trained through the real loader finds at least 95% of them at cosine > 0.9."""
    gt = GroundTruth(n_images=1024, grid=(4, 4))
    m = write_ground_truth_set(LocalStore(tmp_path), gt)
    res = train(TrainConfig(activations=m.set_id, store=str(tmp_path), sae=TopKHyper(k=4), tokens=("all",),
                            expansion=4, lr=5e-3, batch_size=512, n_tokens=100_000, dead_window=20_000,
                            eval_tokens=4096, progress=False))
    sae, _ = load_sae_from(LocalStore(tmp_path), res.sae_id)
    assert recovery(sae.W_dec, gt.directions()) >= 0.95
    assert res.metrics["nmse"] < 0.2


def test_training_reads_activations_from_s3(s3_store, gt_set):
    src, set_id = gt_set
    local = LocalStore(src)
    for key in local.list(f"activations/{set_id}/"):
        s3_store.put_bytes(key, local.get_bytes(key))
    uri = s3_store.uri
    remote = train(base(uri, set_id, variant="topk", k=3, seed=4))
    sae, record = load_sae_from(open_store(uri), remote.sae_id)
    assert record.config.variant == "topk" and remote.metrics["nmse"] < 1.0
