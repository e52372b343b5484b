"""Prefect flows: each stage as a task, each stage and the whole pipeline as a flow (a deployment of
deploy/prefect/prefect.yaml each).

This is the one place that composes the stages, through their public entry points
(``extract``, ``train``, ``analyze``, ``evaluate`` and their configs). Content ids make reruns
cheap: a stage whose output is already published is skipped, and the run says so.

A flow's parameter is its stage's config, read by :func:`parameter` so that a deployment's form in
the Prefect UI shows each setting with its type, default and the config's own docstring, and so
that JSON parameters say what the command line says (the flat form of `vitscope train`). Every
stage task is GPU work: its runs carry the tag :data:`GPU_TAG`, or the worker's own tag from
:data:`GPU_TAG_ENV`, for a tag concurrency limit to bound (but for the groups of a sweep sent
to a Dask cluster, which train on the cluster's GPUs: see :func:`sweep_flow`).
"""

from __future__ import annotations

import base64
import functools
import io
import itertools
import os
import typing
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, tags, task, unmapped
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field, TypeAdapter
from pydantic_core import core_schema

from vitscope.analyzer import AnalyzeConfig, AnalyzeResult, analyze
from vitscope.evaluator import EvaluateConfig, EvaluateResult, evaluate
from vitscope.extractor import ExtractConfig, ExtractResult, extract
from vitscope.metrics import METRICS
from vitscope.reports import headline
from vitscope.sae import Sae, load_record
from vitscope.shard_format import Manifest, load_manifest
from vitscope.store import is_transient, open_store
from vitscope.trainer import (
    SweepConfig,
    TrainConfig,
    TrainResult,
    family_settings,
    sweep_configs,
    train,
    train_config,
    train_sweep,
)

from .options import _shown, _summary, field_docs
from .pipeline import PIPELINE_FILLED, PipelineConfig, TrainStage, cluster_kwargs


