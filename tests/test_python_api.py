"""The docs' Python examples run. docs/python-api.md: in order, against a copy of the pipeline's
store, with the image the page starts from being a real image of the set, and what they
computed checked against the stored activations. docs/api.md: against a real analyzer."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import torch
from PIL import Image

from vitscope.shards import ActivationSet
from vitscope.store import open_store

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC = DOCS / "python-api.md"


def doc_blocks(doc: Path = DOC) -> list[tuple[str, str]]:
    """(info string, code) of every ```python block of a page, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"```python([^\n]*)\n(.*?)```", doc.read_text(), re.S)]


def run_blocks(doc: Path, ns: dict) -> dict:
    """Run a page's blocks in ``ns``, but its "setup" block: that one holds the page's stand-ins
    (an address, an id, an image) for what the test provides."""
    blocks = doc_blocks(doc)
    assert blocks and blocks[0][0] == "setup"
    for info, code in blocks:
        if info != "setup":
            exec(compile(code, f"{doc.name} block", "exec"), ns)
    return ns


def test_the_python_api_page_runs_and_means_what_it_says(pipeline, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(pipeline.store_uri, store)  # the page trains an SAE: not into the shared store
    aset = ActivationSet.open(open_store(store), pipeline.set_id)
    first = aset.image_record(0)["id"]
    assert len(doc_blocks()) >= 5
    ns = run_blocks(DOC, {"store": str(store), "sae_id": pipeline.sae_id, "image": Image.open(pipeline.data_root / first)})

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


def test_the_api_page_runs_against_a_real_analyzer(pipeline, analyzer_server):
    ns = run_blocks(DOCS / "api.md", {"address": analyzer_server, "sae_id": pipeline.sae_id})
    sae, latent, best, found = ns["sae"], ns["latent"], ns["best"], ns["found"]
    assert ns["id_of"](sae) == pipeline.sae_id and sae.analysis.endswith(pipeline.analysis_id)
    maxima = [s.max_activation for s in ns["strongest"].latents]
    assert maxima == sorted(maxima, reverse=True) and latent.max_activation == maxima[0]
    assert best.image.startswith(f"activationSets/{pipeline.set_id}/images/")
    assert Image.open(io.BytesIO(ns["png"])).format == "PNG"
    # The upload of the image as the model saw it finds the latent at the top of its image.
    assert latent.index in [a.latent_index for a in ns["encoded"].image_latents]
    assert found.latents and found.latents[0].positives_fired == 1
    ns["client"].close()
