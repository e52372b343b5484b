"""Session fixtures that run the real pipeline once: a tiny random open_clip ViT saved to a
local folder and loaded back through open_clip's own loading path, a planted-concept image
set, and the Prefect flow on a temporary Prefect server shared by the whole session."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Prefect reads its settings on import: point it at a throwaway home first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="vitscope-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from vitscope.synthetic import PlantedImage  # noqa: E402

TINY_IMAGE = 112  # tiny model input: 7 x 7 patches of 16 px
TINY_SQUARE = 32


@dataclass
class PipelineRun:
    store_uri: str
    set_id: str
    sae_id: str
    analysis_id: str
    data_root: Path
    model_name: str
    items: list[PlantedImage]
    skipped: list[str]


def tiny_model(folder: Path, seed: int = 0) -> str:
    """Save a randomly initialised tiny CLIP as a hub-style folder; returns its model name."""
    import open_clip
    import torch

    from vitscope.models import save_open_clip_dir, tiny_open_clip_config

    torch.manual_seed(seed)
    cfg = tiny_open_clip_config(image_size=TINY_IMAGE)
    return save_open_clip_dir(open_clip.CLIP(**cfg), cfg, folder)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the session (starting one takes ~15-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def planted_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PlantedImage]]:
    from vitscope.synthetic import make_planted_dataset

    root = tmp_path_factory.mktemp("planted") / "images"
    return root, make_planted_dataset(root, n_images=96, size=TINY_IMAGE, square=TINY_SQUARE, seed=1)


def pipeline_config(store: str, data: Path, model: str, **overrides):
    from vitscope.composition.flows import PipelineConfig

    cfg = dict(
        data=str(data), store=store, model=model, pretrained=None, layers=(-1,), workers=0,
        images_per_shard=16, expansion=8, l1_coeff=3.0, lr=1e-3, train_batch_size=1024,
        n_tokens=300_000, k=8, progress=False,
    )
    return PipelineConfig(**(cfg | overrides))


@pytest.fixture(scope="session")
def pipeline(prefect_server, tiny_model_name, planted_data, tmp_path_factory) -> PipelineRun:
    """The whole pipeline, run once through the Prefect flow into a local store."""
    from vitscope.composition.flows import pipeline_flow

    data_root, items = planted_data
    store = str(tmp_path_factory.mktemp("store"))
    result = pipeline_flow(pipeline_config(store, data_root, tiny_model_name))
    return PipelineRun(store, result.set_id, result.sae_id, result.analysis_id, data_root, tiny_model_name,
                       items, result.skipped)


@pytest.fixture(scope="session")
def analyzer_server(pipeline):
    """A real analyzer gRPC server on a free loopback port over the pipeline's store;
    yields its target ("127.0.0.1:PORT")."""
    from vitscope.analyzer import ServeConfig, serve

    server = serve(ServeConfig(store=pipeline.store_uri, port=0))
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=None)
