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

Reading a chunk means one ranged GET on S3; on a local store it means memory-mapping the rows
with their pages populated up front (``MAP_POPULATE``), so batches are gathered straight from
the page cache: one copy of each byte, as for a plain sequential read.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.shards import DTYPES, ActivationSet, ShardRecord, from_storage, layer_file
from vitscope.store import StoreError

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages fault in on first touch


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


@dataclass(frozen=True)
class _Window:
    parts: list[dict[int, np.ndarray]]  # per chunk: layer -> [images, tokens, d] in the stored dtype
    starts: np.ndarray  # offset of each chunk's first selected token in the window, then the total
    ids: np.ndarray
    perm: np.ndarray  # emission order


def _torch_view(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> tensor of the stored dtype, sharing memory (bf16 is kept as raw bits)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class TokenStream:
    """Batches of the selected tokens of one or more layers of an activation set.

    Reading runs ahead in background threads (chunk reads in parallel, then batch assembly
    and the dtype conversion), so the consumer only takes ready tensors off a queue.
    Memory: about two windows of ``buffer_tokens`` tokens per layer in the stored dtype, plus
    ``prefetch_batches`` batches.

    ``out_dtype`` is the dtype of the batches: float32 by default, or ``None`` for the stored
    dtype, which halves the bytes moved to a GPU and leaves the conversion to the GPU.
    """

    def __init__(self, aset: ActivationSet, layers: int | Sequence[int], token_positions: np.ndarray,
                 batch_size: int, seed: int = 0, buffer_tokens: int = 1 << 18, chunk_tokens: int = 8192,
                 read_threads: int = 4, prefetch_batches: int = 4, pin_memory: bool = False,
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
        self._row_bytes = m.layout.tokens_per_image * m.bytes_per_token

    @property
    def layer(self) -> int:
        return self.layers[0]

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.aset) * len(self.positions)

    def _check_sizes(self) -> None:
        """The manifest's file sizes must match its own shape (d_model, tokens per image):
        otherwise rows would be read at the wrong offsets, silently."""
        m = self.aset.manifest
        for shard in m.shards:
            for layer in self.layers:
                info = shard.files.get(f"{shard.name}/{layer_file(layer)}")
                expected = shard.n_images * m.layout.tokens_per_image * m.bytes_per_token
                if info is None:
                    raise StreamError(f"activation set {m.set_id}: {shard.name} lists no layer {layer}")
                if int(info["nbytes"]) != expected:
                    raise StreamError(
                        f"activation set {m.set_id}: {shard.name} layer {layer} holds {info['nbytes']} bytes, "
                        f"but {shard.n_images} images x {m.layout.tokens_per_image} tokens x d_model={m.d_model} "
                        f"in {m.dtype} need {expected}: the shards do not match the manifest's d_model")

    # --- reading ---------------------------------------------------------------------------
    def _read(self, shard: ShardRecord, layer: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one shard's layer file, [hi - lo, tokens, d] in the stored dtype: a
        memory-mapped view on a local store, one ranged GET on S3."""
        m = self.aset.manifest
        np_dtype = DTYPES[m.dtype][0]
        key = f"{self.aset.prefix}/{shard.name}/{layer_file(layer)}"
        shape = (hi - lo, m.layout.tokens_per_image, m.d_model)
        try:
            path = self.aset.store.local_path(key)
            if path is not None:
                return self._map(path, shard, lo, hi).view(np_dtype).reshape(shape)
            raw = self.aset.store.get_range(key, lo * self._row_bytes, (hi - lo) * self._row_bytes)
            return np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        except (OSError, ValueError, StoreError) as e:
            raise StreamError(f"cannot read {self.aset.store.uri}/{key} rows {lo}:{hi} ({e}): was the activation "
                              f"set removed or changed while training?") from e

    def _map(self, path, shard: ShardRecord, lo: int, hi: int) -> np.ndarray:
        """Bytes of rows [lo, hi) of a local file, memory-mapped with its page tables filled
        up front (MAP_POPULATE: one bulk read-ahead instead of a page fault per 4 KiB)."""
        start, end = lo * self._row_bytes, hi * self._row_bytes
        base = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != shard.n_images * self._row_bytes:
                raise StreamError(f"{path} holds {size} bytes, expected {shard.n_images * self._row_bytes}: "
                                  f"the file does not match the manifest")
            mm = mmap.mmap(f.fileno(), end - base, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                           offset=base)
        return np.frombuffer(mm, dtype=np.uint8)[start - base:]

    def _open_chunk(self, c: _Chunk) -> dict[int, np.ndarray]:
        shard = self.aset.manifest.shards[c.shard]
        return {layer: self._read(shard, layer, c.lo, c.hi) for layer in self.layers}

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
                reads = [pool.submit(self._open_chunk, c) for c in chunks]
                if ahead is not None:
                    yield self._window(*ahead)
                ahead = (e, w, chunks, reads)
            if ahead is not None:
                yield self._window(*ahead)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _window(self, epoch: int, w: int, chunks: list[_Chunk], reads: list) -> _Window:
        per_image = len(self.positions)
        starts = np.cumsum([0] + [(c.hi - c.lo) * per_image for c in chunks])
        ids = np.concatenate([self._chunk_ids(c) for c in chunks])
        perm = np.random.default_rng([self.seed, epoch, w + 1]).permutation(len(ids))
        return _Window([f.result() for f in reads], starts, ids, perm)

    def _gather(self, win: _Window, sel: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Tokens ``sel`` (window offsets) of every layer and their ids. They come out in
        storage order (the order within a batch means nothing to training), so that each chunk's
        tokens are one ``take`` into a contiguous slice: a single copy of each byte."""
        m = self.aset.manifest
        sel = np.sort(sel)  # chunk by chunk, rows ascending within each: friendlier to caches and TLB
        chunk = np.searchsorted(win.starts, sel, side="right") - 1
        row, col = np.divmod(sel - win.starts[chunk], len(self.positions))
        flat = row * m.layout.tokens_per_image + self.positions[col]
        bounds = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(sel)]
        out = {layer: np.empty((len(sel), m.d_model), DTYPES[m.dtype][0]) for layer in self.layers}
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            part = win.parts[chunk[a]]
            for layer in self.layers:
                np.take(part[layer].reshape(-1, m.d_model), flat[a:b], axis=0, out=out[layer][a:b])
        return out, win.ids[sel]

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
        batches, except a shorter last one when stop - start is not a multiple of batch_size."""
        if self.tokens_per_epoch == 0:
            raise StreamError(f"activation set {self.aset.manifest.set_id} has no selected tokens")
        if stop is not None and stop <= start:
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        halt = threading.Event()

        def put(item) -> bool:
            while not halt.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                epoch, w, offset = self.locate(start)
                todo = None if stop is None else stop - start
                count = None
                if stop is not None:
                    last_epoch, last_w, _ = self.locate(stop - 1)
                    count = sum(len(self._plan(e)) for e in range(epoch, last_epoch)) - w + last_w + 1
                pending: list[tuple[dict[int, np.ndarray], np.ndarray]] = []
                have = 0
                for win in self._windows(epoch, w, count, halt):
                    perm = win.perm[offset:]
                    offset = 0
                    while len(perm):
                        want = self.batch_size - have
                        if todo is not None:
                            want = min(want, todo)
                        sel, perm = perm[:want], perm[want:]
                        pending.append(self._gather(win, sel))
                        have += len(sel)
                        if todo is not None:
                            todo -= len(sel)
                        if have == self.batch_size or todo == 0:
                            if not put(self._assemble(pending)):
                                return
                            pending, have = [], 0
                        if todo == 0:
                            put(None)
                            return
            except BaseException as e:  # surface reader failures in the consumer
                put(e)

        t = threading.Thread(target=work, daemon=True, name="token-stream")
        t.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            halt.set()
            t.join()

    def _assemble(self, pieces: list[tuple[dict[int, np.ndarray], np.ndarray]]) -> TokenBatch:
        xs = {}
        for layer in self.layers:
            parts = [p[0][layer] for p in pieces]
            x = _torch_view(parts[0] if len(parts) == 1 else np.concatenate(parts), self.aset.manifest.dtype)
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
