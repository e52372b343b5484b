"""The extractor stores the right tokens, in the right order, for every image."""

from __future__ import annotations

import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from support import extract_config, set_bytes

from vitscope.datasets import DatasetError, ImageFolderSource
from vitscope.extractor import extract
from vitscope.models import ModelLoadError
from vitscope.shards import ActivationSet, from_storage, set_prefix
from vitscope.store import open_store


@pytest.mark.parametrize("workers", [0, 2])
def test_stored_tokens_equal_a_direct_forward_pass(planted_data, tiny_model_name, tmp_path, workers):
    data_root, items = planted_data
    res = extract(extract_config(data_root, tmp_path / "store", tiny_model_name, workers=workers, dtype="float32"))
    aset = ActivationSet.open(open_store(tmp_path / "store"), res.set_id)
    assert aset.manifest.n_images == len(items)
    assert [s.n_images for s in aset.manifest.shards][-1] == len(items) % 7  # last shard unpadded
    assert aset.manifest.layers == [0, 1] and aset.manifest.layers_requested == [0, -1]

    # An independent path: open_clip's own preprocessing and forward_intermediates.
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model_name)
    model.eval()
    ids = sorted(item.id for item in items)
    for i in list(range(0, len(ids), 9)) + [len(ids) - 1]:  # a spread of images, the last one included
        rec = aset.image_record(i)
        assert rec["id"] == ids[i] and rec["label"] == ids[i].split("/")[0]
        pixels = preprocess(Image.open(data_root / ids[i])).unsqueeze(0)
        with torch.no_grad():
            out = model.visual.forward_intermediates(pixels, indices=[0, 1], output_fmt="NLC",
                                                     output_extra_tokens=True, intermediates_only=True)
        for j, layer in enumerate((0, 1)):
            direct = torch.cat([out["image_intermediates_prefix"][j], out["image_intermediates"][j]], dim=1)[0]
            stored = aset.image_tokens(layer, i)
            torch.testing.assert_close(stored, direct, rtol=1e-5, atol=1e-5)


def test_worker_count_does_not_change_a_single_byte(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    a = extract(extract_config(data_root, tmp_path / "a", tiny_model_name, workers=0))
    b = extract(extract_config(data_root, tmp_path / "b", tiny_model_name, workers=2, batch_size=3))
    assert a.set_id != "" and a.set_id == b.set_id
    assert set_bytes(tmp_path / "a", a.set_id) == set_bytes(tmp_path / "b", b.set_id)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_half_precision_storage(planted_data, tiny_model_name, tmp_path, dtype, tol):
    data_root, _ = planted_data
    full = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, dtype="float32", max_images=10))
    half = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, dtype=dtype, max_images=10))
    assert full.set_id != half.set_id
    store = open_store(tmp_path / "s")
    f, h = ActivationSet.open(store, full.set_id), ActivationSet.open(store, half.set_id)
    assert h.manifest.bytes_per_token * 2 == f.manifest.bytes_per_token
    for i in (0, 9):
        torch.testing.assert_close(h.image_tokens(1, i), f.image_tokens(1, i), rtol=tol, atol=tol * 4)
    shard = h.manifest.shards[0]
    whole = from_storage(h.shard_array(shard, 1), dtype)
    torch.testing.assert_close(whole[3], h.image_tokens(1, 3))


