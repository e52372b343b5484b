"""Loading vision transformers and reading their residual stream.

One factory (:func:`load_vit`) for every model family; the token layout (CLS, registers, patch
grid) and the image transform are read from the model, never typed in by the user.

Model names:

- open_clip built-ins with a pretrained tag or a checkpoint file: ``ViT-B-16`` + ``openai``
- open_clip from the Hugging Face hub or a local folder holding ``open_clip_config.json`` and
  weights: ``hf-hub:imageomics/bioclip``, ``local-dir:/path/to/model``
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from vitscope.hashing import sha256_file
from vitscope.shards import TokenLayout

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model (or its weights) could not be loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """Which ViT to run. ``pretrained`` is an open_clip tag (``openai``) or a checkpoint path;
    ``None`` means random initialisation (tests, offline demos)."""

    name: str
    pretrained: str | None = None

    def describe(self) -> str:
        return f"{self.name}/{self.pretrained}" if self.pretrained else f"{self.name} (random init)"

    def identity(self) -> dict[str, Any]:
        """What determines the weights, for content ids: local files are identified by content,
        so renaming a checkpoint does not change the id but retraining it does."""
        ident: dict[str, Any] = {"family": "open_clip", "name": self.name, "pretrained": self.pretrained}
        if self.name.startswith("local-dir:"):
            folder = Path(self.name.removeprefix("local-dir:"))
            ident["name"] = "local-dir"
            ident["files"] = {
                p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
            }
        elif self.pretrained and os.path.isfile(self.pretrained):
            ident["pretrained"] = {"sha256": sha256_file(self.pretrained)}
        return ident


@dataclass(frozen=True)
class TransformInfo:
    """The geometric part of a model's preprocessing plus its normalisation."""

    size: tuple[int, int]
    interpolation: str
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TransformInfo:
        return cls(tuple(d["size"]), d["interpolation"], d["resize_mode"], tuple(d["mean"]), tuple(d["std"]))

    def geometric(self) -> T.Compose:
        """PIL image -> PIL image as the model sees it (before normalisation): the analyzer
        uses this to show images that patch heatmaps line up with."""
        interp = InterpolationMode(self.interpolation)
        if self.resize_mode == "shortest":
            steps = [T.Resize(min(self.size) if self.size[0] == self.size[1] else self.size, interpolation=interp),
                     T.CenterCrop(self.size)]
        elif self.resize_mode == "squash":
            steps = [T.Resize(self.size, interpolation=interp)]
        else:
            raise ModelLoadError(f"resize mode {self.resize_mode!r} is not supported yet")
        return T.Compose([T.Lambda(lambda im: im.convert("RGB")), *steps])

    def tensor(self) -> T.Compose:
        """PIL image -> normalised float tensor [3, H, W], the model's input."""
        return T.Compose([
            self.geometric(),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: later blocks are not needed."""


class ViT:
    """A loaded vision tower with hooks on its residual stream."""

    def __init__(self, spec: ModelSpec, visual: torch.nn.Module, transform: TransformInfo, pretrained_loaded: bool):
        self.spec = spec
        self.visual = visual.eval()
        self.transform = transform
        self.pretrained_loaded = pretrained_loaded
        self.blocks: Sequence[torch.nn.Module] = visual.transformer.resblocks
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        has_cls = getattr(visual, "class_embedding", None) is not None
        self.layout = TokenLayout(n_cls=1 if has_cls else 0, n_registers=0, grid=tuple(visual.grid_size))
        self.d_model = int(visual.transformer.width)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def resolve_layers(self, layers: Sequence[int] | str) -> list[int]:
        """Absolute, sorted, unique block indices; accepts negatives and "all"."""
        if layers == "all" or layers == ["all"]:
            return list(range(self.n_layers))
        out = set()
        for layer in layers:
            layer = int(layer)
            if not -self.n_layers <= layer < self.n_layers:
                raise ValueError(
                    f"layer {layer} does not exist: {self.spec.describe()} has {self.n_layers} blocks "
                    f"(valid: 0..{self.n_layers - 1} or -{self.n_layers}..-1)"
                )
            out.add(layer % self.n_layers)
        return sorted(out)

    @torch.inference_mode()
    def residuals(self, pixels: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs of the given blocks (absolute indices) as [B, tokens, d]: the residual stream
        after each block, every token the model has."""
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(i: int):
            def hook(_module, _inp, out):
                out = out[0] if isinstance(out, tuple) else out
                captured[i] = out if self.batch_first else out.transpose(0, 1)
                if i == deepest:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_hook(make_hook(i)) for i in layers]
        try:
            self.visual(pixels)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def to(self, device: str | torch.device) -> ViT:
        self.visual.to(device)
        return self


def load_vit(spec: ModelSpec, device: str = "cpu", allow_random: bool = False) -> ViT:
    """Build a ViT from ``spec``.

    With ``allow_random`` a failure to get pretrained weights (offline, say) is logged plainly
    and the same architecture is used with random weights; otherwise it raises
    :class:`ModelLoadError`.
    """
    import open_clip

    try:
        model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained, device=device)
        loaded = spec.pretrained is not None or spec.name.startswith(("hf-hub:", "local-dir:"))
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/HF errors
        if not allow_random or spec.name.startswith(("hf-hub:", "local-dir:")):
            raise ModelLoadError(f"could not load {spec.describe()}: {e}") from e
        log.warning(
            "could not get pretrained weights for %s (%s); using RANDOM weights of the same architecture: "
            "the pipeline runs, but its latents describe an untrained network",
            spec.describe(), type(e).__name__,
        )
        try:
            model = open_clip.create_model(spec.name, pretrained=None, device=device)
        except Exception as e2:
            raise ModelLoadError(f"could not build {spec.name}: {e2}") from e2
        loaded = False
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise ModelLoadError(f"{spec.describe()} has no ViT vision tower (got {type(visual).__name__})")
    cfg = visual.preprocess_cfg
    transform = TransformInfo(
        size=tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    return ViT(spec, visual, transform, pretrained_loaded=loaded)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) as RGB."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def save_open_clip_dir(model: torch.nn.Module, model_cfg: dict[str, Any], folder: str | os.PathLike,
                       preprocess_cfg: dict[str, Any] | None = None) -> str:
    """Save an open_clip model as a folder that ``local-dir:<folder>`` loads, laid out as on
    the Hugging Face hub (``open_clip_config.json`` + ``open_clip_model.safetensors``), so that
    loading it exercises the same path as ``hf-hub:`` ids. Returns the model name to use."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder.resolve()}"


def tiny_open_clip_config(image_size: int = 112, patch_size: int = 16, width: int = 64, layers: int = 2) -> dict[str, Any]:
    """A very small CLIP architecture (for tests and quick demos on a CPU)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