def _retry_on_transient_errors(task_, task_run, state) -> bool:
    """Only transient store faults (throttling, 5xx, dropped connections, filesystem I/O errors) are
    retried, also when a stage wrapped one in its own error; extraction then resumes from its last
    shard. A missing id, a denied request, a full disk or bad input fails at once."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e)
    return False


_RETRY = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_on_transient_errors)

GPU_TAG = "gpu"
"""The tag of every stage's task runs, unless :data:`GPU_TAG_ENV` names another: with
``prefect concurrency-limit create gpu 1``, one stage runs at a time on the whole server."""
GPU_TAG_ENV = "VITSCOPE_GPU_TAG"
"""Environment variable: the tag this process's stage task runs carry instead of :data:`GPU_TAG`.
A process worker's flow runs inherit its environment, so a worker started with its own tag
(``VITSCOPE_GPU_TAG=gpu-host1 prefect worker start ...``) and a tag concurrency limit on it
(``prefect concurrency-limit create gpu-host1 1``) bounds the GPU work of that worker (of every
worker sharing the tag, e.g. those of one host). Prefect holds a task run in Pending until it gets
a slot, so waiting costs no GPU memory."""


def _gpu_work() -> AbstractContextManager:
    """Tags every task run started inside as GPU work of this process (see :data:`GPU_TAG_ENV`)."""
    return tags(os.environ.get(GPU_TAG_ENV) or GPU_TAG)


# --- flow parameters: the stages' configs as the Prefect UI's forms -------------------------------

# inspect.getsource parses a class's whole module each time: once per class is enough.
_field_docs = functools.cache(field_docs)


def parameter(cls: type, hidden: Mapping[type, Collection[str]] | None = None) -> Any:
    """``cls`` (a config dataclass) as the type of a flow parameter, read and described by
    :class:`_ConfigForm`; ``hidden`` names, per (nested) config class, the fields the flow sets
    itself, which the form leaves out."""
    return Annotated[cls, _ConfigForm(cls, hidden or {})]


class _ConfigForm:
    """Pydantic metadata of a config parameter (see :func:`parameter`):

    - its JSON schema, Prefect's parameter schema and so the deployment's form in the UI, describes
      each field by the attribute docstring under it in the config (the text of ``--help``), leaves
      the hidden fields out and admits no other keys, so that a misspelt setting fails at
      ``prefect deployment run`` rather than being ignored;
    - a TrainConfig (the config itself or one nested in it) takes the flat form of `vitscope train`:
      ``variant`` and that family's settings beside the others (``{"variant": "topk", "k": 32}``);
    - JSON (a mapping) with a setting the config lacks is an error naming it. An instance of the
      config passes untouched."""

    def __init__(self, cls: type, hidden: Mapping[type, Collection[str]]):
        self.cls = cls
        self.hidden = hidden

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(lambda value: _settings(self.cls, value), handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: Any) -> dict[str, Any]:
        json_schema = handler(schema)
        self._describe(self.cls, handler.resolve_ref_schema(json_schema), handler)
        return json_schema

    def _describe(self, cls: type, schema: dict[str, Any], handler: Any) -> None:
        docs, hints = _field_docs(cls), typing.get_type_hints(cls)
        props = schema.setdefault("properties", {})
        if _is_train(cls):
            _flatten_train_schema(cls, props)
        for f in fields(cls):
            if f.name in self.hidden.get(cls, ()):
                props.pop(f.name, None)
            if f.name not in props:
                continue
            if f.name in docs:
                props[f.name]["description"] = docs[f.name]
            if is_dataclass(hints[f.name]):
                self._describe(hints[f.name], handler.resolve_ref_schema(props[f.name]), handler)
        schema["additionalProperties"] = False


def _is_train(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, TrainConfig)


def _settings(cls: type, value: Any) -> Any:
    """JSON settings of the config class ``cls`` (a mapping) as its fields, those of nested configs
    likewise; anything else (an instance) as it is."""
    if not isinstance(value, Mapping):
        return value
    values = _train_fields(dict(value)) if _is_train(cls) else dict(value)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {', '.join(map(repr, unknown))}; its settings are "
                         f"{', '.join(names)}")
    return {k: _settings(hints[k], v) if is_dataclass(hints[k]) else v for k, v in values.items()}


def _train_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat form of a TrainConfig as its fields: ``sae`` is the chosen family's typed settings.
    The names are checked by :func:`vitscope.trainer.train_config` (a setting of no family, or of
    another family, raises its ConfigError); the other values are left to pydantic to convert."""
    family = {"variant", *family_settings()}
    # A form sends an unset family setting as null: that family's default, as on the command line.
    # TrainStage has a default for every field, so the names are checked whichever are given.
    hyper = train_config({k: v for k, v in flat.items() if not (k in family and v is None)}, TrainStage).sae
    return {**{k: v for k, v in flat.items() if k not in family},
            "sae": TypeAdapter(type(hyper)).validate_python(asdict(hyper))}


def _flatten_train_schema(cls: type[TrainConfig], props: dict[str, Any]) -> None:
    """A TrainConfig's schema with ``sae`` spelt as ``variant`` plus every family's settings (as the
    command line has them: a family setting left unset is that family's default)."""
    if "sae" not in props:  # already flattened: the same class met twice
        return
    families = Sae.registry
    spelt: dict[str, Any] = {"variant": {
        "title": "Variant", "type": "string", "enum": list(families),
        "default": cls.__dataclass_fields__["sae"].default_factory().variant,
        "description": "SAE family: " + "; ".join(f"{v} ({_summary(c)})" for v, c in families.items())}}
    for name, s in family_settings().items():
        doc = next((d for v in s.defaults if (d := _field_docs(families[v].Hyper).get(name))), "")
        shown = {v: _shown(d) for v, d in s.defaults.items()}
        default = (next(iter(shown.values())) if len(set(shown.values())) == 1
                   else ", ".join(f"{v} {d}" for v, d in shown.items()))
        spelt[name] = {**TypeAdapter(s.type | None).json_schema(), "title": name.replace("_", " ").title(),
                       "default": None,
                       "description": f"{', '.join(s.defaults)}: {doc} (unset: the family's default, {default})"}
    at = list(props).index("sae")
    items = list(props.items())
    props.clear()
    props.update(items[:at] + list(spelt.items()) + items[at + 1:])


