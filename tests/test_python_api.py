"""docs/python-api.md runs: its examples, in order, against a copy of the pipeline's store, with
the image the page starts from being a real image of the set. Then what they computed is checked
against the stored activations."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from PIL import Image

from vitscope.shards import ActivationSet
from vitscope.store import open_store

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def doc_blocks() -> list[tuple[str, str]]:
    """(info string, code) of every ```python block of the page, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"```python([^\n]*)\n(.*?)```", DOC.read_text(), re.S)]


def test_the_python_api_page_runs_and_means_what_it_says(pipeline, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(pipeline.store_uri, store)  # the page trains an SAE: not into the shared store
    aset = ActivationSet.open(open_store(store), pipeline.set_id)
    first = aset.image_record(0)["id"]
    blocks = doc_blocks()
    assert [info for info, _ in blocks][0] == "setup" and len(blocks) >= 5
    ns: dict = {"store": str(store), "sae_id": pipeline.sae_id, "image": Image.open(pipeline.data_root / first)}
    for info, code in blocks:
        if info != "setup":  # the page's stand-ins for a store, an id and an image are ours here
            exec(compile(code, f"{DOC.name} block", "exec"), ns)

    sae, vit, acts = ns["sae"], ns["vit"], ns["acts"]
    layer = sae.record.layer
    assert sae.record.activation_set_id == pipeline.set_id and layer in aset.manifest.layers
    assert vit.d_model == aset.manifest.d_model and vit.layout.grid == aset.layout.grid
    # The live path reproduces what extraction stored for this image (stored as float16).
    torch.testing.assert_close(acts[0], aset.image_tokens(layer, 0), atol=2e-2, rtol=2e-2)
    assert ns["latents"].shape == (1, aset.layout.tokens_per_image, sae.cfg.d_sae)
    torch.testing.assert_close(ns["latents"][0], sae.encode(acts[0]))
    assert ns["heat"].shape == aset.layout.grid
    torch.testing.assert_close(ns["same"], ns["recon"])
    # The reconstruction is in the raw space: far closer to the input than the input is to 0.
    assert (ns["recon"] - acts).norm() < 0.9 * acts.norm()
    batch = ns["batch"]
    assert len(batch.image_id) == len(batch.x) and set(batch.kind) <= {"patch"}
    assert (batch.patch_row >= 0).all() and (batch.patch_row < aset.layout.grid[0]).all()
    assert ns["topk"].record.activation_set_id == pipeline.set_id