def test_corrupt_images_are_skipped_counted_and_listed(planted_data, tiny_model_name, tmp_path):
    src, _ = planted_data
    data = tmp_path / "data"
    shutil.copytree(src, data)
    (data / "plain" / "img_00002.jpg").write_bytes(b"not a jpeg at all")
    good = (data / "square" / "img_00005.jpg").read_bytes()
    (data / "square" / "img_00005.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (data / "square" / "zz_last.png").write_bytes(b"\x89PNG garbage")  # the very last image
    res = extract(extract_config(data, tmp_path / "store", tiny_model_name, workers=2))
    m = res.manifest
    skipped = {s["id"] for s in m.skipped}
    assert skipped == {"plain/img_00002.jpg", "square/img_00005.jpg", "square/zz_last.png"}
    assert all(s["error"] for s in m.skipped)
    assert m.n_images == len(ImageFolderSource(data)) - 3
    aset = ActivationSet.open(open_store(tmp_path / "store"), res.set_id)
    assert aset.verify() == []
    listed = [r["id"] for s in m.shards for r in aset.shard_records(s)]
    assert not skipped & set(listed)
    assert listed == sorted(listed)
    # Rows after a skipped image still hold their own image's tokens.
    clean = extract(extract_config(src, tmp_path / "clean", tiny_model_name, workers=0))
    clean_set = ActivationSet.open(open_store(tmp_path / "clean"), clean.set_id)
    clean_ids = [r["id"] for s in clean_set.manifest.shards for r in clean_set.shard_records(s)]
    for row in (2, 10, len(listed) - 1):
        torch.testing.assert_close(aset.image_tokens(1, row), clean_set.image_tokens(1, clean_ids.index(listed[row])))


def test_resume_after_interruption_gives_identical_bytes(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    ref = extract(extract_config(data_root, tmp_path / "ref", tiny_model_name))
    store = tmp_path / "resumed"
    extract(extract_config(data_root, store, tiny_model_name))
    root = store / set_prefix(ref.set_id)
    # Simulate a run killed after shard 5: no manifest, later shards half-written or absent.
    (root / "manifest.json").unlink()
    for shard_dir in sorted(root.glob("shard-*"))[6:]:
        shutil.rmtree(shard_dir) if shard_dir.name != "shard-000007" else (shard_dir / "index.json").unlink()
    res = extract(extract_config(data_root, store, tiny_model_name, workers=2))
    assert not res.reused
    assert set_bytes(tmp_path / "ref", ref.set_id) == set_bytes(store, res.set_id)
    assert ActivationSet.open(open_store(store), res.set_id).verify() == []


def test_verify_finds_corruption(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    res = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, max_images=20))
    aset = ActivationSet.open(open_store(tmp_path / "s"), res.set_id)
    assert aset.verify() == []
    victim = tmp_path / "s" / set_prefix(res.set_id) / "shard-000001" / "layer-1.bin"
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert aset.verify() == ["shard-000001/layer-1.bin: checksum mismatch"]


def test_bad_requests_fail_clearly(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    with pytest.raises(ValueError, match="layer 5 does not exist.*2 blocks"):
        extract(extract_config(data_root, tmp_path / "s", tiny_model_name, layers=(5,)))
    with pytest.raises(DatasetError, match="does not exist"):
        extract(extract_config(tmp_path / "nope", tmp_path / "s", tiny_model_name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        extract(extract_config(tmp_path / "empty", tmp_path / "s", tiny_model_name))
    with pytest.raises(ModelLoadError, match="could not load"):
        extract(extract_config(data_root, tmp_path / "s", f"local-dir:{tmp_path / 'no-model'}"))


def test_rerun_reuses_the_published_set(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    first = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, max_images=12))
    second = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, max_images=12, workers=2))
    assert second.reused and second.set_id == first.set_id
    other = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, max_images=12, layers=(0,)))
    assert other.set_id != first.set_id
    ids = np.unique([first.set_id, other.set_id])
    assert len(ids) == 2


def test_all_layers_and_negative_indices(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    every = extract(extract_config(data_root, tmp_path / "s", tiny_model_name, layers=("all",), max_images=3))
    assert every.manifest.layers == [0, 1] and every.manifest.layers_requested == [0, 1]
    neg = extract(extract_config(data_root, tmp_path / "n", tiny_model_name, layers=(-2, 1), max_images=3))
    assert neg.manifest.layers == [0, 1] and neg.manifest.layers_requested == [-2, 1]
    assert neg.set_id == every.set_id  # the same blocks, however they were named
    aset = ActivationSet.open(open_store(tmp_path / "n"), neg.set_id)
    torch.testing.assert_close(aset.image_tokens(-2, 2), aset.image_tokens(0, 2))
