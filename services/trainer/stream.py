"""Token streams over activation sets: shuffled at token level through a bounded buffer,
deterministic for a seed, covering every selected token exactly once per epoch, and able to
start at any token position (which is what makes a killed run resumable with the same order).

The order is a pure function of (seed, position):

- the set is cut into *chunks* of a few dozen consecutive images (one ranged read each);
- each epoch permutes the chunks (seeded by ``(seed, epoch)``) and groups consecutive chunks
  into *windows* of about ``buffer_tokens`` selected tokens;
- each window's tokens are permuted (seeded by ``(seed, epoch, window)``) and emitted in turn;
- the endless sequence of epochs is cut into batches of ``batch_size`` tokens.

So the tokens of a batch come from chunks spread over the whole set, memory is bounded by a
couple of windows whatever the size of the set, and resuming at token ``p`` only re-reads the
window that holds ``p``. Every chunk is read once per epoch for *all* requested layers, so a
sweep over several layers reads each byte once.

Each window is read straight into its shuffled order: every chunk's tokens go to the window
rows the permutation gives them, so a batch is then a contiguous slice of the window, handed
out without another copy. On a local store a chunk is one vectored read (``preadv``: the kernel
copies the file's bytes from the page cache to their scattered rows, without holding the GIL,
so the read threads copy in parallel); on S3 it is one ranged GET, scattered with numpy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.shards import ActivationSet, ShardRecord, from_storage, layer_file, storage_view
from vitscope.store import StoreError, os_store_error


def _libc_preadv():
    """libc's ``preadv`` through ctypes (Linux, the BSDs, macOS 11+), or None. Unlike
    ``os.preadv`` it takes a ready-made ``iovec`` array, so a chunk's thousands of destination
    rows cost one numpy expression instead of a Python object each."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).preadv  # the C library the interpreter links
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    return fn


_PREADV = _libc_preadv()
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else -1
_IOV_MAX = _IOV_MAX if _IOV_MAX > 0 else 1024  # POSIX guarantees at least 16; Linux has 1024


class StreamError(RuntimeError):
    """The activation set cannot be read as its manifest describes (missing or resized files,
    a store that went away)."""


@dataclass(frozen=True)
class TokenBatch:
    # layer -> [n, d] raw activations (float32, or the stored dtype), the same tokens in every layer
    xs: dict[int, torch.Tensor]
    # Global token ids (image_index * tokens_per_image + token position), for index accounting.
    ids: np.ndarray

    @property
    def x(self) -> torch.Tensor:
        """The activations of a single-layer stream."""
        if len(self.xs) != 1:
            raise ValueError(f"this batch holds layers {sorted(self.xs)}: use .xs[layer]")
        return next(iter(self.xs.values()))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class _Chunk:
    shard: int  # index into manifest.shards
    lo: int  # first image row within the shard
    hi: int


class _BufferPool:
    """Window buffers, reused once every batch cut from them is gone.

    A fresh buffer costs the kernel a zeroing pass over its pages (and on a fragmented
    machine, compaction for huge pages) before the read's copy can land: as much again as the
    copy. Batches are views of their window, so a buffer may only be reused when the last of
    them is garbage; each lease is a fresh exporting object whose finaliser, run when the last
    view dies, hands the buffer back."""

    def __init__(self, nbytes: int, keep: int):
        self.nbytes, self.keep = nbytes, keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def lease(self) -> np.ndarray:
        """``nbytes`` of uninitialised memory, as a uint8 array."""
        with self._lock:
            buf = self._free.pop() if self._free else np.empty(self.nbytes, np.uint8)
        exporter = (ctypes.c_char * self.nbytes).from_buffer(buf)
        weakref.finalize(exporter, self._give_back, buf)
        return np.frombuffer(exporter, np.uint8)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


