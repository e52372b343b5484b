"""The ``vitscope`` command: one subcommand per stage, plus the whole pipeline.

Each subcommand's options are the fields of that stage's config dataclass, so the CLI, the
Python API and the Prefect flows always agree. Dispatch is lazy: a subcommand imports its own
config and, once parsed, its own stage; nothing else (`vitscope verify --help` imports no
Prefect, Streamlit or model code).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tyro

if TYPE_CHECKING:
    from vitscope.composition.pipeline import PipelineConfig, SweepCommand

log = logging.getLogger("vitscope")

DESCRIPTION = ("Look inside vision transformers with sparse autoencoders: extract activations, train SAEs, "
               "analyse their latents and explore them.")

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("vitscope.composition.pipeline", "PipelineConfig"),
    "extract": ("vitscope.extractor", "ExtractConfig"),
    "train": ("vitscope.trainer", "TrainConfig"),
    "sweep": ("vitscope.composition.pipeline", "SweepCommand"),
    "analyze": ("vitscope.analyzer", "AnalyzeConfig"),
    "evaluate": ("vitscope.evaluator", "EvaluateConfig"),
    "serve": ("vitscope.analyzer", "ServeConfig"),
    "explore": ("vitscope.composition.cli", "ExploreConfig"),
    "verify": ("vitscope.composition.cli", "VerifyConfig"),
    "ls": ("vitscope.composition.cli", "LsConfig"),
    "health": ("vitscope.composition.health", "HealthConfig"),
}
"""Subcommand -> (module, config class): importing the module must stay cheap."""

SUMMARIES = {
    "pipeline": "Run extract -> train -> analyze -> evaluate under one Prefect flow.",
    "extract": "Extract ViT activations from an image folder into an activation set.",
    "train": "Train a sparse autoencoder on activations from `vitscope extract`.",
    "sweep": "Train many SAEs from one pass over an activation set: each batch is read once and given to every SAE.",
    "analyze": "Compute per-latent statistics and top-k images of a trained SAE.",
    "evaluate": ("Evaluate a trained SAE: reconstruction, the SAE spliced into its ViT, probing, label alignment, "
                 "stability."),
    "serve": "Serve a store's SAEs, analyses and images over gRPC (the explorer's back end).",
    "explore": "Open the explorer (a Streamlit app) on a store's SAEs.",
    "verify": "Check a published activation set end to end: every shard's size, checksum and counts.",
    "ls": "List a store's activation sets, SAEs, analyses and evaluation reports with their key facts.",
    "health": "Check that the server this container runs is answering: an analyzer, an explorer, a Prefect server or worker.",
}
"""What `vitscope --help` lists, without importing every config: the first sentence of each
config's docstring (a test keeps them equal)."""


@dataclass
class VerifyConfig:
    """Check a published activation set end to end: every shard's size, checksum and counts."""

    set_id: tyro.conf.Positional[str]
    store: str = ".vitscope/store"


@dataclass
class LsConfig:
    """List a store's activation sets, SAEs, analyses and evaluation reports with their key facts.

    The ids are what the other subcommands take (--activations, --sae, --heldout)."""

    store: str = ".vitscope/store"


@dataclass
class ExploreConfig:
    """Open the explorer (a Streamlit app) on a store's SAEs.

    Starts an analyzer gRPC server on the store unless --analyzer points at a running one."""

    store: str = ".vitscope/store"
    analyzer: str | None = None
    """host:port of a running analyzer (`vitscope serve`); default: start one for this session."""
    port: int = 8501
    """Port of the explorer web page."""
    host: str = "127.0.0.1"
    """Interface the web page listens on: this machine only by default; 0.0.0.0 for every interface
    (anyone who reaches the port then sees the store's SAEs and images, and can write labels)."""
    token: str | None = None
    """Bearer token for the analyzer, if it requires one (also read from VITSCOPE_TOKEN)."""


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def run_pipeline(cfg: PipelineConfig) -> None:
    if cfg.data is None and "HF_HUB_OFFLINE" not in os.environ and not _hub_reachable():
        # Without this, each weight lookup waits ~45 s on an unreachable hub before failing.
        os.environ["HF_HUB_OFFLINE"] = "1"
        log.warning("no network: pretrained weights can only come from the local cache")
    from vitscope.composition.flows import pipeline_flow

    result = pipeline_flow(cfg)
    print(f"\nactivation set  {result.set_id}\nSAE             {result.sae_id}\n"
          f"analysis        {result.analysis_id}\nevaluation      {result.report_id or 'not run'}\n"
          f"skipped         {', '.join(result.skipped) or 'nothing'}\n")
    print(f"Explore it:  vitscope explore --store {result.store}")