def _report(stage: str, what: str, ident: str, reused: bool, detail: str = "") -> None:
    """One log line per stage: skipped because already published, or what it published."""
    if reused:
        get_run_logger().info("skipping %s: %s %s is already published", stage, what, ident)
    else:
        get_run_logger().info("%s: published %s %s%s", stage, what, ident, detail)


def _extract_detail(result: ExtractResult) -> str:
    m = result.manifest
    return f" ({m.n_images} images, {len(m.skipped)} skipped as unreadable)" if m else ""


@task(name="extract", **_RETRY)
def extract_task(cfg: ExtractConfig) -> ExtractResult:
    """Extract activations (skipped when the content-addressed set already exists)."""
    result = extract(cfg)
    _report("extract", "activation set", result.set_id, result.reused, _extract_detail(result))
    return result


@task(name="extract-part", **_RETRY)
def extract_part_task(cfg: ExtractConfig, part: int, parts: int) -> str:
    """Extract one contiguous block of shards (a part); resumes shards a failed try left."""
    result = extract(replace(cfg, part=part, parts=parts, finish=False))
    get_run_logger().info("part %d/%d of activation set %s done", part + 1, parts, result.set_id)
    return result.set_id


@task(name="extract-publish", **_RETRY)
def extract_publish_task(cfg: ExtractConfig, parts: int) -> ExtractResult:
    """Write the manifest once every part has finished."""
    return extract(replace(cfg, parts=parts, finish=True))


ExtractForm = parameter(ExtractConfig)


@flow(name="vitscope-extract")
def extract_flow(cfg: ExtractForm, parts: int = 1) -> ExtractResult:
    """Extract ViT activations from images into an activation set (skipped when it is already
    published), as ``parts`` tasks mapped over contiguous blocks of shards, then a publish step.

    Run it with a Dask task runner (:func:`task_runner`) to spread the parts over a cluster.

    Args:
        cfg: The settings of `vitscope extract`.
        parts: Extract in this many parallel tasks over blocks of shards (the set is the same whatever the number).
    """
    with _gpu_work():
        if parts <= 1:
            return extract_task(cfg)
        futures = extract_part_task.map(unmapped(cfg), range(parts), unmapped(parts))
        set_ids = {f.result() for f in futures}
        if len(set_ids) != 1:
            raise RuntimeError(f"parts disagree on the activation set id: {sorted(set_ids)}")
        result = extract_publish_task(cfg, parts)
    _report("extract", "activation set", result.set_id, result.reused, _extract_detail(result))
    return result


def task_runner(parts: int, dask_address: str | None = None, dask_cluster_class: str | None = None,
                dask_cluster_kwargs: dict[str, Any] | None = None) -> TaskRunner:
    """Threads on this machine by default; a Dask cluster (an existing scheduler, or one that
    ``dask_cluster_class`` starts, e.g. ``dask_jobqueue.SLURMCluster``) when one is given."""
    if dask_address or dask_cluster_class:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address, cluster_class=dask_cluster_class,
                              cluster_kwargs=dask_cluster_kwargs)
    return ThreadPoolTaskRunner(max_workers=max(1, parts))


