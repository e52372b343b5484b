"""One storage interface, two backends: a local folder and S3-compatible object storage.

Keys are '/'-separated relative paths (``activations/<id>/manifest.json``). Every backend
writes whole objects atomically: a reader sees either the old object, the new one, or none,
never a partial one. Publishing a *set* of objects is made atomic one level up by writing
the manifest last (see :mod:`vitscope.shards`); readers trust only what a manifest lists.
"""

from __future__ import annotations

import abc
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse


class StoreError(RuntimeError):
    """A storage operation failed. Unless it is a :class:`TransientStoreError`, the same
    request would fail the same way again: report it, do not retry it."""


class TransientStoreError(StoreError):
    """A fault that may clear by itself: throttling, a 5xx answer, a refused, dropped or timed-out
    connection, an I/O error of a (network) filesystem. The only store error worth retrying."""


class AccessDenied(StoreError):
    """The store refused the request: wrong credentials, no permission, a read-only filesystem."""


class OutOfSpace(StoreError):
    """The store has no room left. Retrying will not help until space is freed."""


class NotFound(StoreError, KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying what raised ``exc`` can help: ``exc`` is a :class:`TransientStoreError`,
    or a wrapper raised from one (a stage's own error type chains the store error it caught).

    The outermost store error in the chain decides, so a permanent one raised while handling a
    transient one (a retry that found the object gone) is not retried."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, StoreError):
            return isinstance(cur, TransientStoreError)
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None or cur.__suppress_context__ else cur.__context__
    return False


# errnos of faults that pass (a disk or network filesystem hiccup, an NFS server restarting);
# anything else an OSError carries is a property of the path or the request.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET,
                               errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def os_store_error(exc: OSError, where: str) -> StoreError | None:
    """The store error an OSError on ``where`` (a store URI and key) stands for, or None when its
    errno says nothing about retrying (the caller re-raises the OSError then)."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError):
        err: StoreError = NotFound(where)
    elif exc.errno in _DENIED_ERRNOS:
        err = AccessDenied(f"{where}: {reason}: check the folder's owner, mode and mount")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err = OutOfSpace(f"no space left on {where}: free some space or pick another store")
    elif exc.errno in _TRANSIENT_ERRNOS:
        err = TransientStoreError(f"{where}: {reason} (a filesystem fault that may pass: retrying can help)")
    else:
        return None
    err.__cause__ = exc
    return err


class Store(abc.ABC):
    """Key/value object storage with ranged reads.

    ``uri`` names the store root so that it can be written into manifests and reopened with
    :func:`open_store`.
    """

    uri: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Write ``data`` (bytes, or a byte memoryview) at ``key`` atomically, replacing any
        previous object."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file at ``key`` atomically (multipart where the backend has it)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the whole object. Raises :class:`NotFound` when missing."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start``. Raises :class:`NotFound` when missing and
        :class:`StoreError` when the range runs past the end of the object."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes. Raises :class:`NotFound` when missing."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; missing keys are not an error."""

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Copy the object at ``key`` into a local file."""
        Path(path).write_bytes(self.get_bytes(key))

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the backend has one (lets readers memory-map)."""
        return None

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many were removed."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    @abc.abstractmethod
    def discard_incomplete(self, prefix: str) -> int:
        """Remove what killed writers left under ``prefix`` (temporary files, unfinished
        multipart uploads). Only call it on a prefix no live writer is using."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class InvalidKey(ValueError):
    """A key no store can hold: absolute, with empty, '.' or '..' parts, or a part too long."""


# Filesystems take file names of 255 bytes (NAME_MAX), and LocalStore writes through a
# temporary ".<name>.<8 random>.part" file, 15 bytes longer. S3 allows longer keys, but a store
# must be copyable between backends, so both refuse what a folder could not hold.
MAX_KEY_PART_BYTES = 240


def _check_key(key: str) -> str:
    shown = repr(key) if len(key) <= 80 else f"{key[:80]!r}... ({len(key)} characters)"
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid store key {shown}: use a relative '/'-separated path")
    if any(len(part.encode()) > MAX_KEY_PART_BYTES for part in key.split("/")):
        # Refused here, before the filesystem answers ENAMETOOLONG, an OSError no caller expects.
        raise InvalidKey(f"invalid store key {shown}: a path component is over {MAX_KEY_PART_BYTES} bytes")
    return key


class LocalStore(Store):
    """A folder on a filesystem (the embedded default; also what HPC users on a shared
    filesystem want). Writes go to a temporary file in the same folder and are renamed into
    place, which POSIX makes atomic."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    @contextmanager
    def _os_errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            err = os_store_error(e, f"{self.uri}/{key}")
            if err is None:
                raise
            raise err from e

    def _atomic_write(self, key: str, write) -> None:
        dest = self._path(key)
        with self._os_errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException as e:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = shutil.disk_usage(self.root).free
                    raise OutOfSpace(f"no space left writing {self.uri}/{key} ({free / 2**30:.2f} GiB free): "
                                     "free some space or pick another store, then rerun to resume") from e
                raise

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    def get_bytes(self, key: str) -> bytes:
        with self._os_errors(key):
            return self._path(key).read_bytes()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must be non-negative")
        with self._os_errors(key), open(self._path(key), "rb") as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise StoreError(f"range {start}+{length} runs past the end of {self.uri}/{key}")
        return data

    def size(self, key: str) -> int:
        with self._os_errors(key):
            return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        with self._os_errors(key):
            return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.exists():
            return []
        keys = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and name.endswith(".part"):
                    continue  # an in-flight write, not an object
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._os_errors(key):
            self._path(key).unlink(missing_ok=True)

    def discard_incomplete(self, prefix: str) -> int:
        base = self.root / prefix if prefix else self.root
        folder = base if base.is_dir() else base.parent
        if not folder.is_dir():
            return 0
        stale = [p for p in folder.rglob(".*.part") if str(p).startswith(str(base))]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        with self._os_errors(key):
            shutil.copyfile(self._path(key), path)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def open_store(uri: str | os.PathLike) -> Store:
    """Open a store from a URI: ``s3://bucket[/prefix]``, ``file:///path`` or a plain path.

    S3 settings (endpoint URL, credentials, region) come from the standard AWS environment
    variables and config files, as for any boto3 program; ``AWS_ENDPOINT_URL`` points at an
    S3-compatible server such as Ceph radosgw or MinIO.
    """
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from vitscope.s3 import S3Store

        return S3Store(bucket=parsed.netloc, prefix=parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or C:\ on Windows)
        return LocalStore(uri)
    raise ValueError(f"unsupported store URI {uri!r}: use a path, file:///path or s3://bucket/prefix")
