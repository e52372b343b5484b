"""An activation set as a notebook sees it: batches of float32 tokens, each token with its
provenance (which image, which label, which kind of token, which patch of the grid).

Rows are read through :meth:`ActivationSet.read_rows`, the same code the trainer's stream and
the analyzer use, so what a notebook sees is byte for byte what they trained and analysed on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from vitscope.shards import PREFIX, ActivationSet, Manifest, from_storage
from vitscope.store import open_store


class ActivationBatch(NamedTuple):
    """A batch of tokens of consecutive images of a set, image-major (an image's selected
    tokens are consecutive, in their stored order). Every field has one entry per token."""

    x: torch.Tensor
    """[n_tokens, d_model] float32: the activations as stored (raw, not normalised)."""
    image_index: torch.Tensor
    """[n_tokens] int64: the image's row in the set (the dataset's canonical order)."""
    image_id: tuple[str, ...]
    """The image's stable id within the dataset (relative path or URI)."""
    label: tuple[str | None, ...]
    """The image's label, None when the dataset has none."""
    kind: tuple[str, ...]
    """The token's kind: ``"cls"``, ``"reg0"``, ``"reg1"``, ... or ``"patch"``."""
    position: torch.Tensor
    """[n_tokens] int64: the token's index among its image's stored tokens (what
    :meth:`ActivationSet.image_tokens` rows are indexed by)."""
    patch_row: torch.Tensor
    """[n_tokens] int64: the patch's row in the grid; -1 for CLS and register tokens."""
    patch_col: torch.Tensor
    """[n_tokens] int64: the patch's column in the grid; -1 for CLS and register tokens."""


class Activations:
    """The selected tokens of one layer of an activation set, in batches of ``batch_images``
    images (the last batch may hold fewer), in the set's row order. Iterable any number of
    times; ``len()`` is the number of batches.

    ``layer`` is absolute or as requested at extraction (e.g. -2); None takes the set's last
    stored layer, as the trainer does. ``tokens`` are kinds of :meth:`TokenLayout.token_indices`:
    ``"patches"``, ``"cls"``, ``"registers"`` or ``"all"``."""

    def __init__(self, aset: ActivationSet, layer: int | None = None, tokens: Sequence[str] = ("patches",),
                 batch_images: int = 64):
        if batch_images <= 0:
            raise ValueError(f"batch_images must be positive (got {batch_images})")
        m = aset.manifest
        self.aset = aset
        self.layer = m.layers[-1] if layer is None else m.layer_position(layer)
        self.batch_images = batch_images
        self.positions = aset.layout.token_indices(tuple(tokens))
        layout = aset.layout
        kinds = layout.kinds()
        self._kinds = tuple(kinds[p] for p in self.positions)
        patch = self.positions - layout.patch_start
        is_patch = patch >= 0
        cols = layout.grid[1]
        self._rows = torch.from_numpy(np.where(is_patch, patch // cols, -1))
        self._cols = torch.from_numpy(np.where(is_patch, patch % cols, -1))

    @property
    def manifest(self) -> Manifest:
        """The set's manifest: model, layers, dtype, token layout, dataset, shards."""
        return self.aset.manifest

    @property
    def n_images(self) -> int:
        return self.manifest.n_images

    @property
    def tokens_per_image(self) -> int:
        """Selected tokens per image (each batch holds this many per image)."""
        return len(self.positions)

    @property
    def n_tokens(self) -> int:
        """Selected tokens over the whole set."""
        return self.n_images * self.tokens_per_image

    def __len__(self) -> int:
        return -(-self.n_images // self.batch_images)

    def __iter__(self) -> Iterator[ActivationBatch]:
        m = self.manifest
        records: dict[int, list[dict[str, Any]]] = {}  # by shard index; only the shards still being read
        shards = iter(s for s in m.shards if s.n_images)
        shard = next(shards, None)
        for start in range(0, m.n_images, self.batch_images):
            stop = min(start + self.batch_images, m.n_images)
            xs, meta = [], []
            at = start
            while at < stop:
                while shard.first_image + shard.n_images <= at:
                    records.pop(shard.index, None)
                    shard = next(shards)
                lo, hi = at - shard.first_image, min(stop, shard.first_image + shard.n_images) - shard.first_image
                if shard.index not in records:
                    records[shard.index] = self.aset.shard_records(shard)
                xs.append(self.aset.read_rows(shard, self.layer, lo, hi)[:, self.positions])
                meta += records[shard.index][lo:hi]
                at = shard.first_image + hi
            yield self._batch(start, stop, np.concatenate(xs), meta)

    def _batch(self, start: int, stop: int, rows: np.ndarray, meta: list[dict[str, Any]]) -> ActivationBatch:
        per = self.tokens_per_image
        n = stop - start
        return ActivationBatch(
            x=from_storage(rows.reshape(n * per, -1), self.manifest.dtype),
            image_index=torch.arange(start, stop).repeat_interleave(per),
            image_id=tuple(r["id"] for r in meta for _ in range(per)),
            label=tuple(r.get("label") for r in meta for _ in range(per)),
            kind=self._kinds * n,
            position=torch.from_numpy(self.positions).repeat(n),
            patch_row=self._rows.repeat(n),
            patch_col=self._cols.repeat(n),
        )


def open_activations(uri: str | os.PathLike, layer: int | None = None, tokens: Sequence[str] = ("patches",),
                     batch_images: int = 64) -> Activations:
    """Open a published activation set from its URI, ``<store>/activations/<set_id>`` (e.g.
    ``s3://bucket/prefix/activations/0123abcd`` or ``/path/store/activations/0123abcd``), to
    iterate its tokens as tensors with their provenance.

    ``layer``: absolute block index or as requested at extraction (e.g. -2); None is the last
    stored layer. ``tokens``: which token kinds, ``("patches",)``, ``("cls",)``,
    ``("registers",)``, ``("all",)`` or a combination. Each batch holds every selected token of
    ``batch_images`` consecutive images (fewer in the last batch) as an :class:`ActivationBatch`.

    Example: where a direction ``v`` (a tensor of d_model floats, e.g. an SAE's decoder row)
    points most, image by image and patch by patch::

        acts = vitscope.open_activations("s3://bucket/prefix/activations/0123abcd", layer=-2)
        acts.manifest.layout.grid, len(acts)        # (14, 14), batches of 64 images each
        for batch in acts:
            t = int((batch.x @ v).argmax())          # the batch's strongest token
            print(batch.image_id[t], batch.label[t], batch.patch_row[t].item(), batch.patch_col[t].item())

    Raises :class:`vitscope.store.NotFound` when the store has no such published set and
    ``ValueError`` for a URI of another shape, a layer the set lacks or an unknown token kind."""
    uri = os.fspath(uri).rstrip("/")
    root, sep, set_id = uri.rpartition(f"/{PREFIX}/")
    if not sep or not set_id or "/" in set_id:
        raise ValueError(f"{uri!r} is not an activation set URI: expected <store>/{PREFIX}/<set_id>")
    aset = ActivationSet.open(open_store(root or "/"), set_id)
    return Activations(aset, layer=layer, tokens=tokens, batch_images=batch_images)
