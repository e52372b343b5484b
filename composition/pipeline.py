"""What ``vitscope pipeline`` is asked to do: the four stage configs, nested, plus what only the
pipeline decides (the data, the store, how extraction is split); and ``vitscope sweep``, whose
groups run as Prefect tasks too. Reading it imports no Prefect.

The stage settings are the stages' own configs (``--extract.*``, ``--train.*``, ``--analyze.*``,
``--evaluate.*`` on the command line), so a default cannot differ between ``vitscope pipeline`` and the stage
commands. The fields the pipeline fills in itself (each stage's store, extraction's data, the
activation set that training reads and the SAE that analysis reads) default to empty and are
hidden from the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from vitscope.analyzer import AnalyzeConfig
from vitscope.evaluator import EvaluateConfig
from vitscope.extractor import ExtractConfig
from vitscope.sae import TopKHyper
from vitscope.trainer import SweepConfig, TrainConfig


def cluster_kwargs(text: str | None) -> dict[str, Any] | None:
    """``--dask-cluster-kwargs`` (JSON on the command line, in both the pipeline and a sweep) as
    the keyword arguments for the cluster class."""
    return json.loads(text) if text else None


@dataclass
class ExtractStage(ExtractConfig):
    """Extraction as the pipeline runs it (data and store are the pipeline's)."""

    data: str = ""
    store: str = ""


@dataclass
class TrainStage(TrainConfig):
    """Training as the pipeline runs it (on the set the extraction published, in the pipeline's
    store, its final metrics on the held-out set the pipeline extracted, if any)."""

    activations: str = ""
    store: str = ""


@dataclass
class AnalyzeStage(AnalyzeConfig):
    """Analysis as the pipeline runs it (of the SAE the training published, in the pipeline's store)."""

    sae: str = ""
    store: str = ""


@dataclass
class EvaluateStage(EvaluateConfig):
    """Evaluation as the pipeline runs it (of the SAE the training published, on the held-out set
    the pipeline extracted, if any)."""

    sae: str = ""
    store: str = ""


PIPELINE_FILLED = {ExtractStage: ("data", "store"), TrainStage: ("activations", "store", "heldout"),
                   AnalyzeStage: ("sae", "store"), EvaluateStage: ("sae", "store", "heldout")}
"""The fields of each stage that the pipeline sets itself (hidden from its command line)."""


@dataclass
class PipelineConfig:
    """Run extract -> train -> analyze -> evaluate under one Prefect flow.

    With no --data, a small image set with a planted concept (red squares on real photos, from
    scikit-image) is generated and the demo settings apply (see `PipelineConfig.demo`), so the
    pipeline runs offline on any machine; every option still overrides them."""

    data: str | None = None
    """Images (anything `vitscope extract --data` takes). Default: generate the demo set under <workdir>/demo-images."""
    store: str = ".vitscope/store"
    """Where every stage publishes: a folder, file:///path or s3://bucket/prefix."""
    workdir: str = ".vitscope"
    """Scratch space for generated demo data."""
    demo_images: int = 256
    """Size of the generated demo set (when --data is not given)."""
    heldout_data: str | None = None
    """Images the SAE does not train on, extracted with the same settings: training's final metrics
    and the evaluation are measured on them. Default:
    with the demo set, a generated held-out demo set of --demo-heldout-images; with --data, none (the
    evaluation then runs on the training images, and its report says so)."""
    demo_heldout_images: int = 64
    """Size of the generated held-out demo set."""
    evaluation: bool = True
    """Evaluate the SAE after training (`vitscope evaluate`); --no-evaluation skips it."""
    parts: int = 1
    """Extract and analyse in this many parallel parts (Prefect tasks over blocks of shards); the set
    and the analysis are identical whatever the number."""
    dask_address: str | None = None
    """Run the parts on an existing Dask scheduler (tcp://host:8786) instead of local threads."""
    dask_cluster_class: str | None = None
    """Start a Dask cluster for the parts, e.g. dask_jobqueue.SLURMCluster or distributed.LocalCluster."""
    dask_cluster_kwargs: str | None = None
    """JSON keyword arguments for --dask-cluster-class, e.g. '{"cores": 8, "memory": "32GB", "processes": 1}'."""
    extract: ExtractStage = field(default_factory=ExtractStage)
    """Extraction settings, as `vitscope extract` has them."""
    train: TrainStage = field(default_factory=TrainStage)
    """Training settings, as `vitscope train` has them."""
    analyze: AnalyzeStage = field(default_factory=AnalyzeStage)
    """Analysis settings, as `vitscope analyze` has them."""
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    """Evaluation settings, as `vitscope evaluate` has them."""

    @classmethod
    def demo(cls) -> PipelineConfig:
        """The settings `vitscope pipeline` starts from when no --data is given: a ViT-B-32 (49
        patches an image, the cheapest CLIP on a CPU) with random weights when the pretrained
        ones cannot be fetched, an 8x TopK SAE (k=32) trained for 200k tokens (many epochs of the
        ~12k patch tokens of 256 images) in batches of 1024, 16 top images per latent.

        TopK because it is the fastest family on a CPU for its quality: it trains through the
        sparse paths, and on the demo it trained 4x as fast as ReLU (5.4k against 1.3k tokens/s)
        to half the held-out NMSE (0.16 against 0.30) at a lower L0 (32 against 46), with the
        same alignment of its best latent to the planted squares (AP 0.67 against 0.68)."""
        return cls(extract=ExtractStage(model="ViT-B-32", allow_random_weights=True, batch_size=32),
                   train=TrainStage(sae=TopKHyper(k=32), expansion=8, batch_size=1024, n_tokens=200_000),
                   analyze=AnalyzeStage(top_images=16))


@dataclass
class SweepCommand(SweepConfig):
    __doc__ = SweepConfig.__doc__ + """

    With --groups N the SAEs are split into N groups (ordered by layer, of about equal total
    width), each one pass over the data, run in parallel as Prefect tasks: on threads here, or on
    a Dask cluster (--dask-address, --dask-cluster-class). Each SAE is the one a single pass
    trains (the same id and weights)."""

    groups: int = 1
    """Split the SAEs into this many groups, each reading the data once (1: one pass in this process)."""
    dask_address: str | None = None
    """Run the groups on an existing Dask scheduler (tcp://host:8786) instead of local threads."""
    dask_cluster_class: str | None = None
    """Start a Dask cluster for the groups, e.g. dask_jobqueue.SLURMCluster (pip install "vitscope[slurm]")."""
    dask_cluster_kwargs: str | None = None
    """JSON keyword arguments for --dask-cluster-class, e.g. '{"n_workers": 4, "cores": 1, "job_extra_directives": ["--gres=gpu:1"]}'."""

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"--groups must be at least 1, not {self.groups}")
        if self.groups == 1 and (self.dask_address or self.dask_cluster_class):
            raise ValueError("--dask-address and --dask-cluster-class run a sweep's groups: give --groups 2 or more")

    def sweep(self) -> SweepConfig:
        """The sweep itself, without how its groups run."""
        return SweepConfig(**{f.name: getattr(self, f.name) for f in fields(SweepConfig)})

