"""Model loading: token layouts and transforms are read from the model, never typed in."""

from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vitscope.datasets import DecodedImages, open_source
from vitscope.extractor import ExtractConfig, extract
from vitscope.models import ModelLoadError, ModelSpec, load_vit, tiny_open_clip_config
from vitscope.shards import ActivationSet
from vitscope.store import open_store

# A DINOv2-with-registers architecture, shrunk: same token layout (CLS, 4 registers, patches).
TINY_DINO = "vit_small_patch14_reg4_dinov2"
TINY_DINO_OPTIONS = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> tuple[str, str]:
    """(model name, checkpoint file) of a random tiny DINOv2-reg saved as a timm checkpoint."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_DINO, pretrained=False, num_classes=0, **TINY_DINO_OPTIONS)
    path = tmp_path_factory.mktemp("dino") / "dino.pth"
    torch.save(model.state_dict(), path)
    return f"timm:{TINY_DINO}", str(path)


def test_dinov2_registers_layout_and_tokens(planted_data, tiny_dino, tmp_path):
    data_root, items = planted_data
    name, ckpt = tiny_dino
    vit = load_vit(ModelSpec(name, ckpt, tuple(TINY_DINO_OPTIONS.items())))
    assert vit.pretrained_loaded
    assert (vit.layout.n_cls, vit.layout.n_registers, vit.layout.grid) == (1, 4, (4, 4))
    assert vit.transform.size == (56, 56) and vit.transform.mean == (0.485, 0.456, 0.406)

    with_reg = extract(ExtractConfig(data=str(data_root), store=str(tmp_path), model=name, pretrained=ckpt,
                                     model_options=json.dumps(TINY_DINO_OPTIONS), layers=(-1,), registers=True,
                                     max_images=6, workers=0, progress=False))
    without = extract(ExtractConfig(data=str(data_root), store=str(tmp_path), model=name, pretrained=ckpt,
                                    model_options=json.dumps(TINY_DINO_OPTIONS), layers=(-1,), max_images=6,
                                    workers=0, progress=False))
    store = open_store(tmp_path)
    a, b = ActivationSet.open(store, with_reg.set_id), ActivationSet.open(store, without.set_id)
    assert (a.layout.n_cls, a.layout.n_registers, a.layout.tokens_per_image) == (1, 4, 21)
    assert (b.layout.n_cls, b.layout.n_registers, b.layout.tokens_per_image) == (1, 0, 17)

    # Direct forward pass through timm's own transform and forward_intermediates.
    model = timm.create_model(TINY_DINO, pretrained=False, num_classes=0, **TINY_DINO_OPTIONS)
    model.load_state_dict(torch.load(ckpt))
    model.eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, 56, 56)}, model=model))
    ids = sorted(item.id for item in items)[:6]
    for i in (0, 5):
        x = transform(Image.open(data_root / ids[i]).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            (patches, prefix), = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, norm=False,
                                                             output_fmt="NLC", intermediates_only=True)
        stored = a.image_tokens(1, i)
        torch.testing.assert_close(stored[0], prefix[0, 0], atol=2e-2, rtol=2e-2)  # CLS (fp16 storage)
        torch.testing.assert_close(stored[1:5], prefix[0, 1:5], atol=2e-2, rtol=2e-2)  # registers
        torch.testing.assert_close(stored[5:], patches[0], atol=2e-2, rtol=2e-2)  # patches, never registers
        torch.testing.assert_close(b.image_tokens(1, i)[1:], patches[0], atol=2e-2, rtol=2e-2)


def test_registers_refused_when_the_model_has_none(planted_data, tiny_model_name, tmp_path):
    data_root, _ = planted_data
    with pytest.raises(ValueError, match="has no register tokens"):
        extract(ExtractConfig(data=str(data_root), store=str(tmp_path), model=tiny_model_name, pretrained=None,
                              registers=True, progress=False))


def test_our_transform_equals_the_libraries(planted_data, tiny_model_name, tiny_dino):
    data_root, items = planted_data
    image = Image.open(data_root / items[3].id).convert("RGB").resize((150, 97))  # not square
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_model_name)
    ours = load_vit(ModelSpec(tiny_model_name)).transform.tensor()
    torch.testing.assert_close(ours(image), preprocess(image), atol=1e-5, rtol=1e-5)

    name, ckpt = tiny_dino
    vit = load_vit(ModelSpec(name, ckpt, tuple((TINY_DINO_OPTIONS | {"img_size": 32}).items())))
    model = timm.create_model(TINY_DINO, pretrained=False, num_classes=0, **(TINY_DINO_OPTIONS | {"img_size": 32}))
    theirs = create_transform(**resolve_data_config({"input_size": (3, 32, 32), "crop_pct": 0.875}, model=model))
    ours = type(vit.transform)(**(vit.transform.__dict__ | {"crop_pct": 0.875})).tensor()
    torch.testing.assert_close(ours(image), theirs(image), atol=1e-5, rtol=1e-5)


def test_siglip_through_open_clip_has_no_cls_token():
    vit = load_vit(ModelSpec("ViT-B-16-SigLIP"))
    assert (vit.layout.n_cls, vit.layout.n_registers, vit.layout.grid) == (0, 0, (14, 14))
    x = torch.randn(1, 3, 224, 224)
    out = vit.residuals(x, [0])[0]
    assert out.shape == (1, 196, 768)
    direct = vit.module.trunk.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(out, direct)


def test_missing_weights_fail_clearly_or_fall_back_when_allowed(monkeypatch, caplog):
    """A failure raises with open_clip's own messages left in the log; the fallback replaces
    them with one warning of its own that gives the reason."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelLoadError, match="could not load ViT-S-32/openai"):
        load_vit(ModelSpec("ViT-S-32", "openai"))
    assert any(r.name == "root" and r.levelno == logging.ERROR for r in caplog.records)  # open_clip's, kept
    caplog.clear()
    vit = load_vit(ModelSpec("ViT-S-32", "openai"), allow_random=True)
    assert not vit.pretrained_loaded and vit.n_layers == 12
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.name == "vitscope.models" and "RANDOM weights" in warning.getMessage()
    assert "is not a known tag" in warning.getMessage()  # the reason open_clip gave
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vit(ModelSpec(f"timm:{TINY_DINO}", "/no/such.pth", tuple(TINY_DINO_OPTIONS.items())))
    assert np.isfinite(vit.d_model)


