"""Reading an activation set's rows: one reader for whole shards, single images and ranges, and
``open_activations``' batches with their provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.activations import open_activations
from vitscope.shards import (
    ActivationSet,
    Manifest,
    ShardWriter,
    TokenLayout,
    from_storage,
    set_prefix,
    to_storage,
)
from vitscope.store import NotFound, Store, open_store

LAYOUT = TokenLayout(n_cls=1, n_registers=2, grid=(2, 3))
SHARD_IMAGES = (4, 0, 4, 3)  # an empty shard (every image unreadable) and a short last one
D = 5


def _write_set(store: Store, dtype: str) -> ActivationSet:
    """A set of 11 images in 4 shards, layers 3 and 5 (requested as -3 and -1), every value
    distinct, written with the real writer."""
    manifest = Manifest(set_id=f"tiny-{dtype}", model={"spec": "test"}, layers=[3, 5], layers_requested=[-3, -1],
                        d_model=D, dtype=dtype, layout=LAYOUT, transform={}, dataset={})
    writer = ShardWriter(store, manifest, images_per_shard=4)
    rng = np.random.default_rng(0)
    shards, image = [], 0
    for index, n in enumerate(SHARD_IMAGES):
        acts = {layer: to_storage(torch.from_numpy(rng.normal(size=(n, LAYOUT.tokens_per_image, D))), dtype)
                for layer in manifest.layers}
        records = [{"id": f"img/{image + i:03d}.jpg", "label": None if (image + i) % 3 == 0 else f"c{(image + i) % 3}",
                    "index": image + i} for i in range(n)]
        shards.append(writer.write_shard(index, acts, records, (4 * index, 4 * index + 4)))
        image += n
    writer.finish(shards)
    return ActivationSet.open(store, manifest.set_id)


@pytest.fixture(params=["float32", "bfloat16"])
def tiny_set(tmp_path, request) -> ActivationSet:
    return _write_set(open_store(tmp_path / "store"), request.param)


def test_rows_read_by_range_equal_the_mapped_shard(tiny_set):
    for shard in tiny_set.manifest.shards:
        for layer in (3, -1):
            whole = tiny_set.shard_array(shard, layer)
            assert whole.shape == (shard.n_images, LAYOUT.tokens_per_image, D)
            for lo, hi in [(0, shard.n_images), (min(1, shard.n_images), shard.n_images), (shard.n_images,) * 2]:
                np.testing.assert_array_equal(tiny_set.read_rows(shard, layer, lo, hi), whole[lo:hi])
            for row in range(shard.n_images):
                torch.testing.assert_close(tiny_set.image_tokens(layer, shard.first_image + row),
                                           from_storage(whole[row], tiny_set.manifest.dtype))


def test_layer_files_have_the_size_the_manifest_gives(tiny_set):
    m = tiny_set.manifest
    for shard in m.shards:
        path = tiny_set.local_file(shard, -3)
        assert path is not None and path.stat().st_size == m.layer_nbytes(shard) == shard.n_images * m.image_bytes
        assert tiny_set.layer_key(shard, -3) == tiny_set.layer_key(shard, 3) == f"{tiny_set.prefix}/{shard.name}/layer-3.bin"


@pytest.mark.parametrize("batch_images", [1, 3, 4, 64])
def test_open_activations_yields_every_image_with_its_provenance(tiny_set, tmp_path, batch_images):
    acts = open_activations(f"{tmp_path / 'store'}/{set_prefix(tiny_set.manifest.set_id)}", layer=-3,
                            tokens=("all",), batch_images=batch_images)
    n = len(tiny_set)
    assert acts.layer == 3 and acts.manifest.set_id == tiny_set.manifest.set_id
    assert len(acts) == -(-n // batch_images) == len(list(acts))
    assert acts.n_tokens == n * LAYOUT.tokens_per_image
    tpi = LAYOUT.tokens_per_image
    seen = 0
    for batch in acts:
        assert batch.x.dtype == torch.float32 and batch.x.shape[1] == D
        images = batch.image_index.view(-1, tpi)
        assert (images == images[:, :1]).all()  # image-major: an image's tokens are consecutive
        first = int(images[0, 0])
        assert first == seen
        for j, image in enumerate(images[:, 0].tolist()):
            rows = slice(j * tpi, (j + 1) * tpi)
            torch.testing.assert_close(batch.x[rows], tiny_set.image_tokens(3, image))
            record = tiny_set.image_record(image)
            assert set(batch.image_id[rows]) == {record["id"]} and set(batch.label[rows]) == {record["label"]}
            assert list(batch.kind[rows]) == ["cls", "reg0", "reg1"] + ["patch"] * 6
            assert batch.position[rows].tolist() == list(range(tpi))
            assert batch.patch_row[rows].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1]
            assert batch.patch_col[rows].tolist() == [-1, -1, -1, 0, 1, 2, 0, 1, 2]
        seen += len(images)
    assert seen == n


def test_open_activations_selects_token_kinds_and_defaults_to_the_last_layer(tiny_set, tmp_path):
    uri = tmp_path / "store" / set_prefix(tiny_set.manifest.set_id)
    patches = open_activations(uri, batch_images=5)
    assert patches.layer == 5 and patches.tokens_per_image == LAYOUT.n_patches
    batch = next(iter(patches))
    assert set(batch.kind) == {"patch"}
    # patch p of the grid sits at row p // cols, column p % cols
    p = batch.position[:6] - LAYOUT.patch_start
    assert batch.patch_row[:6].tolist() == (p // 3).tolist() and batch.patch_col[:6].tolist() == (p % 3).tolist()
    torch.testing.assert_close(batch.x[:6], tiny_set.image_tokens(5, 0)[LAYOUT.patch_start:])

    cls = next(iter(open_activations(uri, tokens=("cls",), batch_images=2)))
    assert cls.kind == ("cls", "cls") and cls.patch_row.tolist() == [-1, -1] and cls.image_index.tolist() == [0, 1]
    torch.testing.assert_close(cls.x[1], tiny_set.image_tokens(5, 1)[0])


def test_open_activations_rejects_what_it_cannot_open(tiny_set, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(ValueError, match="not an activation set URI"):
        open_activations(store / "saes" / tiny_set.manifest.set_id)
    with pytest.raises(NotFound, match="no published activation set 'nope'"):
        open_activations(store / "activations" / "nope")
    uri = store / set_prefix(tiny_set.manifest.set_id)
    with pytest.raises(ValueError, match="layer 4 is not in this activation set"):
        open_activations(uri, layer=4)
    with pytest.raises(ValueError, match="unknown token kinds"):
        open_activations(uri, tokens=("patch",))
    with pytest.raises(ValueError, match="batch_images"):
        open_activations(uri, batch_images=0)


def test_open_activations_reads_s3_by_range_as_it_reads_a_local_folder(s3_store, tmp_path):
    local, remote = _write_set(open_store(tmp_path / "store"), "float16"), _write_set(s3_store, "float16")
    assert remote.local_file(remote.manifest.shards[0], 3) is None
    pairs = zip(open_activations(f"{local.store.uri}/{set_prefix(local.manifest.set_id)}", batch_images=3),
                open_activations(f"{s3_store.uri}/{set_prefix(remote.manifest.set_id)}", batch_images=3), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
        assert a.image_id == b.image_id and torch.equal(a.patch_col, b.patch_col)
