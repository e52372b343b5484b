"""Loading vision transformers and reading their residual stream.

One factory (:func:`load_vit`) for every model family; the token layout (CLS, registers, patch
grid) and the image transform are read from the model, never typed in by the user.

Model names:

- open_clip built-ins with a pretrained tag or a checkpoint file: ``ViT-B-16`` + ``openai``
- open_clip from the Hugging Face hub or a local folder holding ``open_clip_config.json`` and
  weights: ``hf-hub:imageomics/bioclip``, ``local-dir:/path/to/model``; SigLIP models that
  open_clip builds on a timm trunk (``ViT-B-16-SigLIP`` + ``webli``)
- timm ViTs, DINOv2 with and without registers included: ``timm:vit_base_patch14_reg4_dinov2.lvd142m``
  with ``pretrained`` = ``default`` (timm's own weights) or a checkpoint file
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from vitscope.device import resolve_device
from vitscope.hashing import sha256_file
from vitscope.shards import TokenLayout

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model (or its weights) could not be loaded."""


TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelSpec:
    """Which ViT to run.

    ``pretrained`` is an open_clip tag (``openai``), ``default`` for timm's own weights, or a
    checkpoint path; ``None`` means random initialisation (tests, offline demos), except for
    ``hf-hub:``/``local-dir:`` models, whose weights come with the name.
    ``options`` go to the model factory as keyword arguments (e.g. ``{"img_size": 224}`` for timm,
    or a smaller architecture for tests). ``init_seed`` seeds random weights, so that the same
    spec is the same network in every process; it is ignored when weights are loaded."""

    name: str
    pretrained: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    init_seed: int = 0

    @property
    def family(self) -> str:
        return "timm" if self.name.startswith(TIMM_PREFIX) else "open_clip"

    @property
    def random_weights(self) -> bool:
        """Whether this spec means randomly initialised weights (drawn from ``init_seed``)."""
        return self.pretrained is None and not self.name.startswith(("hf-hub:", "local-dir:"))

    def describe(self) -> str:
        if self.random_weights:
            return f"{self.name} (random init, seed {self.init_seed})"
        return f"{self.name}/{self.pretrained}" if self.pretrained else self.name

    def record(self) -> dict[str, Any]:
        """The spec as JSON (an activation set's manifest keeps it); :meth:`from_record` reads it back."""
        return {"name": self.name, "pretrained": self.pretrained, "options": dict(self.options),
                "init_seed": self.init_seed if self.random_weights else None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelSpec:
        """The spec a :meth:`record` (e.g. ``ActivationSet.manifest.model``) describes."""
        return cls(record["name"], record.get("pretrained"), tuple(sorted((record.get("options") or {}).items())),
                   record.get("init_seed") or 0)

    def identity(self) -> dict[str, Any]:
        """What determines the weights, for content ids: local files are identified by content,
        so renaming a checkpoint does not change the id but retraining it does; random weights
        by their seed (pretrained ids carry no seed, so they are what they were before seeds)."""
        ident: dict[str, Any] = {"family": self.family, "name": self.name, "pretrained": self.pretrained,
                                 "options": dict(self.options)}
        if self.random_weights:
            ident["init_seed"] = self.init_seed
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
    crop_pct: float = 1.0  # timm resizes the short side to size / crop_pct before the centre crop

    def to_json(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TransformInfo:
        return cls(tuple(d["size"]), d["interpolation"], d["resize_mode"], tuple(d["mean"]), tuple(d["std"]),
                   float(d.get("crop_pct", 1.0)))

    def geometric(self) -> T.Compose:
        """PIL image -> PIL image as the model sees it (before normalisation): the analyzer
        uses this to show images that patch heatmaps line up with."""
        interp = InterpolationMode(self.interpolation)
        if self.resize_mode == "shortest":
            if self.size[0] == self.size[1]:
                resize: int | tuple[int, int] = math.floor(self.size[0] / self.crop_pct)
            else:
                resize = tuple(math.floor(x / self.crop_pct) for x in self.size)
            steps = [T.Resize(resize, interpolation=interp), T.CenterCrop(self.size)]
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
    """A loaded vision tower with hooks on its residual stream.

    ``blocks`` are the transformer blocks whose outputs are the residual stream; ``layout`` is
    the model's full token layout (every token it has, in order). :meth:`preprocess` and
    :meth:`activations` are what the extractor runs, so ``vit.activations(image, layer)`` gives
    the rows an activation set stores for that image."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, blocks: Sequence[torch.nn.Module],
                 layout: TokenLayout, d_model: int, transform: TransformInfo, pretrained_loaded: bool,
                 batch_first: bool = True):
        self.spec = spec
        self.module = module.eval()
        self.blocks = blocks
        self.layout = layout
        self.d_model = d_model
        self.transform = transform
        self.pretrained_loaded = pretrained_loaded
        self.batch_first = batch_first

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def resolve_layers(self, layers: Sequence[int] | str) -> list[int]:
        """Absolute, sorted, unique block indices; accepts negatives and "all"."""
        if layers == "all":
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
        # Hooks sit on the shared module, so another thread's forward (the analyzer encodes
        # uploads concurrently) runs them too: each call records and stops only its own.
        owner = threading.get_ident()

        def make_hook(i: int):
            def hook(_module, _inp, out):
                if threading.get_ident() != owner:
                    return None
                out = out[0] if isinstance(out, tuple) else out
                captured[i] = out if self.batch_first else out.transpose(0, 1)
                if i == deepest:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_hook(make_hook(i)) for i in layers]
        try:
            self.module(pixels)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor, layer: int | None = None,
              edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The model's final image embedding [B, e] of ``pixels`` (what its head reads: open_clip's
        projected embedding, timm's pooled pre-logits), optionally with the residual stream after
        block ``layer`` replaced by ``edit(residual)``: ``edit`` takes and returns [B, tokens, d]
        (every token of :attr:`layout`), and the rest of the network runs on what it returns.
        This is how an SAE's reconstruction is spliced in, and how latents are steered."""
        handles = []
        if edit is not None:
            if layer is None:
                raise ValueError("an edit needs the layer whose output it replaces")
            owner = threading.get_ident()  # as in residuals: the module is shared across threads

            def hook(_module, _inp, out):
                if threading.get_ident() != owner:
                    return None
                rest = out[1:] if isinstance(out, tuple) else None
                h = out[0] if rest is not None else out
                h = edit(h if self.batch_first else h.transpose(0, 1))
                h = h if self.batch_first else h.transpose(0, 1)
                return (h, *rest) if rest is not None else h

            handles.append(self.blocks[self.resolve_layers([layer])[0]].register_forward_hook(hook))
        device = self.device
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pixels = pixels.to(device, non_blocking=True)
                out = self.module.embed(pixels) if isinstance(self.module, _ForwardFeatures) else self.module(pixels)
        finally:
            for h in handles:
                h.remove()
        return (out[0] if isinstance(out, tuple) else out).float()

    def stored_layout(self, cls: bool = True, registers: bool = False) -> TokenLayout:
        """The token layout an extraction with these options stores: CLS (if ``cls`` and the
        model has one), registers (if ``registers``), then every patch."""
        if registers and self.layout.n_registers == 0:
            raise ValueError(f"{self.spec.describe()} has no register tokens (drop --registers, registers=True)")
        return TokenLayout(n_cls=self.layout.n_cls if cls else 0,
                           n_registers=self.layout.n_registers if registers else 0, grid=self.layout.grid)

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> the model's input ``[B, 3, H, W]`` (``B`` = 1 for one image): RGB,
        resize, crop and normalisation, the transform the extractor applies to every image."""
        to_tensor = self.transform.tensor()
        return torch.stack([to_tensor(im) for im in ([images] if isinstance(images, Image.Image) else images)])

    def activations(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor,
                    layers: int | Sequence[int] | str, layout: TokenLayout | None = None) -> dict[int, torch.Tensor]:
        """Residual-stream activations ``[B, tokens, d]`` of ``layers``, keyed by absolute block
        index (``-2`` on a 12-block model gives key ``10``), as an activation set stores them.

        ``images`` are PIL images (preprocessed by :meth:`preprocess`) or pixels it made
        (``[B, 3, H, W]`` or ``[3, H, W]``). ``layout`` picks the tokens, in stored order: an
        activation set's ``layout`` gives exactly its rows; the default is what ``vitscope
        extract`` stores by default (:meth:`stored_layout`: CLS and patches). Runs on the
        model's device, under bfloat16 autocast on CUDA as extraction does; the result stays there."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        device = self.device
        absolute = self.resolve_layers([layers] if isinstance(layers, int) else layers)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = self.residuals(pixels.to(device, non_blocking=True), absolute)
        layout = self.stored_layout() if layout is None else layout
        if layout == self.layout:
            return out
        keep = torch.as_tensor(self._token_positions(layout), device=device)
        return {layer: out[layer][:, keep] for layer in absolute}

    def _token_positions(self, layout: TokenLayout) -> np.ndarray:
        """Where ``layout``'s tokens sit in the model's full token sequence."""
        full = self.layout
        if layout.grid != full.grid or layout.n_cls > full.n_cls or layout.n_registers > full.n_registers:
            raise ValueError(f"token layout {layout} is not a part of {self.spec.describe()}'s {full}")
        return np.concatenate([
            np.arange(layout.n_cls),
            np.arange(full.n_cls, full.n_cls + layout.n_registers),
            np.arange(full.patch_start, full.tokens_per_image),
        ])

    def to(self, device: str | torch.device) -> ViT:
        self.module.to(device)
        return self


def load_vit(model: str | ModelSpec, pretrained: str | None = None, *, options: Mapping[str, Any] | None = None,
             init_seed: int | None = None, device: str | torch.device = "cpu", allow_random: bool = False) -> ViT:
    """Build a ViT: ``load_vit("ViT-B-16", "openai")``, ``load_vit("local-dir:/path")``,
    ``load_vit("timm:vit_base_patch14_reg4_dinov2.lvd142m", "default")`` or ``load_vit(spec)``.

    ``model`` is a model name (see the module docstring) or a :class:`ModelSpec`; with a name,
    ``pretrained``, ``options`` and ``init_seed`` make its spec (with a spec they are in it).
    Without ``pretrained`` a built-in architecture gets random weights, seeded by ``init_seed``
    (default 0); the caller's random state is left as it was. ``device`` is a torch device or
    ``"auto"`` (the GPU if there is one).

    With ``allow_random`` a failure to get pretrained weights (offline, say) is logged plainly
    and the same architecture is used with random weights (the returned ViT's ``spec`` then says
    so); otherwise it raises :class:`ModelLoadError`.
    """
    if isinstance(model, ModelSpec):
        if pretrained is not None or options is not None or init_seed is not None:
            raise TypeError("load_vit(spec) takes pretrained, options and init_seed from the spec, not beside it")
        spec = model
    else:
        spec = ModelSpec(model, pretrained, tuple(sorted((options or {}).items())),
                         0 if init_seed is None else init_seed)
    device = str(resolve_device(str(device)))
    held = _HeldRootRecords()
    try:
        with held:
            return _build(spec, device)
    except ModelLoadError:
        raise
    except Exception as e:  # open_clip/timm/HF raise many types for "could not get the weights"
        local = spec.name.startswith(("hf-hub:", "local-dir:")) or (spec.pretrained and os.path.exists(spec.pretrained))
        if not allow_random or local or spec.pretrained is None:
            raise ModelLoadError(f"could not load {spec.describe()}: {e}") from e
        held.records.clear()  # the warning below gives their reason
        reason = str(e).split(". ")[0][:300]
        log.warning(
            "could not get pretrained weights for %s (%s: %s); using RANDOM weights of the same architecture: "
            "the pipeline runs, but its latents describe an untrained network",
            spec.describe(), type(e).__name__, reason,
        )
        try:
            with _HeldRootRecords():  # open_clip's "initialized randomly": said above
                return _build(replace(spec, pretrained=None), device)
        except Exception as e2:
            raise ModelLoadError(f"could not build {spec.name}: {e2}") from e2
    finally:
        held.release()


class _HeldRootRecords(logging.Filter):
    """Holds back what is logged on the root logger itself while a model is built: open_clip
    reports there (``logging.error`` for weights it then fails to get, raising as well). When
    :func:`load_vit` falls back to random weights, its own warning says why and the held
    records are dropped; otherwise :meth:`release` passes them on as they were. (Records other
    threads log on the root logger itself meanwhile are held alike.)"""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def __enter__(self) -> _HeldRootRecords:
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)

    def release(self) -> None:
        for record in self.records:
            logging.getLogger().handle(record)
        self.records.clear()


def _build(spec: ModelSpec, device: str) -> ViT:
    """Weights a spec does not load are drawn from its own seed on the CPU (both factories
    initialise there before moving the model), so every process builds the same network;
    forking the RNG keeps the caller's random stream where it was."""
    loader = _load_timm if spec.family == "timm" else _load_open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return loader(spec, device)


def load_text_tower(spec: ModelSpec, device: str | torch.device = "cpu") -> Callable[[Sequence[str]], torch.Tensor] | None:
    """For a CLIP-family model (open_clip), a function from texts to their unit embeddings in
    the image embedding's space, with the same weights :func:`load_vit` gives ``spec`` (random
    ones are drawn from the same seed); None for a model without a text tower (timm). Kept apart
    from :class:`ViT`, which only needs the vision tower, so serving pays nothing for it."""
    if spec.family == "timm":
        return None
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained,
                                                            device=str(resolve_device(str(device))),
                                                            **dict(spec.options))
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.name)

    @torch.inference_mode()
    def encode(texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenizer(list(texts)).to(next(model.parameters()).device)
        e = model.encode_text(tokens).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return encode


def _timm_layout(trunk: torch.nn.Module) -> TokenLayout:
    """Token layout of a timm VisionTransformer: [cls][registers][patches]."""
    n_cls = 1 if getattr(trunk, "has_class_token", False) else 0
    n_reg = int(getattr(trunk, "num_reg_tokens", 0))
    if int(getattr(trunk, "num_prefix_tokens", n_cls + n_reg)) != n_cls + n_reg:
        raise ModelLoadError(f"{type(trunk).__name__} has prefix tokens other than CLS and registers")
    if getattr(trunk, "dynamic_img_size", False):
        raise ModelLoadError("models with a dynamic image size have no fixed patch grid; set img_size")
    return TokenLayout(n_cls=n_cls, n_registers=n_reg, grid=tuple(trunk.patch_embed.grid_size))


def _load_open_clip(spec: ModelSpec, device: str) -> ViT:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained, device=device,
                                                        **dict(spec.options))
    loaded = not spec.random_weights
    visual = model.visual
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    transform = TransformInfo(
        size=tuple(size) if isinstance(size, (tuple, list)) else (size, size),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        has_cls = getattr(visual, "class_embedding", None) is not None
        layout = TokenLayout(n_cls=1 if has_cls else 0, n_registers=0, grid=tuple(visual.grid_size))
        return ViT(spec, visual, visual.transformer.resblocks, layout, int(visual.transformer.width), transform,
                   loaded, batch_first=getattr(visual.transformer, "batch_first", True))
    trunk = getattr(visual, "trunk", None)  # SigLIP and friends: open_clip around a timm ViT
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        return ViT(spec, visual, trunk.blocks, _timm_layout(trunk), int(trunk.embed_dim), transform, loaded)
    raise ModelLoadError(f"{spec.describe()} has no ViT vision tower (got {type(visual).__name__})")


def _load_timm(spec: ModelSpec, device: str) -> ViT:
    import timm
    from timm.data import resolve_data_config

    name = spec.name.removeprefix(TIMM_PREFIX)
    kw: dict[str, Any] = {"num_classes": 0, **dict(spec.options)}
    use_weights = not spec.random_weights
    if use_weights and spec.pretrained != "default":
        if not os.path.isfile(spec.pretrained):
            raise ModelLoadError(f"checkpoint {spec.pretrained!r} does not exist (use 'default' for timm's weights)")
        kw["pretrained_cfg_overlay"] = {"file": spec.pretrained}
    model = timm.create_model(name, pretrained=use_weights, **kw).to(device)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ModelLoadError(f"{name} is not a ViT (got {type(model).__name__})")
    # The pretrained config may name another resolution than the model was built for (img_size).
    cfg = resolve_data_config({"input_size": (3, *model.patch_embed.img_size)}, model=model)
    if cfg.get("crop_mode", "center") != "center":
        raise ModelLoadError(f"timm crop mode {cfg['crop_mode']!r} is not supported yet")
    transform = TransformInfo(size=tuple(cfg["input_size"][1:]), interpolation=cfg["interpolation"],
                              resize_mode="shortest", mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                              crop_pct=float(cfg.get("crop_pct", 1.0)))
    # forward_features runs every block; the classifier head is not needed.
    return ViT(spec, _ForwardFeatures(model), model.blocks, _timm_layout(model), int(model.embed_dim), transform,
               use_weights)


class _ForwardFeatures(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the classifier head reads (pre-logits)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


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
    """A very small CLIP architecture (for tests and quick demos on a CPU). The text tower keeps
    the real tokenizer's vocabulary, so zero-shot readouts run on it."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
