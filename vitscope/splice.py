"""The SAE inside its ViT: the layer's tokens replaced by their reconstruction (substitution),
by zeros or their mean (ablation), or by a reconstruction with chosen latents scaled (steering),
and the rest of the network run on the result (:meth:`vitscope.models.ViT.embed`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.models import ViT
from vitscope.sae import Sae, SaeRecord

ZERO_SHOT_TEMPLATE = "a photo of a {}."
"""The prompt of CLIP zero-shot readouts, one per class name."""


def zero_shot_logits(embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """CLIP zero-shot logits [B, classes]: 100 x the cosine of each image embedding [B, e] with
    each class prompt's unit text embedding [classes, e] (:func:`vitscope.models.load_text_tower`)."""
    return 100.0 * (embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ prompts.T


@dataclass
class Splice:
    """Edits of the residual stream after ``layer`` at the tokens the SAE was trained on
    (``positions``, in the model's full token layout); every other token passes unchanged."""

    vit: ViT
    sae: Sae
    layer: int
    positions: torch.Tensor

    @classmethod
    def of(cls, vit: ViT, sae: Sae, record: SaeRecord) -> Splice:
        positions = torch.as_tensor(np.asarray(vit.layout.token_indices(record.tokens)), device=vit.device)
        return cls(vit, sae, record.layer, positions)

    def _replace(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            out[:, self.positions] = fn(h[:, self.positions].float()).to(h.dtype)
            return out

        return edit

    def substitute(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The SAE's reconstruction in place of the tokens."""
        return self._replace(self.sae.reconstruct)

    def ablate(self, mode: str = "zero") -> Callable[[torch.Tensor], torch.Tensor]:
        """Zeros (``"zero"``) or the activations' training mean (``"mean"``) in place of the tokens."""
        if mode not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', not {mode!r}")
        mean = self.sae.norm_mean.float()
        return self._replace(lambda x: torch.zeros_like(x) if mode == "zero" else mean.expand_as(x))

    def steer(self, scales: Mapping[int, float]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Each latent in ``scales`` multiplied by its factor (0 ablates it), decoded, plus the
        SAE's error term ``x - reconstruction``: with no latents changed the tokens come back as
        they were, so a readout's change is the latents' doing, not the reconstruction error's."""
        d_sae = self.sae.cfg.d_sae
        bad = [n for n in scales if not 0 <= int(n) < d_sae]
        if bad:
            raise ValueError(f"latents {bad} do not exist: this SAE has {d_sae} (0..{d_sae - 1})")
        idx = torch.as_tensor([int(n) for n in scales], dtype=torch.long, device=self.positions.device)
        factor = torch.as_tensor([float(v) for v in scales.values()], device=self.positions.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            z = self.sae.encode(x)
            error = x - self.sae.decode(z)
            z[..., idx] = z[..., idx] * factor
            return self.sae.decode(z) + error

        return self._replace(fn)

    def embed(self, pixels: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The final image embeddings [B, e], with ``edit`` applied after the SAE's layer."""
        return self.vit.embed(pixels, self.layer, edit) if edit is not None else self.vit.embed(pixels)


@torch.no_grad()
def intervene(vit: ViT, sae: Sae, record: SaeRecord, pixels: torch.Tensor, scales: Mapping[int, float],
              readout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Steer latents of images and read the change: ``pixels`` [B, 3, H, W] (``vit.preprocess``),
    ``scales`` {latent: factor} (0 ablates a latent, 2 doubles it), ``readout`` a function of the
    final embeddings (class probabilities of a probe or of CLIP zero-shot, say; default the
    embedding itself). Returns ``before`` and ``after`` readouts, their difference ``change`` and
    the cosine of the embeddings before and after (``cosine``)."""
    splice = Splice.of(vit, sae, record)
    clean = splice.embed(pixels, splice.steer({}))
    steered = splice.embed(pixels, splice.steer(scales))
    read = readout or (lambda e: e)
    before, after = read(clean), read(steered)
    return {"before": before, "after": after, "change": after - before,
            "cosine": torch.nn.functional.cosine_similarity(clean, steered, dim=-1)}
