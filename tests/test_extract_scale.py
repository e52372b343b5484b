"""Extraction at scale: parts, killed runs, random weights, room checks, unreadable shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import extract_config, set_bytes

from vitscope.extractor import extraction as extract_mod
from vitscope.extractor.extraction import ExtractError, extract, plan
from vitscope.models import tiny_open_clip_config
from vitscope.shards import ActivationSet, set_prefix
from vitscope.store import open_store


def test_parts_in_any_order_give_the_same_bytes_as_one_process(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    whole = extract(extract_config(data_root, tmp_path / "one", tiny_model_name))
    split = tmp_path / "three"
    for part in (2, 0):
        res = extract(extract_config(data_root, split, tiny_model_name, part=part, parts=3, workers=2))
        assert res.manifest is None and res.set_id == whole.set_id
    with pytest.raises(ExtractError, match="shards are not finished"):
        extract(extract_config(data_root, split, tiny_model_name, parts=3, finish=True))
    extract(extract_config(data_root, split, tiny_model_name, part=1, parts=3, batch_size=4))
    done = extract(extract_config(data_root, split, tiny_model_name, parts=3, finish=True))
    assert done.manifest is not None and done.manifest.n_images == whole.manifest.n_images
    assert set_bytes(tmp_path / "one", whole.set_id) == set_bytes(split, done.set_id)


def test_a_shard_of_only_unreadable_images(planted_data, tiny_model_name, tmp_path):
    src, _ = planted_data
    data = tmp_path / "data"
    shutil.copytree(src, data)
    ids = sorted(str(p.relative_to(data)) for p in data.rglob("*.jpg"))
    for rel in ids[7:14]:  # exactly shard 1 (images_per_shard=7)
        (data / rel).write_bytes(b"broken")
    res = extract(extract_config(data, tmp_path / "s", tiny_model_name))
    m = res.manifest
    assert [s.n_images for s in m.shards][:3] == [7, 0, 7] and len(m.skipped) == 7
    aset = ActivationSet.open(open_store(tmp_path / "s"), res.set_id)
    assert aset.verify() == []
    assert aset.image_record(7)["id"] == ids[14]  # row 7 is the first image after the gap
    assert aset.shard_array(m.shards[1], 1).shape[0] == 0


def test_refuses_to_start_without_room_unless_forced(planted_data, tiny_model_name, tmp_path, monkeypatch):
    data_root, _ = planted_data
    monkeypatch.setattr(extract_mod.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    with pytest.raises(ExtractError, match=r"needs .* GiB but .* free.*--force"):
        extract(extract_config(data_root, tmp_path / "s", tiny_model_name))
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.bin"))
    assert extract(extract_config(data_root, tmp_path / "s", tiny_model_name, force=True)).manifest.n_images > 0


def _index_count(root: Path) -> int:
    return len(list(root.glob("activations/*/shard-*/index.json")))


def _cli_env() -> dict[str, str]:
    return {**os.environ, "VITSCOPE_LOG": "WARNING"}

# A built-in architecture shrunk by options, with a tag whose weights cannot be had offline (nor
# fit it): the --allow-random-weights fallback that once built a new random network per process.
_TINY_CLIP = json.dumps(tiny_open_clip_config())
RANDOM_FALLBACK = ("--model", "ViT-B-16", "--pretrained", "openai", "--model-options", _TINY_CLIP,
                   "--allow-random-weights")


def _extract_command(data_root: Path, store: Path, *args: str) -> list[str]:
    """``vitscope extract`` in a fresh process: two layers, 4 images per shard, small batches."""
    return [sys.executable, "-m", "vitscope.composition.cli", "extract", "--data", str(data_root), "--store", str(store),
            "--layers", "0", "-1", "--images-per-shard", "4", "--batch-size", "2", "--workers", "0", "--no-progress",
            *args]


def _random_fallback_config(data_root: Path, store: Path, **kw):
    """The in-process twin of :data:`RANDOM_FALLBACK` in :func:`_extract_command`."""
    return extract_config(data_root, store, "ViT-B-16", pretrained="openai", model_options=_TINY_CLIP,
                          allow_random_weights=True, images_per_shard=4, **kw)


def test_kill_9_at_several_points_then_resume_is_byte_identical(planted_data, tiny_model_name, tmp_path):
    data_root, items = planted_data
    ref = extract(extract_config(data_root, tmp_path / "ref", tiny_model_name, images_per_shard=4))
    cmd = _extract_command(data_root, tmp_path / "killed", "--model", tiny_model_name, "--pretrained", "None")
    _kill_three_times_then_resume(cmd, tmp_path / "killed", tmp_path / "ref", ref.set_id, len(items))


def test_kill_9_then_resume_with_random_weights_is_byte_identical(planted_data, tmp_path):
    data_root, items = planted_data
    ref = extract(_random_fallback_config(data_root, tmp_path / "ref"))
    assert not ref.manifest.model["pretrained_loaded"]
    cmd = _extract_command(data_root, tmp_path / "killed", *RANDOM_FALLBACK)
    _kill_three_times_then_resume(cmd, tmp_path / "killed", tmp_path / "ref", ref.set_id, len(items))


def test_random_weight_extractions_in_fresh_processes_are_byte_identical(planted_data, tmp_path):
    data_root, _ = planted_data
    set_ids = []
    for name in ("a", "b"):
        done = subprocess.run(_extract_command(data_root, tmp_path / name, *RANDOM_FALLBACK, "--max-images", "8"),
                              env=_cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "using RANDOM weights" in done.stderr  # the fallback path, not weights found in a cache
        set_ids.append(done.stdout.strip().splitlines()[-1])
    assert set_ids[0] == set_ids[1]
    assert set_bytes(tmp_path / "a", set_ids[0]) == set_bytes(tmp_path / "b", set_ids[1])
    model = ActivationSet.open(open_store(tmp_path / "a"), set_ids[0]).manifest.model
    assert (model["pretrained"], model["init_seed"], model["pretrained_loaded"]) == (None, 0, False)
    # This process has drawn other random numbers before: the network does not depend on them.
    assert plan(_random_fallback_config(data_root, tmp_path / "c", max_images=8)).set_id == set_ids[0]
    assert plan(_random_fallback_config(data_root, tmp_path / "c", max_images=8, init_seed=1)).set_id != set_ids[0]


def _kill_three_times_then_resume(cmd: list[str], store: Path, ref_store: Path, ref_id: str, n_items: int) -> None:
    """Run ``cmd`` (an extraction into ``store``, 4 images per shard), kill -9 it at three points,
    then let it finish: the set must be the reference set ``ref_id`` of ``ref_store``, byte for byte."""
    n_shards = -(-n_items // 4)
    kills = 0
    for target in (1, n_shards // 3, (2 * n_shards) // 3):
        proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _index_count(store) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not (store / set_prefix(ref_id) / "manifest.json").exists()
    assert kills == 3
    assert 0 < _index_count(store) < n_shards
    done = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == ref_id
    assert set_bytes(ref_store, ref_id) == set_bytes(store, ref_id)
    resumed = ActivationSet.open(open_store(store), ref_id)
    assert resumed.verify() == []
    torch.testing.assert_close(resumed.image_tokens(1, n_items - 1),
                               ActivationSet.open(open_store(ref_store), ref_id).image_tokens(1, n_items - 1))


def test_a_full_disk_stops_clearly_and_the_rerun_resumes(planted_data, tiny_model_name, tmp_path, monkeypatch):
    import errno

    from vitscope import store as store_mod
    from vitscope.store import OutOfSpace

    data_root, _ = planted_data
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):  # the disk fills up after a few objects
        calls.append(fd)
        if len(calls) > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync_until_full)
    with pytest.raises(OutOfSpace, match="no space left writing .*rerun to resume"):
        extract(extract_config(data_root, tmp_path / "s", tiny_model_name))
    assert not list((tmp_path / "s").rglob("*.part"))
    monkeypatch.setattr(store_mod.os, "fsync", real_fsync)
    done = extract(extract_config(data_root, tmp_path / "s", tiny_model_name))
    ref = extract(extract_config(data_root, tmp_path / "ref", tiny_model_name))
    assert set_bytes(tmp_path / "s", done.set_id) == set_bytes(tmp_path / "ref", ref.set_id)


def test_a_missing_bucket_stops_before_any_work(planted_data, tiny_model_name, s3_env):
    from vitscope.store import StoreError

    data_root, _ = planted_data
    with pytest.raises(StoreError, match="bucket 'vitscope-no-such-bucket' does not exist"):
        extract(extract_config(data_root, "s3://vitscope-no-such-bucket/x", tiny_model_name))
