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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.shards import DTYPES, ActivationSet, ShardRecord, from_storage, layer_file
from vitscope.store import StoreError


class StreamError(RuntimeError):
    """The activation set cannot be read as its manifest describes (missing or resized files,
    a store that went away)."""


@dataclass(frozen=True)
class TokenBatch:
    xs: dict[int, torch.Tensor]  # layer -> float32 [n, d] raw activations, same tokens in every layer
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
    xs: dict[int, np.ndarray]  # layer -> [n, d] stored dtype, in read order
    ids: np.ndarray
    perm: np.ndarray  # emission order


def _torch_view(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> tensor of the stored dtype, sharing memory (bf16 is kept as raw bits)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class TokenStream:
    """Batches of the selected tokens of one or more layers of an activation set.

    Reading runs ahead in background threads (chunk reads in parallel, then batch assembly
    and the float32 conversion), so the consumer only takes ready tensors off a queue.
    Memory: about two windows of ``buffer_tokens`` tokens per layer in the stored dtype, plus
    ``prefetch_batches`` float32 batches.
    """

    def __init__(self, aset: ActivationSet, layers: int | Sequence[int], token_positions: np.ndarray,
                 batch_size: int, seed: int = 0, buffer_tokens: int = 1 << 18, chunk_tokens: int = 8192,
                 read_threads: int = 4, prefetch_batches: int = 4, pin_memory: bool = False):
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
        """Rows [lo, hi) of one shard's layer file: [hi - lo, tokens, d] in the stored dtype."""
        m = self.aset.manifest
        np_dtype = DTYPES[m.dtype][0]
        key = f"{self.aset.prefix}/{shard.name}/{layer_file(layer)}"
        shape = (hi - lo, m.layout.tokens_per_image, m.d_model)
        try:
            path = self.aset.store.local_path(key)
            if path is not None:
                full = (shard.n_images, *shape[1:])
                return np.array(np.memmap(path, dtype=np_dtype, mode="r", shape=full)[lo:hi])
            raw = self.aset.store.get_range(key, lo * self._row_bytes, (hi - lo) * self._row_bytes)
            return np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        except (OSError, ValueError, StoreError) as e:
            raise StreamError(f"cannot read {self.aset.store.uri}/{key} rows {lo}:{hi} ({e}): was the activation "
                              f"set removed or changed while training?") from e

    def _read_chunk(self, c: _Chunk) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """The selected tokens of one chunk for every layer (each file range read once)."""
        m = self.aset.manifest
        shard = m.shards[c.shard]
        xs = {layer: self._read(shard, layer, c.lo, c.hi)[:, self.positions].reshape(-1, m.d_model)
              for layer in self.layers}
        images = shard.first_image + np.arange(c.lo, c.hi)
        ids = (images[:, None] * m.layout.tokens_per_image + self.positions[None, :]).reshape(-1)
        return xs, ids

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

    def _windows(self, epoch: int, window: int, stop: threading.Event) -> Iterator[_Window]:
        """Windows from (epoch, window) on, forever, each read with parallel chunk reads."""
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="chunk-reader") as pool:
            while True:
                plan = self._plan(epoch)
                for w in range(window, len(plan)):
                    if stop.is_set():
                        return
                    parts = list(pool.map(self._read_chunk, plan[w]))
                    xs = {layer: np.concatenate([p[0][layer] for p in parts]) for layer in self.layers}
                    ids = np.concatenate([p[1] for p in parts])
                    perm = np.random.default_rng([self.seed, epoch, w + 1]).permutation(len(ids))
                    yield _Window(xs, ids, perm)
                epoch, window = epoch + 1, 0

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
        dtype = self.aset.manifest.dtype

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
                pending: list[tuple[dict[int, torch.Tensor], np.ndarray]] = []
                have = 0
                for win in self._windows(epoch, w, halt):
                    views = {layer: _torch_view(a, dtype) for layer, a in win.xs.items()}
                    perm = win.perm[offset:]
                    offset = 0
                    while len(perm):
                        want = self.batch_size - have
                        if todo is not None:
                            want = min(want, todo)
                        sel, perm = perm[:want], perm[want:]
                        idx = torch.from_numpy(sel)
                        pending.append(({layer: v.index_select(0, idx) for layer, v in views.items()}, win.ids[sel]))
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

    def _assemble(self, pieces: list[tuple[dict[int, torch.Tensor], np.ndarray]]) -> TokenBatch:
        xs = {}
        for layer in self.layers:
            parts = [p[0][layer] for p in pieces]
            x = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
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
                    a = self._read(shard, layer, int(image), int(image) + 1)
                    rows[layer].append(a[0, self.positions])
        pick = np.sort(rng.choice(n_img * per_image, size=n, replace=False))
        out = {layer: from_storage(np.concatenate(r)[pick], m.dtype) for layer, r in rows.items()}
        return out[self.layer] if self.single else out