class _Prefetcher:
    """Iterates over what ``produce(put, halt)`` puts, produced in a background thread (from
    construction on) into a queue of ``depth`` items. Its errors are raised in the consumer.
    Closing it (or dropping it) halts the producer, which must return once ``put`` returns
    False or ``halt`` is set."""

    def __init__(self, produce: Callable[[Callable[[object], bool], threading.Event], None], depth: int):
        q: queue.Queue = queue.Queue(maxsize=depth)
        halt = threading.Event()

        def put(item: object) -> bool:
            while not halt.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            try:
                produce(put, halt)
                put(_END)
            except BaseException as e:  # surface reader failures in the consumer
                put(e)

        # The thread must not refer to self, or an abandoned iterator would never be collected.
        self._queue, self._halt = q, halt
        self._thread = threading.Thread(target=run, daemon=True, name="token-stream")
        self._thread.start()
        self._closer = weakref.finalize(self, halt.set)

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self):
        if self._halt.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self.close()
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Stop the producer and wait for it (its reads finish or are cancelled)."""
        self._closer()
        self._thread.join()


_END = object()


@dataclass(frozen=True)
class _Window:
    rows: dict[int, np.ndarray]  # layer -> [tokens, d] in the stored dtype, in emission order
    ids: np.ndarray  # global token ids, in emission order


class TokenStream:
    """Batches of the selected tokens of one or more layers of an activation set.

    Reading runs ahead in background threads (chunk reads in parallel, then batch assembly
    and the dtype conversion), so the consumer only takes ready tensors off a queue; the queue
    is deep (``prefetch_batches``) because a GPU trainer's Python thread competes with the
    readers for the GIL, and a shallow queue turned that jitter into waits.
    Memory: up to three windows of ``buffer_tokens`` tokens per layer in the stored dtype,
    plus ``prefetch_batches`` batches.

    ``out_dtype`` is the dtype of the batches: float32 by default, or ``None`` for the stored
    dtype, which halves the bytes moved to a GPU and leaves the conversion to the GPU.
    """

    def __init__(self, aset: ActivationSet, layers: int | Sequence[int], token_positions: np.ndarray,
                 batch_size: int, seed: int = 0, buffer_tokens: int = 1 << 18, chunk_tokens: int = 8192,
                 read_threads: int = 4, prefetch_batches: int = 16, pin_memory: bool = False,
                 out_dtype: torch.dtype | None = torch.float32):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        m = aset.manifest
        self.aset = aset
        self.single = isinstance(layers, int)
        self.layers = [m.layer_position(layer) for layer in ([layers] if self.single else layers)]
        self.positions = np.asarray(token_positions, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_tokens = max(buffer_tokens, batch_size)
        self.read_threads = read_threads
        self.prefetch_batches = prefetch_batches
        self.pin_memory = pin_memory
        self.out_dtype = out_dtype
        per_image = max(1, len(self.positions))
        self.chunk_images = max(1, chunk_tokens // per_image)
        self._check_sizes()
        self.chunks = [_Chunk(i, lo, min(lo + self.chunk_images, s.n_images))
                       for i, s in enumerate(m.shards) for lo in range(0, s.n_images, self.chunk_images)]
        # A window ends with the chunk that takes it to buffer_tokens, so it holds less than
        # buffer_tokens plus one chunk. Kept free: the windows in flight (read, emitted, queued).
        window_tokens = self.buffer_tokens + self.chunk_images * per_image
        self._buffers = _BufferPool(window_tokens * m.bytes_per_token, keep=3 * len(self.layers))

    @property
    def layer(self) -> int:
        return self.layers[0]

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.aset) * len(self.positions)

    @property
    def buffer_bytes(self) -> int:
        """Memory the window buffers take while the consumer keeps up: three windows per layer
        (one being read, one being emitted, one still held by queued batches)."""
        return self._buffers.nbytes * self._buffers.keep

    def _check_sizes(self) -> None:
        """The manifest's file sizes must match its own shape (d_model, tokens per image):
        otherwise rows would be read at the wrong offsets, silently."""
        m = self.aset.manifest
        for shard in m.shards:
            for layer in self.layers:
                info = shard.files.get(f"{shard.name}/{layer_file(layer)}")
                expected = m.layer_nbytes(shard)
                if info is None:
                    raise StreamError(f"activation set {m.set_id}: {shard.name} lists no layer {layer}")
                if int(info["nbytes"]) != expected:
                    raise StreamError(
                        f"activation set {m.set_id}: {shard.name} layer {layer} holds {info['nbytes']} bytes, "
                        f"but {shard.n_images} images x {m.layout.tokens_per_image} tokens x d_model={m.d_model} "
                        f"in {m.dtype} need {expected}: the shards do not match the manifest's d_model")

    # --- reading ---------------------------------------------------------------------------
    def _unreadable(self, shard: ShardRecord, layer: int, lo: int, hi: int, e: Exception) -> StreamError:
        where = f"{self.aset.store.uri}/{self.aset.layer_key(shard, layer)}"
        return StreamError(f"cannot read {where} rows {lo}:{hi} ({e}): was the activation set removed or changed "
                           "while training?")

    def _read(self, shard: ShardRecord, layer: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one shard's layer file, [hi - lo, tokens, d] in the stored dtype
        (one ranged read)."""
        try:
            return self.aset.read_rows(shard, layer, lo, hi)
        except (OSError, ValueError, StoreError) as e:
            raise self._unreadable(shard, layer, lo, hi, e) from e

    def _fill(self, shard: ShardRecord, layer: int, lo: int, hi: int, out: np.ndarray, dest: np.ndarray) -> None:
        """Copy the selected tokens of rows [lo, hi) of one shard's layer file to rows ``dest``
        of ``out`` (image-major, in the order of ``positions``)."""
        path = self.aset.local_file(shard, layer) if _PREADV is not None else None
        if path is None:
            part = self._read(shard, layer, lo, hi)[:, self.positions]
            out[dest] = part.reshape(-1, part.shape[-1])
            return
        try:
            self._scatter_read(path, shard, lo, hi, out, dest)
        except StoreError as e:
            raise self._unreadable(shard, layer, lo, hi, e) from e
        except OSError as e:  # classified as the store's own read would be: flows retry only I/O faults
            cause = os_store_error(e, f"{self.aset.store.uri}/{self.aset.layer_key(shard, layer)}")
            raise self._unreadable(shard, layer, lo, hi, e) from (cause or e)

    def _scatter_read(self, path, shard: ShardRecord, lo: int, hi: int, out: np.ndarray, dest: np.ndarray) -> None:
        """One vectored read of rows [lo, hi) of a local file, each selected token landing in its
        own row of ``out``: a single copy of each byte, made by the kernel.

        The file span read runs from the first selected token of the first image to the last
        selected token of the last; tokens inside it that are not selected (the CLS token when
        training on patches) land in a scratch row. When fewer than half the tokens are
        selected, each image is its own span instead, so that a CLS-only stream does not read
        every patch."""
        m = self.aset.manifest
        tpi, bpt = m.layout.tokens_per_image, m.bytes_per_token
        scratch = np.empty(bpt, np.uint8)
        addr = np.full((hi - lo, tpi), scratch.ctypes.data, np.uint64)
        addr[:, self.positions] = (out.ctypes.data + dest.astype(np.uint64) * np.uint64(bpt)).reshape(hi - lo, -1)
        first, last = int(self.positions.min()), int(self.positions.max()) + 1
        if 2 * len(self.positions) >= tpi:
            spans = [(lo * tpi + first, addr.reshape(-1)[first:(hi - lo - 1) * tpi + last])]
        else:
            spans = [((lo + i) * tpi + first, addr[i, first:last]) for i in range(hi - lo)]
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != m.layer_nbytes(shard):
                raise StoreError(f"the file holds {size} bytes, the manifest says {m.layer_nbytes(shard)}")
            for token, rows in spans:
                iov = np.empty((len(rows), 2), np.uint64)
                iov[:, 0], iov[:, 1] = rows, bpt
                for a in range(0, len(iov), _IOV_MAX):
                    n = min(_IOV_MAX, len(iov) - a)
                    offset = (token + a) * bpt
                    while (got := _PREADV(fd, iov[a:a + n].ctypes.data, n, offset)) < 0:
                        if ctypes.get_errno() != errno.EINTR:
                            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                    if got != n * bpt:
                        raise StoreError(f"short read at byte {offset}: {got} of {n * bpt} bytes")
        finally:
            os.close(fd)

    def _chunk_ids(self, c: _Chunk) -> np.ndarray:
        m = self.aset.manifest
        images = m.shards[c.shard].first_image + np.arange(c.lo, c.hi)
        return (images[:, None] * m.layout.tokens_per_image + self.positions[None, :]).reshape(-1)

    def _plan(self, epoch: int) -> list[list[_Chunk]]:
        """The epoch's windows: consecutive chunks of a seeded permutation, ~buffer_tokens each."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        per_image = len(self.positions)
        windows: list[list[_Chunk]] = [[]]
        tokens = 0
        for i in order:
            c = self.chunks[i]
            if tokens >= self.buffer_tokens:
                windows.append([])
                tokens = 0
            windows[-1].append(c)
            tokens += (c.hi - c.lo) * per_image
        return windows

    def _windows(self, epoch: int, window: int, count: int | None, stop: threading.Event) -> Iterator[_Window]:
        """``count`` windows (None: endless) from (epoch, window) on. The next window's chunks
        are read in a thread pool while the current one is being emitted."""

        def spans() -> Iterator[tuple[int, int, list[_Chunk]]]:
            e, first, left = epoch, window, count
            while True:
                plan = self._plan(e)
                for w in range(first, len(plan)):
                    if left is not None:
                        if left == 0:
                            return
                        left -= 1
                    yield e, w, plan[w]
                e, first = e + 1, 0

        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="chunk-reader")
        try:
            ahead = None
            for e, w, chunks in spans():
                if stop.is_set():
                    return
                window = self._start_window(pool, e, w, chunks)
                if ahead is not None:
                    yield self._finish_window(*ahead)
                ahead = window
            if ahead is not None:
                yield self._finish_window(*ahead)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_window(self, pool: ThreadPoolExecutor, epoch: int, w: int, chunks: list[_Chunk]):
        """Allocate the window and submit its chunk reads; each chunk's tokens go straight to
        the rows where the window's permutation emits them."""
        m = self.aset.manifest
        per_image = len(self.positions)
        starts = np.cumsum([0] + [(c.hi - c.lo) * per_image for c in chunks])
        ids = np.concatenate([self._chunk_ids(c) for c in chunks])
        perm = np.random.default_rng([self.seed, epoch, w + 1]).permutation(len(ids))  # emission order
        dest = np.empty_like(perm)
        dest[perm] = np.arange(len(perm))  # the row of window token t is the step that emits it
        rows = {layer: self._buffers.lease()[:len(ids) * m.bytes_per_token].view(m.np_dtype)
                .reshape(len(ids), m.d_model) for layer in self.layers}
        reads = [pool.submit(self._fill, m.shards[c.shard], layer, c.lo, c.hi, rows[layer], dest[a:b])
                 for c, a, b in zip(chunks, starts[:-1], starts[1:], strict=True) for layer in self.layers]
        return _Window(rows, ids[perm]), reads

    @staticmethod
    def _finish_window(window: _Window, reads: list) -> _Window:
        for f in reads:
            f.result()  # raises the read's error, if any
        return window

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, offset within the window) of token ``position`` of the endless stream."""
        epoch, rest = divmod(position, self.tokens_per_epoch)
        per_image = len(self.positions)
        for w, chunks in enumerate(self._plan(epoch)):
            n = sum((c.hi - c.lo) * per_image for c in chunks)
            if rest < n:
                return epoch, w, rest
            rest -= n
        raise AssertionError("position beyond its epoch")  # windows tile the epoch

    # --- batches ---------------------------------------------------------------------------
    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[TokenBatch]:
        """Batches of tokens [start, stop) of the endless stream (epoch after epoch): full
        batches, except a shorter last one when stop - start is not a multiple of batch_size.

        Reading starts at once, not at the first ``next()``: a trainer creates the iterator
        before its set-up, so that the first window is read meanwhile."""
        if self.tokens_per_epoch == 0:
            raise StreamError(f"activation set {self.aset.manifest.set_id} has no selected tokens")
        if stop is not None and stop <= start:
            return _Prefetcher(lambda put, halt: None, 1)

        def produce(put: Callable[[object], bool], halt: threading.Event) -> None:
            epoch, w, offset = self.locate(start)
            todo = None if stop is None else stop - start
            count = None
            if stop is not None:
                last_epoch, last_w, _ = self.locate(stop - 1)
                count = sum(len(self._plan(e)) for e in range(epoch, last_epoch)) - w + last_w + 1
            pending: list[tuple[dict[int, np.ndarray], np.ndarray]] = []
            have = 0
            for win in self._windows(epoch, w, count, halt):
                pos, end = offset, len(win.ids)
                offset = 0
                while pos < end:
                    want = self.batch_size - have
                    if todo is not None:
                        want = min(want, todo)
                    sel = slice(pos, min(pos + want, end))
                    pos = sel.stop
                    pending.append(({layer: rows[sel] for layer, rows in win.rows.items()}, win.ids[sel]))
                    have += sel.stop - sel.start
                    if todo is not None:
                        todo -= sel.stop - sel.start
                    if have == self.batch_size or todo == 0:
                        if not put(self._assemble(pending)):
                            return
                        pending, have = [], 0
                    if todo == 0:
                        return

        return _Prefetcher(produce, self.prefetch_batches)

    def _assemble(self, pieces: list[tuple[dict[int, np.ndarray], np.ndarray]]) -> TokenBatch:
        """A batch from its slices of one or two windows: a batch inside one window shares the
        window's memory (no copy); one that straddles two is concatenated."""
        xs = {}
        for layer in self.layers:
            parts = [p[0][layer] for p in pieces]
            x = storage_view(parts[0] if len(parts) == 1 else np.concatenate(parts), self.aset.manifest.dtype)
            x = x if self.out_dtype is None else x.to(self.out_dtype)
            xs[layer] = x.pin_memory() if self.pin_memory else x
        return TokenBatch(xs, np.concatenate([p[1] for p in pieces]))

    def epoch(self, epoch: int = 0) -> Iterator[TokenBatch]:
        """One pass: every selected token exactly once, in an order fixed by (seed, epoch)."""
        return self.batches(epoch * self.tokens_per_epoch, (epoch + 1) * self.tokens_per_epoch)

    def __iter__(self) -> Iterator[TokenBatch]:
        """Epochs forever, in full batches; the trainer stops at its token budget."""
        return self.batches(0)

    def sample(self, n: int, seed: int = 0) -> dict[int, torch.Tensor] | torch.Tensor:
        """About ``n`` selected tokens for fitting the normalisation and b_dec: all the selected
        tokens of ceil(n / tokens per image) images drawn uniformly (one ranged read per image
        and layer on S3, instead of one per token), then n of them drawn uniformly.

        Returns a tensor for a single-layer stream, else layer -> tensor (same tokens)."""
        m = self.aset.manifest
        per_image = len(self.positions)
        rng = np.random.default_rng(seed)
        n = min(n, self.tokens_per_epoch)
        n_img = min(len(self.aset), -(-n // max(per_image, 1)))
        images = np.sort(rng.choice(len(self.aset), size=n_img, replace=False))
        rows: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        for shard in m.shards:
            mine = images[(images >= shard.first_image) & (images < shard.first_image + shard.n_images)]
            for image in mine - shard.first_image:
                for layer in self.layers:
                    rows[layer].append(self._read(shard, layer, int(image), int(image) + 1)[0, self.positions])
        pick = np.sort(rng.choice(n_img * per_image, size=n, replace=False))
        out = {layer: from_storage(np.concatenate(r)[pick], m.dtype) for layer, r in rows.items()}
        return out[self.layer] if self.single else out