# A built-in open_clip name shrunk by options: its "openai" weights cannot load offline or fit
# the shrunk architecture, so it exercises the allow_random fallback in a second.
TINY_CLIP_OPTIONS = tiny_open_clip_config()


def _same_weights(a, b) -> bool:
    wa, wb = a.module.state_dict(), b.module.state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_random_weights_come_from_the_seed_and_leave_the_callers_rng_alone(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    seeded = load_vit("ViT-B-16", options=TINY_CLIP_OPTIONS)
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)  # the caller's stream is untouched
    fallback = load_vit("ViT-B-16", "openai", options=TINY_CLIP_OPTIONS, allow_random=True)
    other_seed = load_vit("ViT-B-16", options=TINY_CLIP_OPTIONS, init_seed=1)

    assert not fallback.pretrained_loaded and fallback.spec == seeded.spec  # the spec says what was loaded
    assert _same_weights(seeded, fallback) and not _same_weights(seeded, other_seed)

    ident = seeded.spec.identity()
    assert ident["init_seed"] == 0 and other_seed.spec.identity()["init_seed"] == 1
    pretrained = ModelSpec("ViT-B-16", "openai", seeded.spec.options)
    assert "init_seed" not in pretrained.identity() and pretrained.identity() != ident
    assert "init_seed" not in ModelSpec("hf-hub:org/model").identity()  # weights come with the name
    assert seeded.spec.describe() == "ViT-B-16 (random init, seed 0)"
    assert ModelSpec.from_record(other_seed.spec.record()) == other_seed.spec


def test_load_vit_takes_a_name_or_a_spec(tiny_model_name):
    by_name = load_vit(tiny_model_name)
    assert by_name.spec == ModelSpec(tiny_model_name) and by_name.pretrained_loaded
    assert load_vit(ModelSpec(f"timm:{TINY_DINO}", None, tuple(TINY_DINO_OPTIONS.items()))).layout.n_registers == 4
    with pytest.raises(TypeError, match="from the spec"):
        load_vit(ModelSpec(tiny_model_name), "openai")


def test_a_pil_image_through_the_vit_gives_its_stored_activations(planted_data, tiny_model_name, tmp_path):
    data_root, items = planted_data
    res = extract(ExtractConfig(data=str(data_root), store=str(tmp_path), model=tiny_model_name, pretrained=None,
                                layers=(0, -1), dtype="float32", max_images=6, batch_size=4, workers=0,
                                progress=False))
    aset = ActivationSet.open(open_store(tmp_path), res.set_id)
    vit = load_vit(ModelSpec.from_record(aset.manifest.model))  # a set names the ViT that made it
    ids = sorted(item.id for item in items)[:6]
    images = [Image.open(data_root / ids[i]) for i in (2, 5)]

    pixels = vit.preprocess(images)
    assert pixels.shape == (2, 3, *vit.transform.size)
    decoded = DecodedImages(open_source(str(data_root), max_images=6), vit.transform.tensor())
    assert torch.equal(vit.preprocess(images[0])[0], decoded[2][1])  # the extractor's own input

    acts = vit.activations(images, [0, -1], layout=aset.layout)
    assert sorted(acts) == [0, 1] and acts[1].shape == (2, aset.layout.tokens_per_image, vit.d_model)
    for j, i in enumerate((2, 5)):
        for layer in (0, 1):
            torch.testing.assert_close(acts[layer][j], aset.image_tokens(layer, i), rtol=1e-5, atol=1e-5)
    # The default layout is what extraction stores by default; pixels work as well as images.
    torch.testing.assert_close(vit.activations(pixels[1], -1)[1][0], aset.image_tokens(1, 5), rtol=1e-5, atol=1e-5)
    patches_only = vit.activations(images[0], 0, layout=vit.stored_layout(cls=False))[0][0]
    torch.testing.assert_close(patches_only, aset.image_tokens(0, 2)[1:], rtol=1e-5, atol=1e-5)
