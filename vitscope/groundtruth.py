"""Synthetic activations with a known answer, written as a real activation set.

Each token is a sparse non-negative combination of known unit directions in superposition
(more directions than dimensions) plus Gaussian noise. A good SAE's decoder rows should find
the directions; :func:`recovery` measures how many it found. The set goes through
:class:`vitscope.shards.ShardWriter`, so training on it exercises the real loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitscope.hashing import content_id
from vitscope.shards import Manifest, ShardWriter, TokenLayout, to_storage
from vitscope.store import Store


@dataclass(frozen=True)
class GroundTruth:
    d_model: int = 64
    n_directions: int = 128
    active: int = 4
    """Directions active in every token (drawn uniformly without replacement)."""
    noise: float = 0.05
    """Standard deviation of the per-dimension Gaussian noise (coefficients are 0.5 to 1.5)."""
    n_images: int = 2048
    grid: tuple[int, int] = (4, 4)
    images_per_shard: int = 256
    dtype: str = "float32"
    layers: tuple[int, ...] = (0,)
    """Each layer has its own directions and tokens."""
    seed: int = 0

    def directions(self, layer: int = 0) -> torch.Tensor:
        """The true unit directions of ``layer`` [n_directions, d_model]."""
        # Offset so that no small seed shares its stream with an SAE's initialisation
        # (torch.randn with the same seed would plant the answer in the initial decoder).
        g = torch.Generator().manual_seed(0x5EED_0000 + self.seed * 1000 + layer)
        w = torch.randn(self.n_directions, self.d_model, generator=g)
        return w / w.norm(dim=1, keepdim=True)


def write_ground_truth_set(store: Store, gt: GroundTruth) -> Manifest:
    """Publish the activation set of ``gt`` (a CLS token built like the patches, then the
    patch grid), one shard in memory at a time."""
    layout = TokenLayout(n_cls=1, n_registers=0, grid=gt.grid)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in gt.__dict__.items()}
    manifest = Manifest(
        set_id=content_id({"ground-truth-set": params}), model={"spec": "ground-truth", "n_layers": 1},
        layers=list(gt.layers), layers_requested=list(gt.layers), d_model=gt.d_model, dtype=gt.dtype, layout=layout,
        transform={}, dataset={"kind": "ground-truth", **params}, images_per_shard=gt.images_per_shard,
    )
    writer = ShardWriter(store, manifest, gt.images_per_shard)
    dirs = {layer: gt.directions(layer) for layer in gt.layers}
    g = torch.Generator().manual_seed(0x5EED_8000 + gt.seed)
    shards = []
    for index, first in enumerate(range(0, gt.n_images, gt.images_per_shard)):
        n = min(gt.images_per_shard, gt.n_images - first)
        acts: dict[int, np.ndarray] = {}
        for layer in gt.layers:
            x = _tokens(dirs[layer], n * layout.tokens_per_image, gt, g)
            acts[layer] = to_storage(x.reshape(n, layout.tokens_per_image, gt.d_model), gt.dtype)
        records = [{"id": f"ground-truth/{i:06d}", "label": None} for i in range(first, first + n)]
        shards.append(writer.write_shard(index, acts, records, (first, first + n)))
    return writer.finish(shards)


def _tokens(dirs: torch.Tensor, n: int, gt: GroundTruth, g: torch.Generator) -> torch.Tensor:
    which = torch.rand(n, gt.n_directions, generator=g).argsort(dim=1)[:, :gt.active]
    coef = 0.5 + torch.rand(n, gt.active, generator=g)
    return torch.einsum("tk,tkd->td", coef, dirs[which]) + gt.noise * torch.randn(n, gt.d_model, generator=g)


@torch.no_grad()
def recovery(decoder: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions matched by some decoder row [d_sae, d] at cosine > threshold."""
    dec = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (directions @ dec.T).max(dim=1).values
    return float((best > threshold).float().mean())