def run_verify(cfg: VerifyConfig) -> int:
    from vitscope.shards import ActivationSet
    from vitscope.store import open_store

    aset = ActivationSet.open(open_store(cfg.store), cfg.set_id)
    problems = aset.verify(progress=True)
    for p in problems:
        print(f"PROBLEM {p}")
    m = aset.manifest
    print(f"{cfg.set_id}: {m.n_images} images, {len(m.shards)} shards, layers {m.layers}, {m.dtype}, "
          f"{len(m.skipped)} skipped images: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"{title} ({len(rows)})")
    if not rows:
        print("  none")
        return
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def run_ls(cfg: LsConfig) -> None:
    from vitscope.analyzer import list_analyses
    from vitscope.reports import list_reports
    from vitscope.sae import list_saes, load_record
    from vitscope.shards import list_sets
    from vitscope.store import open_store

    store = open_store(cfg.store)
    print(f"store {store.uri}\n")
    _table("activation sets", ("id", "model", "layers", "images", "tokens/image", "dtype"),
           [(m.set_id, str(m.model.get("spec", "")), ",".join(map(str, m.layers)), str(m.n_images),
             str(m.layout.tokens_per_image), m.dtype) for m in sorted(list_sets(store), key=lambda m: m.set_id)])
    records = [load_record(store, i) for i in sorted(list_saes(store))]

    def fmt(value: object, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    print()
    _table("SAEs", ("id", "family", "d_in -> d_sae", "layer", "tokens", "activation set", "NMSE", "L0"),
           [(r.sae_id, r.config.variant, f"{r.config.d_in} -> {r.config.d_sae}", str(r.layer), ",".join(r.tokens),
             r.activation_set_id, fmt(r.metrics.get("nmse"), ".4f"), fmt(r.metrics.get("l0"), ".1f"))
            for r in records])
    print()
    _table("analyses", ("id", "SAE", "images", "top images"),
           [(a.analysis_id, a.sae_id, str(a.n_images), str(a.top_images))
            for a in sorted(list_analyses(store), key=lambda a: a.analysis_id)])
    print()
    _table("evaluation reports", ("id", "SAE", "evaluated on", "split", "images", "created"),
           [(r["report_id"], r["sae_id"], r["activation_set_id"], r["split"], str(r["images"]), r["created_at"])
            for r in list_reports(store)])


def run_explore(cfg: ExploreConfig) -> int:
    from vitscope.explorer import run_explorer, start_explorer

    token = cfg.token or os.environ.get("VITSCOPE_TOKEN")
    if cfg.analyzer is not None:
        return run_explorer(cfg.analyzer, port=cfg.port, token=token, address=cfg.host)
    # Streamlit first, then the analyzer while it boots: each takes seconds to start (the
    # analyzer imports torch), and the app needs the analyzer only once a page is opened.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        analyzer_port = s.getsockname()[1]
    target = f"127.0.0.1:{analyzer_port}"
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) stops Streamlit too: Python's default ends this process at once, with
        # no `finally`, and left Streamlit serving, orphaned.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    proc = start_explorer(target, port=cfg.port, token=token, address=cfg.host)
    server = None
    try:
        from vitscope.analyzer import ServeConfig, serve

        server = serve(ServeConfig(store=cfg.store, port=analyzer_port, token=cfg.token))
        print(f"analyzer serving {cfg.store} on {target}; explorer on http://{cfg.host}:{cfg.port}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches streamlit too, which shuts down on its own
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a Streamlit stuck in its shutdown
                proc.kill()
                proc.wait()
        if server is not None:
            server.stop(grace=1)


def config_class(sub: str) -> type:
    """The config dataclass of subcommand ``sub`` (importing only its module)."""
    module, name = SUBCOMMANDS[sub]
    return getattr(importlib.import_module(module), name)


def _hidden(cls: type) -> tuple[str, ...]:
    """Fields the command line does not show: those the pipeline fills in for its stages."""
    pipeline = sys.modules.get("vitscope.composition.pipeline")  # only loaded for `vitscope pipeline`
    return pipeline.PIPELINE_FILLED.get(cls, ()) if pipeline else ()


def parse(sub: str, args: list[str]):
    """Parse ``vitscope <sub> <args>`` into that subcommand's config."""
    from vitscope.composition.options import view

    cls = config_class(sub)
    v = view(cls, _hidden)
    default = None
    if sub == "pipeline" and not any(a == "--data" or a.startswith("--data=") for a in args):
        default = v.to_view(cls.demo())
    description = inspect.cleandoc(cls.__doc__ or "")
    parsed = tyro.cli(v.cls, args=args, prog=f"vitscope {sub}", description=description,
                      **({"default": default} if default is not None else {}))
    return v.to_real(parsed)


_STAGE_ERRORS = {
    "vitscope.models": ("ModelLoadError",),
    "vitscope.extractor.extraction": ("ExtractError",),
    "vitscope.trainer.stream": ("StreamError",),
    "vitscope.trainer.training": ("TrainingError",),
}
"""Errors (besides ValueError and store errors) that describe the user's request, not a bug:
looked up only in modules already imported, so reading them imports nothing."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as one line rather than a traceback: bad values and names (every
    ValueError: configs, ids, layouts), a store that says no (a missing id is a NotFound), a
    model or dataset that cannot be read."""
    from vitscope.store import StoreError

    found: list[type[BaseException]] = [ValueError, StoreError, FileNotFoundError, PermissionError]
    for module, names in _STAGE_ERRORS.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, n) for n in names if loaded is not None and hasattr(loaded, n)]
    return tuple(found)


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: vitscope [-h] {{{','.join(SUBCOMMANDS)}}} ...", "", DESCRIPTION, "", "subcommands:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in SUBCOMMANDS]
    lines += ["", "Run `vitscope <subcommand> --help` for its options; add --debug to any of them to see a "
              "failure's full traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitscope`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    sub, args = argv[0], argv[1:]
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if sub not in SUBCOMMANDS:
        print(f"{_usage()}\n\nvitscope: error: unknown subcommand {sub!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("VITSCOPE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Prefect's client logs every HTTP request at INFO through httpx: a flow's log drowned in them.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # open_clip reports each step of building a model at INFO on the root logger itself (six
    # lines a model, three models in the demo); vitscope and the libraries worth hearing log
    # through named loggers. VITSCOPE_LOG=DEBUG shows them again.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    # Prefect starts a temporary API server for a flow run without a server of its own; its 20 s
    # default for that start is too short on a busy 2-core machine (the pipeline failed so).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        return RUNNERS[sub](parse(sub, args)) or 0
    except KeyboardInterrupt:
        print(f"vitscope {sub}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not isinstance(e, _user_errors()):
            raise
        # One line the user can act on; `--debug` shows where it came from.
        print(f"vitscope {sub}: error: {e}", file=sys.stderr)
        return 2


def run_extract(cfg) -> None:
    from vitscope.extractor import extract

    print(extract(cfg).set_id)


def _first_rank() -> bool:
    """Whether this process prints the result: always, but under torchrun only rank 0, whose
    id is every rank's (the ranks' lines would interleave on the job's shared stdout)."""
    return os.environ.get("RANK", "0") == "0"


def run_train(cfg) -> None:
    from vitscope.trainer import train

    sae_id = train(cfg).sae_id
    if _first_rank():
        print(sae_id)


def run_sweep(cfg: SweepCommand) -> None:
    if cfg.groups > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--groups runs the groups as Prefect tasks, not under torchrun: use one or the other")
        from vitscope.composition.flows import sweep_flow
        from vitscope.composition.pipeline import cluster_kwargs

        results = sweep_flow(cfg.sweep(), groups=cfg.groups, dask_address=cfg.dask_address,
                             dask_cluster_class=cfg.dask_cluster_class,
                             dask_cluster_kwargs=cluster_kwargs(cfg.dask_cluster_kwargs))
    else:
        from vitscope.trainer import sweep_configs, train_sweep

        results = train_sweep(sweep_configs(cfg.sweep()))
    if _first_rank():
        for r in results:
            print(r.sae_id)


def run_analyze(cfg) -> None:
    from vitscope.analyzer import analyze

    print(analyze(cfg).analysis_id)


def run_evaluate(cfg) -> None:
    from vitscope.evaluator import evaluate

    result = evaluate(cfg)
    print(result.report_id)


def run_serve(cfg) -> int | None:
    from vitscope.analyzer import InsecureBindError, serve_forever

    try:
        serve_forever(cfg)
    except InsecureBindError as e:
        print(f"vitscope serve: error: {e}", file=sys.stderr)
        return 2
    return None


def run_health(cfg) -> int:
    from vitscope.composition.health import Unhealthy, check, probe_for

    probe = probe_for(cfg)
    if probe is None:
        print("healthy: PID 1 runs no server (a batch job, or not a vitscope container), so there is nothing to check")
        return 0
    try:
        said = check(probe, cfg.timeout)
    except Unhealthy as e:
        # Exit 1, not the CLI's 2 for a user mistake: Docker reserves 2 in health checks.
        print(f"vitscope health: unhealthy: {probe.server} at {probe.url}: {e}", file=sys.stderr)
        return 1
    print(f"healthy: {probe.server} at {probe.url}: {said}")
    return 0


RUNNERS = {"pipeline": run_pipeline, "extract": run_extract, "train": run_train, "sweep": run_sweep,
           "analyze": run_analyze, "evaluate": run_evaluate, "serve": run_serve, "explore": run_explore,
           "verify": run_verify, "ls": run_ls, "health": run_health}


if __name__ == "__main__":
    sys.exit(main())
