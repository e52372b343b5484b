"""Prefect flows: each stage as a task, and the whole pipeline as one flow.

This is the one place that composes the stages, through their public entry points
(``extract``, ``train``, ``analyze`` and their configs). Content ids make reruns cheap: a
stage whose output is already published is skipped, and the run says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from vitscope.analyzer import AnalyzeConfig, AnalyzeResult, analyze
from vitscope.evaluator import EvaluateConfig, EvaluateResult, evaluate
from vitscope.extractor import ExtractConfig, ExtractResult, extract
from vitscope.metrics import METRICS
from vitscope.reports import headline
from vitscope.store import is_transient
from vitscope.trainer import SweepConfig, TrainConfig, TrainResult, sweep_configs, train, train_sweep

from .pipeline import PipelineConfig


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


@flow(name="vitscope-extract")
def extract_flow(cfg: ExtractConfig, parts: int = 1) -> ExtractResult:
    """Extraction as ``parts`` tasks mapped over contiguous blocks of shards, then a publish step.

    Run it with a Dask task runner (:func:`task_runner`) to spread the parts over a cluster."""
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


@task(name="train", **_RETRY)
def train_task(cfg: TrainConfig) -> TrainResult:
    """Train an SAE (skipped when the same SAE is already published)."""
    result = train(cfg)
    _report("train", "SAE", result.sae_id, result.reused)
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in result.metrics.items())
    create_markdown_artifact(
        key=f"sae-{result.sae_id[:12]}",
        markdown=f"# SAE `{result.sae_id}`\n\n| metric | value |\n|---|---|\n{rows}\n",
        description="SAE training metrics",
    )
    return result


@task(name="train-sweep", **_RETRY)
def sweep_task(cfgs: list[TrainConfig]) -> list[TrainResult]:
    """Train many SAEs from one pass over the data (each skipped when already published)."""
    results = train_sweep(cfgs)
    for r in results:
        _report("train", "SAE", r.sae_id, r.reused)
    create_table_artifact(
        key="sweep",
        table=[{"sae_id": r.sae_id, "variant": c.variant, **asdict(c.sae), "layer": c.layer, "lr": c.lr,
                "expansion": c.expansion, "seed": c.seed, "reused": r.reused,
                **{m: r.metrics.get(m) for m in (*METRICS, "tokens_per_s")}}
               for c, r in zip(cfgs, results, strict=True)],
        description="SAE sweep: one row per SAE (NMSE against L0 is the trade-off to read)",
    )
    return results


@flow(name="vitscope-sweep", log_prints=True)
def sweep_flow(cfg: SweepConfig) -> list[TrainResult]:
    """Train the SAEs of a sweep (file and/or --grid) from one pass over their activation set."""
    return sweep_task(sweep_configs(cfg))


@task(name="analyze", **_RETRY)
def analyze_task(cfg: AnalyzeConfig) -> AnalyzeResult:
    """Per-latent statistics and top-k (skipped when already published)."""
    result = analyze(cfg)
    _report("analyze", "analysis", result.analysis_id, result.reused)
    return result


@task(name="analyze-part", **_RETRY)
def analyze_part_task(cfg: AnalyzeConfig, part: int, parts: int) -> str:
    """Analyse one contiguous block of shards and publish its partial state (a retry or a rerun
    finds a finished part and skips it)."""
    result = analyze(replace(cfg, part=part, parts=parts, finish=False))
    get_run_logger().info("part %d/%d of analysis %s done", part + 1, parts, result.analysis_id)
    return result.analysis_id


@flow(name="vitscope-analyze")
def analyze_flow(cfg: AnalyzeConfig, parts: int = 1) -> AnalyzeResult:
    """The analysis pass as ``parts`` tasks mapped over contiguous blocks of shards, then a task
    that merges their states and publishes (the same bytes as one pass). Run it with a Dask task
    runner (:func:`task_runner`) to spread the parts over a cluster."""
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


@flow(name="vitscope-pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> PipelineResult:
    """extract -> train -> analyze -> evaluate, each skipped when its output is already published."""
    log = get_run_logger()
    data = prepare_data(cfg)
    runner = task_runner(cfg.parts, cfg.dask_address, cfg.dask_cluster_class,
                         json.loads(cfg.dask_cluster_kwargs) if cfg.dask_cluster_kwargs else None)
    ex = extract_flow.with_options(task_runner=runner)(replace(cfg.extract, data=data, store=cfg.store),
                                                       parts=cfg.parts)
    tr = train_task(replace(cfg.train, activations=ex.set_id, store=cfg.store))
    an = analyze_flow.with_options(task_runner=runner)(replace(cfg.analyze, sae=tr.sae_id, store=cfg.store),
                                                       parts=cfg.parts)
    stages: list[tuple[str, Any]] = [("extract", ex), ("train", tr), ("analyze", an)]
    ev = None
    if cfg.evaluation:
        heldout = prepare_heldout(cfg)
        held = (extract_flow.with_options(task_runner=runner)(replace(cfg.extract, data=heldout, store=cfg.store),
                                                             parts=cfg.parts) if heldout else None)
        ev = evaluate_task(replace(cfg.evaluate, sae=tr.sae_id, store=cfg.store, heldout=held.set_id if held else None))
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
                  f"Explore: `vitscope explore --store {cfg.store}`\n"),
        description="What the pipeline published",
    )
    return result

