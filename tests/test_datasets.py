"""Every dataset kind gives the same tokens for the same image, locally and over S3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from vitscope.datasets import (
    DatasetError,
    ListSource,
    TarSource,
    decode_image,
    expand_braces,
    load_image_by_id,
    open_source,
)
from vitscope.extractor import ExtractConfig, extract
from vitscope.s3 import S3Store
from vitscope.shards import ActivationSet
from vitscope.store import open_store


def _extract(data: str, store, model: str, **kw):
    return extract(ExtractConfig(data=data, store=str(store), model=model, pretrained=None, layers=(-1,),
                                 images_per_shard=5, workers=kw.pop("workers", 2), progress=False, **kw))


@pytest.fixture(scope="module")
def folder_set(planted_data, tiny_model_name, tmp_path_factory):
    data_root, _ = planted_data
    store = tmp_path_factory.mktemp("folder-store")
    res = _extract(str(data_root), store, tiny_model_name, max_images=20)
    aset = ActivationSet.open(open_store(store), res.set_id)
    by_id = {aset.image_record(i)["id"]: aset.image_tokens(1, i) for i in range(len(aset))}
    return data_root, by_id


def _write_tars(data_root: Path, ids: list[str], out: Path, per_tar: int) -> list[Path]:
    """Webdataset layout: <key>.jpg plus <key>.cls (the label), samples in order."""
    paths = []
    for t in range(0, len(ids), per_tar):
        path = out / f"shard-{t // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for rel in ids[t:t + per_tar]:
                key = rel.replace("/", "_").removesuffix(".jpg")
                for name, data in ((f"{key}.jpg", (data_root / rel).read_bytes()), (f"{key}.cls", rel.split("/")[0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s3://b/shard-{000..002}.tar") == [f"s3://b/shard-00{i}.tar" for i in range(3)]
    assert expand_braces("x-{8..10}.tar") == ["x-8.tar", "x-9.tar", "x-10.tar"]


def test_webdataset_tars_give_the_folder_tokens(folder_set, tiny_model_name, tmp_path):
    data_root, by_id = folder_set
    ids = sorted(by_id)
    _write_tars(data_root, ids, tmp_path, per_tar=8)
    source = TarSource(str(tmp_path / "shard-{000000..000002}.tar"))
    assert len(source) == 20 and source.entries[0].label == ids[0].split("/")[0]
    (tmp_path / "shards.txt").write_text("shard-000000.tar\nshard-000001.tar\nshard-000002.tar\n")
    assert [e.id for e in open_source(str(tmp_path / "shards.txt")).entries] == [e.id for e in source.entries]

    res = _extract(str(tmp_path / "shard-{000000..000002}.tar"), tmp_path / "store", tiny_model_name)
    aset = ActivationSet.open(open_store(tmp_path / "store"), res.set_id)
    assert len(aset) == 20 and res.manifest.dataset["kind"] == "webdataset"
    for i in (0, 7, 8, 19):  # across tar boundaries
        rec = aset.image_record(i)
        folder_id = ids[i]
        assert rec["id"] == f"shard-{i // 8:06d}.tar/{folder_id.replace('/', '_').removesuffix('.jpg')}"
        assert rec["label"] == folder_id.split("/")[0]
        torch.testing.assert_close(aset.image_tokens(1, i), by_id[folder_id])
    shown = load_image_by_id(res.manifest.dataset, aset.image_record(19)["id"])
    assert shown.size == (112, 112)


def test_image_lists_csv_and_jsonl(folder_set, tiny_model_name, tmp_path):
    data_root, by_id = folder_set
    ids = sorted(by_id)[:6]
    rows = [{"path": str(data_root / rel), "label": f"L{n}"} for n, rel in enumerate(ids)]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    (tmp_path / "bad.jsonl").write_text('{"label": "no path"}\n')
    for name, order in (("list.csv", ids), ("list.jsonl", ids[::-1])):
        res = _extract(str(tmp_path / name), tmp_path / "store", tiny_model_name)
        aset = ActivationSet.open(open_store(tmp_path / "store"), res.set_id)
        assert [aset.image_record(i)["id"] for i in range(len(aset))] == [str(data_root / r) for r in order]
        for i, rel in enumerate(order):
            torch.testing.assert_close(aset.image_tokens(1, i), by_id[rel])
        assert load_image_by_id(res.manifest.dataset, aset.image_record(0)["id"]).size == (112, 112)
    with pytest.raises(DatasetError, match="no path/uri/image field"):
        ListSource(tmp_path / "bad.jsonl")


def test_remote_tars_are_listed_by_streaming_and_the_listing_is_cached(folder_set, tmp_path, s3_store,
                                                                        monkeypatch):
    """A remote tar is never copied to disk: its headers are walked in one pass, the listing
    (a few bytes per image) is cached by URI and size, and images are ranged reads."""
    data_root, by_id = folder_set
    ids = sorted(by_id)
    (tmp_path / "local").mkdir()
    (tmp_path / "other").mkdir()
    [local] = _write_tars(data_root, ids[:12], tmp_path / "local", per_tar=12)
    s3_store.put_file("stream/shard-000000.tar", local)
    uri = f"s3://{s3_store.bucket}/{s3_store.prefix}/stream/shard-000000.tar"
    cache = tmp_path / "cache"
    monkeypatch.setenv("VITSCOPE_CACHE", str(cache))

    remote = TarSource(uri)
    expected = TarSource(str(local))
    assert [(e.id, e.label, e.location[1:]) for e in remote.entries] == \
        [(e.id, e.label, e.location[1:]) for e in expected.entries]
    gets = []
    real_get_range = S3Store.get_range
    monkeypatch.setattr(S3Store, "get_range", lambda self, *a: gets.append(a) or real_get_range(self, *a))
    assert [remote.read(e) for e in remote.entries] == [expected.read(e) for e in expected.entries]
    assert len(gets) == 1  # the images in order: one block GET (the tar is under 4 MB), not one per image
    monkeypatch.setattr(S3Store, "get_range", real_get_range)
    files = [f for f in cache.rglob("*") if f.is_file()]
    assert len(files) == 1 and files[0].suffix == ".json"  # the listing only, no copy of the tar
    assert files[0].stat().st_size < local.stat().st_size / 50

    # A second listing reads the cache (shown by a label edited there)...
    listing = json.loads(files[0].read_text())
    listing["entries"][0][1] = "edited in the cache"
    files[0].write_text(json.dumps(listing))
    assert TarSource(uri).entries[0].label == "edited in the cache"
    # ...until the object changes: a different size walks the new tar.
    [other] = _write_tars(data_root, ids[12:17], tmp_path / "other", per_tar=5)  # other images
    s3_store.put_file("stream/shard-000000.tar", other)
    fresh, other_local = TarSource(uri), TarSource(str(other))
    assert len(fresh.entries) == 5 and fresh.entries[0].label != "edited in the cache"
    # The new object's bytes, not blocks cached from the old one.
    assert [fresh.read(e) for e in fresh.entries] == [other_local.read(e) for e in other_local.entries]
    decode_image(fresh.read(fresh.entries[4]))


def test_tars_and_uri_lists_from_and_to_radosgw(folder_set, tiny_model_name, tmp_path, s3_store):
    data_root, by_id = folder_set
    ids = sorted(by_id)
    for path in _write_tars(data_root, ids, tmp_path, per_tar=10):
        s3_store.put_file(f"tol/{path.name}", path)
    base = f"s3://{s3_store.bucket}/{s3_store.prefix}"
    out = f"{base}/out"
    res = _extract(f"{base}/tol/shard-{{000000..000001}}.tar", out, tiny_model_name)
    remote = ActivationSet.open(open_store(out), res.set_id)
    assert remote.verify() == [] and len(remote) == 20
    torch.testing.assert_close(remote.image_tokens(1, 13), by_id[ids[13]])

    # A URI list of objects in the bucket, one of them missing: skipped, counted, listed.
    for rel in ids[:4]:
        s3_store.put_file(f"imgs/{rel}", data_root / rel)
    lines = [json.dumps({"uri": f"{base}/imgs/{rel}", "label": rel.split("/")[0]}) for rel in ids[:4]]
    lines.insert(2, json.dumps({"uri": f"{base}/imgs/missing.jpg"}))
    (tmp_path / "uris.jsonl").write_text("\n".join(lines) + "\n")
    res = _extract(str(tmp_path / "uris.jsonl"), out, tiny_model_name, workers=0)
    assert [s["id"] for s in res.manifest.skipped] == [f"{base}/imgs/missing.jpg"]
    remote = ActivationSet.open(open_store(out), res.set_id)
    assert len(remote) == 4
    torch.testing.assert_close(remote.image_tokens(1, 3), by_id[ids[3]])