def _sae_row(cfg: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """An SAE as a row of a table artifact: its id, the settings that tell SAEs apart, its metrics."""
    return {"sae_id": result.sae_id, "variant": cfg.variant, **asdict(cfg.sae), "layer": cfg.layer, "lr": cfg.lr,
            "expansion": cfg.expansion, "seed": cfg.seed, "reused": result.reused,
            **{m: result.metrics.get(m) for m in (*METRICS, "tokens_per_s")}}


def _frequency_artifact(store: str, sae_id: str) -> None:
    """The SAE's log10 firing-frequency histogram (its record's, over the evaluation tokens of
    training) as an image artifact. The PNG travels inside a data: URL, since objects of a store
    have no address that the browser showing the Prefect UI could open."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads

    hist = load_record(open_store(store), sae_id).histogram
    if not hist.get("counts"):  # a record from before histograms
        return
    fig = Figure(figsize=(6, 2.6))
    ax = fig.subplots()
    ax.stairs(hist["counts"], hist["log10_edges"], fill=True, color="#4c72b0")
    ax.set(xlabel="log10 firing frequency over the evaluation tokens", ylabel="latents",
           title=f"SAE {sae_id[:12]}: {hist['never']} latents never fired")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
                          key=f"sae-{sae_id[:12]}-frequency", description=f"Firing frequency of SAE {sae_id}")


@task(name="train", **_RETRY)
def train_task(cfg: TrainConfig) -> TrainResult:
    """Train an SAE (skipped when the same SAE is already published); its metrics become a table
    artifact and its firing-frequency histogram an image artifact."""
    result = train(cfg)
    _report("train", "SAE", result.sae_id, result.reused)
    create_table_artifact(key=f"sae-{result.sae_id[:12]}", table=[_sae_row(cfg, result)],
                          description="SAE training metrics")
    _frequency_artifact(cfg.store, result.sae_id)
    return result


def _train_group(cfgs: list[TrainConfig]) -> list[TrainResult]:
    """Train SAEs from one pass over the data (each skipped when already published); each one's
    firing-frequency histogram becomes an image artifact."""
    results = train_sweep(cfgs)
    for c, r in zip(cfgs, results, strict=True):
        _report("train", "SAE", r.sae_id, r.reused)
        _frequency_artifact(c.store, r.sae_id)
    return results


def _sweep_table(cfgs: list[TrainConfig], results: list[TrainResult]) -> None:
    """The sweep's SAEs as one table artifact, a row each."""
    create_table_artifact(
        key="sweep",
        table=[_sae_row(c, r) for c, r in zip(cfgs, results, strict=True)],
        description="SAE sweep: one row per SAE (NMSE against L0 is the trade-off to read)",
    )


@task(name="train-sweep", **_RETRY)
def sweep_task(cfgs: list[TrainConfig]) -> list[TrainResult]:
    """Train many SAEs from one pass over the data (each skipped when already published); a table
    artifact compares them, and each one's firing-frequency histogram is an image artifact."""
    results = _train_group(cfgs)
    _sweep_table(cfgs, results)
    return results


@task(name="train-sweep-group", **_RETRY)
def sweep_group_task(cfgs: list[TrainConfig]) -> list[TrainResult]:
    """One group of a split sweep: its SAEs from one pass over the data (each skipped when already
    published), each one's firing-frequency histogram an image artifact."""
    return _train_group(cfgs)


def sweep_groups(cfgs: Sequence[TrainConfig], groups: int, manifest: Manifest) -> list[list[int]]:
    """Split a sweep's SAEs into at most ``groups`` groups, as indices into ``cfgs`` (each once,
    ascending), for one data pass per group.

    A group's pass costs its SAEs' training steps, which parallel groups share out, plus a read
    of every layer its SAEs train on, which each group pays in full. So the SAEs, ordered by
    layer (the sweep's order within a layer), are cut into contiguous groups of about equal
    total width (d_sae: a step's cost grows with it): the groups are balanced to within one SAE,
    and a layer is cut between two groups only where the balance needs it (each of the
    ``groups - 1`` cuts splits at most one layer, whose data two groups then read; a tie goes
    to the cut between layers). Configs that spell one SAE differently (its layer unset, as
    requested at extraction or absolute; its width as ``expansion`` or ``d_sae``) stay in one
    group, which trains it once: two groups would publish it at the same time."""
    def layer(c: TrainConfig) -> int:
        return manifest.layers[-1] if c.layer is None else manifest.layer_position(c.layer)

    units: list[list[int]] = []  # the indices of the configs of one SAE
    keys: list[TrainConfig] = []
    for i, c in enumerate(cfgs):
        key = replace(c, layer=layer(c), d_sae=c.d_sae or c.expansion * manifest.d_model, expansion=0)
        if key in keys:
            units[keys.index(key)].append(i)
        else:
            keys.append(key)
            units.append([i])
    order = sorted(range(len(units)), key=lambda u: keys[u].layer)
    prefix = list(itertools.accumulate((keys[u].d_sae for u in order), initial=0))
    n = max(1, min(groups, len(order)))

    def cost(cut: int, target: float) -> tuple[float, bool]:
        return abs(prefix[cut] - target), keys[order[cut - 1]].layer == keys[order[cut]].layer

    cuts = [0]
    for g in range(1, n):
        cuts.append(min(range(cuts[-1] + 1, len(order) - (n - g) + 1), key=lambda c: cost(c, prefix[-1] * g / n)))
    cuts.append(len(order))
    return [sorted(i for u in order[a:b] for i in units[u]) for a, b in itertools.pairwise(cuts)]


@flow(name="vitscope-sweep-groups", validate_parameters=False)
def sweep_groups_flow(cfgs: list[TrainConfig], groups: list[list[int]]) -> list[TrainResult]:
    """The groups of a sweep (:func:`sweep_groups`) as tasks mapped over this flow's task runner;
    the results in the order of ``cfgs``."""
    futures = sweep_group_task.map([[cfgs[i] for i in group] for group in groups])
    results: dict[int, TrainResult] = {}
    for group, future in zip(groups, futures, strict=True):
        results.update(zip(group, future.result(), strict=True))
    return [results[i] for i in range(len(cfgs))]


TrainForm = parameter(TrainConfig)


@flow(name="vitscope-train")
def train_flow(cfg: TrainForm) -> TrainResult:
    """Train one SAE on an activation set (skipped when the same SAE is already published).

    Args:
        cfg: The settings of `vitscope train`, in its flat form: `variant` (the SAE family) and that
            family's settings beside the others, e.g. {"activations": "<set id>", "variant": "topk", "k": 32}.
    """
    with _gpu_work():
        return train_task(cfg)


SweepForm = parameter(SweepConfig)


@flow(name="vitscope-sweep", log_prints=True)
def sweep_flow(cfg: SweepForm, groups: Annotated[int, Field(ge=1)] = 1, dask_address: str | None = None,
               dask_cluster_class: str | None = None,
               dask_cluster_kwargs: dict[str, Any] | None = None) -> list[TrainResult]:
    """Train the SAEs of a sweep from one pass over their activation set, or from one pass per
    group of them, the groups run in parallel as Prefect tasks: on threads of this process, or
    on a Dask cluster (an existing scheduler, or one that ``dask_cluster_class`` starts, e.g.
    dask-jobqueue's SLURMCluster). Each SAE is trained as in one pass (the same id and weights),
    and skipped when already published; the results come back in the sweep's order.

    On a Dask cluster the groups train on the cluster's GPUs, so their task runs do not carry
    this process's GPU tag (a tag limit of 1 would run them one at a time, each waiting group
    holding a worker of the cluster).

    Args:
        cfg: The settings of `vitscope sweep`: a sweep file and/or grid axes, and settings for
            every SAE in the flat form of `vitscope train` (set: ["variant=topk", "k=32"]).
        groups: Split the SAEs into this many groups, each one task reading the data once: SAEs ordered by layer, cut into groups of about equal total width (1: one pass in this process).
        dask_address: Run the groups on an existing Dask scheduler (tcp://host:8786) instead of threads of this process.
        dask_cluster_class: Start a Dask cluster for the groups, e.g. dask_jobqueue.SLURMCluster (pip install "vitscope[slurm]") or distributed.LocalCluster.
        dask_cluster_kwargs: Keyword arguments for dask_cluster_class, e.g. {"n_workers": 2, "cores": 1, "job_cpu": 8, "memory": "64GB", "job_extra_directives": ["--gres=gpu:1"]} (a job per worker with a GPU, one group at a time in each: one thread, 8 CPUs booked).
    """
    cfgs = sweep_configs(cfg)
    if groups == 1:
        with _gpu_work():
            return sweep_task(cfgs)
    split = sweep_groups(cfgs, groups, load_manifest(open_store(cfgs[0].store), cfgs[0].activations))
    get_run_logger().info("sweep of %d SAEs in %d groups of %s SAEs", len(cfgs), len(split),
                          ", ".join(str(len(g)) for g in split))
    on_cluster = bool(dask_address or dask_cluster_class)
    runner = task_runner(len(split), dask_address, dask_cluster_class, dask_cluster_kwargs)
    with nullcontext() if on_cluster else _gpu_work():
        results = sweep_groups_flow.with_options(task_runner=runner)(cfgs, split)
    _sweep_table(cfgs, results)
    return results


def _explore(store: str, sae_id: str) -> str:
    """Markdown: the command that opens the explorer on a store, and the SAE's page in it."""
    return (f"Explore it: `vitscope explore --store {store}`, then open "
            f"[SAE {sae_id[:12]}](http://127.0.0.1:8501/?sae={sae_id}) (the explorer's default address)\n")


@task(name="analyze", **_RETRY)
def analyze_task(cfg: AnalyzeConfig) -> AnalyzeResult:
    """Per-latent statistics and top-k (skipped when already published); the way to explore them
    becomes a markdown artifact."""
    result = analyze(cfg)
    _report("analyze", "analysis", result.analysis_id, result.reused)
    create_markdown_artifact(key=f"explore-{cfg.sae[:12]}", markdown=f"# SAE `{cfg.sae}`\n\n{_explore(cfg.store, cfg.sae)}",
                             description="How to open the explorer on the analysed SAE")
    return result


@task(name="analyze-part", **_RETRY)
def analyze_part_task(cfg: AnalyzeConfig, part: int, parts: int) -> str:
    """Analyse one contiguous block of shards and publish its partial state (a retry or a rerun
    finds a finished part and skips it)."""
    result = analyze(replace(cfg, part=part, parts=parts, finish=False))
    get_run_logger().info("part %d/%d of analysis %s done", part + 1, parts, result.analysis_id)
    return result.analysis_id


AnalyzeForm = parameter(AnalyzeConfig)


@flow(name="vitscope-analyze")
def analyze_flow(cfg: AnalyzeForm, parts: int = 1) -> AnalyzeResult:
    """Per-latent statistics and top images of an SAE (skipped when already published), as
    ``parts`` tasks mapped over contiguous blocks of shards, then a task that merges their states
    and publishes (the same bytes as one pass). Run it with a Dask task runner
    (:func:`task_runner`) to spread the parts over a cluster.

    Args:
        cfg: The settings of `vitscope analyze`.
        parts: Analyse in this many parallel tasks over blocks of shards (the analysis is the same whatever the number).
    """
    with _gpu_work():
        if parts <= 1:
            return analyze_task(cfg)
        ids = {f.result() for f in analyze_part_task.map(unmapped(cfg), range(parts), unmapped(parts))}
        if len(ids) != 1:
            raise RuntimeError(f"parts disagree on the analysis id: {sorted(ids)}")
        return analyze_task(replace(cfg, parts=parts, finish=True))


def evaluation_summary(report: dict[str, Any]) -> str:
    """The report's headline figures as a markdown table."""
    body = "\n".join(f"| {k} | {v} |" for k, v in headline(report))
    return f"| measure | value |\n|---|---|\n{body}\n"


@task(name="evaluate", **_RETRY)
def evaluate_task(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate an SAE (skipped when the same report is already published); its headline figures
    become a Prefect artifact."""
    result = evaluate(cfg)
    _report("evaluate", "report", result.report_id, result.reused)
    create_markdown_artifact(
        key=f"evaluation-{result.report_id[:12]}",
        markdown=(f"# Evaluation of SAE `{result.report['sae_id']}`\n\n{evaluation_summary(result.report)}\n"
                  f"Report: `evaluations/{result.report_id}/report.json` in `{cfg.store}`, with plots "
                  f"{', '.join(result.report['plots']) or 'none'}\n"),
        description="SAE evaluation: reconstruction, substitution, probing, label alignment",
    )
    return result


EvaluateForm = parameter(EvaluateConfig)


@flow(name="vitscope-evaluate")
def evaluate_flow(cfg: EvaluateForm) -> EvaluateResult:
    """Evaluate an SAE (skipped when the same report is already published): reconstruction, the
    SAE spliced into its ViT, probing, label alignment, stability.

    Args:
        cfg: The settings of `vitscope evaluate`.
    """
    with _gpu_work():
        return evaluate_task(cfg)


@dataclass
class PipelineResult:
    """What a pipeline run published (or found published), by id."""

    set_id: str
    sae_id: str
    analysis_id: str
    store: str
    skipped: list[str]
    report_id: str | None = None
    """The evaluation report (None with --no-evaluation)."""


def _demo_images(cfg: PipelineConfig, folder: str, n_images: int, seed: int) -> str:
    """A generated planted-square image folder under the workdir (made once)."""
    from vitscope.synthetic import make_planted_dataset

    root = Path(cfg.workdir) / folder
    if not root.exists() or not any(root.rglob("*.jpg")):
        make_planted_dataset(root, n_images=n_images, size=224, square=64, seed=seed)
    return str(root)


def prepare_data(cfg: PipelineConfig) -> str:
    """The image folder to use: the user's, or the generated demo set."""
    return cfg.data or _demo_images(cfg, "demo-images", cfg.demo_images, seed=0)


def prepare_heldout(cfg: PipelineConfig) -> str | None:
    """The held-out images to evaluate on: the user's, a generated held-out demo set (other photos'
    crops and squares: another seed) with the demo, or none."""
    if cfg.heldout_data or cfg.data:
        return cfg.heldout_data
    return _demo_images(cfg, "demo-heldout", cfg.demo_heldout_images, seed=1)


PipelineForm = parameter(PipelineConfig, hidden=PIPELINE_FILLED)


@flow(name="vitscope-pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineForm) -> PipelineResult:
    """extract -> train -> analyze -> evaluate, each skipped when its output is already published.

    Args:
        cfg: The settings of `vitscope pipeline`: the data, the store, and each stage's settings
            under extract, train (the flat form of `vitscope train`), analyze and evaluate.
    """
    with _gpu_work():
        log = get_run_logger()
        data = prepare_data(cfg)
        runner = task_runner(cfg.parts, cfg.dask_address, cfg.dask_cluster_class,
                             cluster_kwargs(cfg.dask_cluster_kwargs))
        ex = extract_flow.with_options(task_runner=runner)(replace(cfg.extract, data=data, store=cfg.store),
                                                           parts=cfg.parts)
        # The held-out images are extracted before training, whose final metrics are then
        # measured on them too, as the evaluation's are.
        heldout = prepare_heldout(cfg) if cfg.evaluation or cfg.heldout_data else None
        held = (extract_flow.with_options(task_runner=runner)(replace(cfg.extract, data=heldout, store=cfg.store),
                                                             parts=cfg.parts) if heldout else None)
        held_id = held.set_id if held else None
        tr = train_task(replace(cfg.train, activations=ex.set_id, store=cfg.store, heldout=held_id))
        an = analyze_flow.with_options(task_runner=runner)(replace(cfg.analyze, sae=tr.sae_id, store=cfg.store),
                                                           parts=cfg.parts)
        stages: list[tuple[str, Any]] = [("extract", ex), ("train", tr), ("analyze", an)]
        ev = None
        if cfg.evaluation:
            ev = evaluate_task(replace(cfg.evaluate, sae=tr.sae_id, store=cfg.store, heldout=held_id))
            stages.append(("evaluate", ev))
        skipped = [name for name, r in stages if r.reused]
        if len(skipped) == len(stages):
            log.info("nothing to do: every stage's output is already published")
        result = PipelineResult(ex.set_id, tr.sae_id, an.analysis_id, cfg.store, skipped, ev.report_id if ev else None)
        create_markdown_artifact(
            key="pipeline-result",
            markdown=(f"# vitscope pipeline\n\n- activation set: `{ex.set_id}`\n- SAE: `{tr.sae_id}`\n"
                      f"- analysis: `{an.analysis_id}`\n- evaluation report: `{result.report_id}`\n"
                      f"- store: `{cfg.store}`\n- skipped: {', '.join(skipped) or 'none'}\n\n"
                      f"{_explore(cfg.store, tr.sae_id)}"),
            description="What the pipeline published",
        )
        return result

