"""What ``vitscope evaluate`` is asked to do (reading it imports no model code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvaluateConfig:
    """Evaluate a trained SAE: reconstruction, the SAE spliced into its ViT, probing, label alignment, stability.

    Publishes a versioned JSON report with plots under evaluations/<report_id>/ (docs/evaluation.md)."""

    sae: str
    """SAE id (printed by `vitscope train`)."""
    store: str = ".vitscope/store"
    """Store holding the SAE and its activation sets; the report is published there too."""
    heldout: str | None = None
    """Activation set of images the SAE never trained on (same model and layer, e.g. extracted from a
    validation split). Default: the SAE's own training set, and the report says so."""
    images: int = 256
    """Images of the evaluation set used (spread evenly over it): their tokens for reconstruction and
    label alignment, the images themselves for substitution and probing."""
    masks: str | None = None
    """Segmentation masks for patch-level label alignment: a folder with <image id>.png per image
    (pixels are class indices, 0 background) and optionally classes.txt (the names, one per line).
    Default: the planted-object boxes of sets made by vitscope.synthetic, or none."""
    patch_tokens: int = 8192
    """At most this many labelled patches for label alignment (bounds memory: patches x d_sae floats)."""
    compare: tuple[str, ...] = ()
    """SAE ids trained with other seeds on the same data: stability by Hungarian matching of decoder rows."""
    ablation: Literal["zero", "mean"] = "zero"
    """What replaces the layer's tokens for the 'ablated' score of fraction recovered: zeros, or the
    training mean of the activations (the SAE's normaliser)."""
    batch_images: int = 32
    """Images run through the ViT at once."""
    seed: int = 0
    """Seed of the probes' train/test split and of k-means."""
    device: str = "auto"
    """Where the ViT and the SAE run: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    progress: bool = True
    """Show progress bars of the passes over images and tokens."""
