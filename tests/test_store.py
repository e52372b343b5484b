"""One contract suite for every storage backend (local folder, S3 via radosgw)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from vitscope.store import MAX_KEY_PART_BYTES, InvalidKey, LocalStore, NotFound, Store, StoreError, open_store

MiB = 1 << 20


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def _variant(store: Store, **kwargs) -> Store:
    """The same store opened with different tuning (S3 only has any)."""
    if isinstance(store, LocalStore):
        return store
    from vitscope.s3 import S3Store

    return S3Store(store.bucket, store.prefix, **kwargs)


# -- whole objects -------------------------------------------------------------------------------


def test_put_get_bytes(store):
    store.put_bytes("a/b/c.bin", b"hello")
    assert store.get_bytes("a/b/c.bin") == b"hello"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_overwrite(store):
    store.put_bytes("k", b"first version")
    store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"
    assert store.size("k") == 6


def test_size_and_exists(store):
    assert not store.exists("x/y")
    store.put_bytes("x/y", bytes(1234))
    assert store.exists("x/y")
    assert store.size("x/y") == 1234
    assert not store.exists("x")  # a "directory" is not an object


def test_missing_keys_raise_not_found(store):
    for call in (
        lambda: store.get_bytes("nope"),
        lambda: store.size("nope"),
        lambda: store.get_range("nope", 0, 1),
        lambda: store.get_range("nope", 0, 0),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert "nope" in str(info.value)
        assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)


# -- ranges --------------------------------------------------------------------------------------


def test_get_range(store):
    data = bytes(range(256)) * 4
    store.put_bytes("r", data)
    assert store.get_range("r", 100, 50) == data[100:150]
    assert store.get_range("r", 0, 10) == data[:10]
    assert store.get_range("r", len(data) - 7, 7) == data[-7:]
    assert store.get_range("r", 0, len(data)) == data
    assert store.get_range("r", 5, 0) == b""


@pytest.mark.parametrize("start,length", [(1000, 100), (1024, 1), (5000, 10)])
def test_get_range_past_end(store, start, length):
    store.put_bytes("r", bytes(1024))
    with pytest.raises(StoreError, match="past the end"):
        store.get_range("r", start, length)


def test_get_range_rejects_negative(store):
    store.put_bytes("r", b"abc")
    with pytest.raises(ValueError):
        store.get_range("r", -1, 2)


# -- listing and deleting ------------------------------------------------------------------------


def test_list_prefix_sorted(store):
    for key in ["b/2", "a/1", "b/10", "b/1", "c", "ab/x"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "ab/x", "b/1", "b/10", "b/2", "c"]
    assert store.list("b/") == ["b/1", "b/10", "b/2"]
    assert store.list("a") == ["a/1", "ab/x"]
    assert store.list("zzz") == []


def test_list_paginates(store):
    keys = [f"many/{i:03d}" for i in range(30)]
    for key in reversed(keys):
        store.put_bytes(key, b"x")
    assert _variant(store, page_size=7).list("many/") == keys  # 5 LIST pages on S3


def test_list_empty_store(store):
    assert store.list() == []


def test_delete(store):
    store.put_bytes("d/1", b"1")
    store.delete("d/1")
    assert not store.exists("d/1")
    store.delete("d/1")  # deleting a missing key is fine
    store.delete("never-there")


def test_delete_prefix(store):
    for i in range(12):
        store.put_bytes(f"set/{i}", b"x")
    store.put_bytes("setx", b"keep")
    store.put_bytes("other/1", b"keep")
    assert store.delete_prefix("set/") == 12
    assert store.list() == ["other/1", "setx"]
    assert store.delete_prefix("set/") == 0


# -- files ---------------------------------------------------------------------------------------


def test_put_file_multipart_and_get_file(store, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(12 * MiB + 123)
    src.write_bytes(data)
    tuned = _variant(store, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    tuned.put_file("files/big.bin", src)
    assert store.size("files/big.bin") == len(data)
    assert store.get_range("files/big.bin", 6 * MiB - 10, 20) == data[6 * MiB - 10 : 6 * MiB + 10]
    if not isinstance(store, LocalStore):  # a multipart object's ETag ends in -<parts>
        head = store._client.head_object(Bucket=store.bucket, Key=store._key("files/big.bin"))
        assert head["ETag"].strip('"').endswith("-3")
    dest = tmp_path / "copy.bin"
    store.get_file("files/big.bin", dest)
    assert dest.read_bytes() == data


def test_put_small_file(store, tmp_path):
    src = tmp_path / "small.txt"
    src.write_text("small")
    store.put_file("small.txt", src)
    assert store.get_bytes("small.txt") == b"small"


def test_get_file_missing(store, tmp_path):
    with pytest.raises(NotFound):
        store.get_file("nope", tmp_path / "out")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/../b", "", "a/",
                                 "x" * 241, "saes/" + "\u00e9" * 121 + "/record.json"])
def test_invalid_keys(store, key):
    with pytest.raises(InvalidKey):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKey):
        store.get_bytes(key)
    with pytest.raises(InvalidKey):
        store.exists(key)
    with pytest.raises(InvalidKey):
        store.delete(key)


def test_longest_key_component_fits_a_folder(tmp_path):
    store = LocalStore(tmp_path)  # the limit is the filesystem's, with the temporary file's name
    key = "saes/" + "x" * MAX_KEY_PART_BYTES
    store.put_bytes(key, b"x")
    assert store.get_bytes(key) == b"x"


# -- URIs ----------------------------------------------------------------------------------------


def test_open_store_round_trip(store):
    store.put_bytes("u/v", b"via uri")
    again = open_store(store.uri)
    assert type(again) is type(store)
    assert again.uri == store.uri
    assert again.get_bytes("u/v") == b"via uri"


def test_open_store_uri_forms(tmp_path):
    from vitscope.s3 import S3Store

    s3 = open_store("s3://some-bucket/deep/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("some-bucket", "deep/prefix", "s3://some-bucket/deep/prefix")
    assert open_store("s3://some-bucket").uri == "s3://some-bucket"
    local = open_store(f"file://{tmp_path}/x")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "x"
    assert open_store(local.uri).root == local.root
    assert open_store(tmp_path / "y").root == tmp_path / "y"
    assert open_store(str(tmp_path / "y")).uri == f"file://{tmp_path / 'y'}"
    with pytest.raises(ValueError):
        open_store("ftp://host/x")


# -- LocalStore atomicity ------------------------------------------------------------------------


class _ExplodingFile(io.RawIOBase):
    """Yields some bytes, then fails, like a disk or network error halfway through a copy."""

    def __init__(self):
        self.calls = 0

    def readable(self):
        return True

    def readinto(self, b):
        self.calls += 1
        if self.calls > 2:
            raise OSError("simulated failure mid-write")
        b[:4] = b"data"
        return 4


def test_local_store_never_exposes_partial_object(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("obj", b"old")
    import vitscope.store as store_module

    monkeypatch.setattr(store_module, "open", lambda *a, **k: _ExplodingFile(), raising=False)
    with pytest.raises(OSError, match="mid-write"):
        store.put_file("obj", "ignored")
    with pytest.raises(OSError, match="mid-write"):
        store.put_file("new/obj", "ignored")
    monkeypatch.undo()
    assert store.get_bytes("obj") == b"old"
    assert not store.exists("new/obj")
    assert store.list() == ["obj"]
    leftovers = [p.name for p in (tmp_path / "store").rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


# -- S3 failures ---------------------------------------------------------------------------------


def test_s3_prefix_isolation(s3_store):
    from vitscope.s3 import S3Store

    outer = S3Store(s3_store.bucket)
    outer.put_bytes("rootx/y", b"outside")
    outer.put_bytes("other", b"outside")
    s3_store.put_bytes("in", b"inside")
    assert s3_store.list() == ["in"]
    assert outer.list() == ["other", "root/in", "rootx/y"]


def test_s3_wrong_secret(s3_store, monkeypatch):
    from vitscope.s3 import S3Store

    s3_store.put_bytes("k", b"v")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = S3Store(s3_store.bucket, s3_store.prefix)
    t0 = time.monotonic()
    for call in (
        lambda: bad.get_bytes("k"),
        lambda: bad.size("k"),
        bad.list,
        lambda: bad.put_bytes("k", b"x"),
    ):
        with pytest.raises(StoreError, match="denied") as info:
            call()
        assert not isinstance(info.value, NotFound)
        assert s3_store.bucket in str(info.value)
    assert time.monotonic() - t0 < 10  # rejected, not retried until a timeout
    assert s3_store.get_bytes("k") == b"v"


def test_s3_wrong_access_key(s3_store, monkeypatch):
    from vitscope.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        S3Store(s3_store.bucket).get_bytes("k")


def test_s3_missing_bucket(s3_env):
    from vitscope.s3 import S3Store

    store = S3Store("vitscope-no-such-bucket", "p")
    calls = {
        "get_bytes": lambda: store.get_bytes("k"),
        "get_range": lambda: store.get_range("k", 0, 1),
        "size": lambda: store.size("k"),
        "exists": lambda: store.exists("k"),
        "list": store.list,
        "put_bytes": lambda: store.put_bytes("k", b"x"),
        "delete": lambda: store.delete("k"),
    }
    for name, call in calls.items():
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, NotFound), name
        assert "bucket 'vitscope-no-such-bucket' does not exist at http://" in str(info.value), name


def test_s3_put_file_missing_bucket(s3_env, tmp_path):
    from vitscope.s3 import S3Store

    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StoreError, match="bucket 'vitscope-no-such-bucket' does not exist"):
        S3Store("vitscope-no-such-bucket").put_file("k", src)


def test_s3_unreachable_endpoint(s3_env):
    import socket

    from vitscope.s3 import S3Store

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    store = S3Store("somebucket", endpoint_url=url, max_attempts=1)
    with pytest.raises(StoreError, match=f"cannot use S3 endpoint {url}.*somebucket"):
        store.get_bytes("k")


def test_s3_ensure_bucket_idempotent(s3_store):
    s3_store.ensure_bucket()
    s3_store.put_bytes("k", b"v")
    s3_store.ensure_bucket()
    assert s3_store.get_bytes("k") == b"v"


def test_local_path_only_for_local(store):
    store.put_bytes("p", b"x")
    path = store.local_path("p")
    if isinstance(store, LocalStore):
        assert isinstance(path, Path) and path.read_bytes() == b"x"
    else:
        assert path is None


def test_discard_incomplete_removes_what_killed_writers_left(store):
    store.put_bytes("set/shard-1/data.bin", b"kept")
    if isinstance(store, LocalStore):
        (store.root / "set/shard-1/.data2.bin.abc.part").write_bytes(b"half")
        (store.root / "set/shard-2").mkdir(parents=True)
        (store.root / "set/shard-2/.x.part").write_bytes(b"other shard")
    else:
        client, bucket = store._client, store.bucket
        for key in ("set/shard-1/big.bin", "set/shard-2/x.bin"):
            client.create_multipart_upload(Bucket=bucket, Key=store._key(key))
    assert store.discard_incomplete("set/shard-1/") == 1
    assert store.discard_incomplete("set/shard-1/") == 0  # idempotent
    assert store.get_bytes("set/shard-1/data.bin") == b"kept"
    assert store.discard_incomplete("set/") == 1  # the other shard's leftover, untouched until now
    assert store.list("set/") == ["set/shard-1/data.bin"]
