"""Token streams over activation sets: shuffled at token level through a bounded buffer,
deterministic for a seed, and covering every selected token exactly once per epoch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.shards import ActivationSet, from_storage


@dataclass(frozen=True)
class TokenBatch:
    x: torch.Tensor  # float32 [n, d] raw activations
    # Global token ids (image_index * tokens_per_image + token position), for index accounting.
    ids: np.ndarray


class TokenStream:
    """Iterate batches of tokens of one layer of an activation set.

    Shards are read in a seeded order by a background thread (so the reader overlaps compute),
    their selected tokens go into a buffer of at most ``buffer_tokens`` rows, and batches are
    drawn from a random permutation of the buffer's older half. Memory is bounded by the buffer
    plus one prefetched shard, whatever the size of the set.
    """

    def __init__(self, aset: ActivationSet, layer: int, token_positions: np.ndarray, batch_size: int,
                 seed: int = 0, buffer_tokens: int = 1 << 18, prefetch: int = 2):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.aset = aset
        self.layer = aset.manifest.layer_position(layer)
        self.positions = np.asarray(token_positions, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_tokens = max(buffer_tokens, 2 * batch_size)
        self.prefetch = prefetch

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.aset) * len(self.positions)

    def _read_shards(self, order: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(stored rows [n_tokens, d], ids) per shard in ``order``, read ahead in a thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        m = self.aset.manifest
        tpi = m.layout.tokens_per_image

        def work() -> None:
            try:
                for i in order:
                    if stop.is_set():
                        return
                    shard = m.shards[i]
                    a = np.asarray(self.aset.shard_array(shard, self.layer)[:, self.positions])
                    ids = ((shard.first_image + np.arange(shard.n_images))[:, None] * tpi + self.positions[None, :])
                    q.put((a.reshape(-1, m.d_model), ids.reshape(-1)))
                q.put(None)
            except BaseException as e:  # surface reader failures in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="shard-reader")
        t.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)

    def epoch(self, epoch: int = 0) -> Iterator[TokenBatch]:
        """One pass: every selected token exactly once, in an order fixed by (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = list(rng.permutation(len(self.aset.manifest.shards)))
        dtype = self.aset.manifest.dtype
        buf_x: list[np.ndarray] = []
        buf_ids: list[np.ndarray] = []
        buffered = 0

        def drain(n_keep: int) -> Iterator[TokenBatch]:
            nonlocal buf_x, buf_ids, buffered
            x, ids = np.concatenate(buf_x), np.concatenate(buf_ids)
            perm = rng.permutation(len(x))
            out_n = len(x) - n_keep
            out_n -= out_n % self.batch_size if n_keep else 0  # full batches while more data follows
            emit, keep = perm[:out_n], perm[out_n:]
            for s in range(0, out_n, self.batch_size):
                sel = emit[s:s + self.batch_size]
                yield TokenBatch(from_storage(x[sel], dtype), ids[sel])
            buf_x, buf_ids, buffered = [x[keep]], [ids[keep]], len(keep)

        for x, ids in self._read_shards(order):
            buf_x.append(x)
            buf_ids.append(ids)
            buffered += len(x)
            if buffered >= self.buffer_tokens:
                yield from drain(self.buffer_tokens // 2)
        if buffered:
            yield from drain(0)

    def __iter__(self) -> Iterator[TokenBatch]:
        """Epochs forever, in full batches (an epoch's short last batch is topped up from the
        next epoch); the trainer stops at its token budget."""
        epoch = 0
        carry: TokenBatch | None = None
        while True:
            for batch in self.epoch(epoch):
                if carry is not None:
                    batch = TokenBatch(torch.cat([carry.x, batch.x]), np.concatenate([carry.ids, batch.ids]))
                    carry = None
                if len(batch.ids) < self.batch_size:
                    carry = batch
                    continue
                yield TokenBatch(batch.x[: self.batch_size], batch.ids[: self.batch_size])
                if len(batch.ids) > self.batch_size:
                    carry = TokenBatch(batch.x[self.batch_size:], batch.ids[self.batch_size:])
            epoch += 1

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """A uniform random sample of up to ``n`` selected tokens (for normalisation and b_dec)."""
        m = self.aset.manifest
        rng = np.random.default_rng(seed)
        total = self.tokens_per_epoch
        picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
        rows = []
        per_image = len(self.positions)
        for shard in m.shards:
            lo, hi = shard.first_image * per_image, (shard.first_image + shard.n_images) * per_image
            mine = picks[(picks >= lo) & (picks < hi)] - lo
            if len(mine) == 0:
                continue
            a = self.aset.shard_array(shard, self.layer)
            rows.append(np.asarray(a[mine // per_image, self.positions[mine % per_image]]))
        return from_storage(np.concatenate(rows), m.dtype)
