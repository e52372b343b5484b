"""The ``vitscope`` command: one subcommand per stage, plus the whole pipeline.

Each subcommand's options are the fields of that stage's config dataclass, so the CLI, the
Python API and the Prefect flows always agree.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import tyro

from vitscope.composition.flows import PipelineConfig

log = logging.getLogger("vitscope")


@dataclass
class VerifyConfig:
    """Check a published activation set end to end: every shard's size, checksum and counts."""

    set_id: tyro.conf.Positional[str]
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
    host: str | None = None
    """Interface the web page listens on, e.g. 127.0.0.1 for this machine only (default: all, as Streamlit does)."""
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
          f"analysis        {result.analysis_id}\nskipped         {', '.join(result.skipped) or 'nothing'}\n")
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


def run_explore(cfg: ExploreConfig) -> int:
    from vitscope.explorer import run_explorer

    server = None
    target = cfg.analyzer
    if target is None:
        from vitscope.analyzer import ServeConfig, serve

        server = serve(ServeConfig(store=cfg.store, port=0, token=cfg.token))
        target = f"127.0.0.1:{server.port}"
        print(f"analyzer serving {cfg.store} on {target}")
    try:
        return run_explorer(target, port=cfg.port, token=cfg.token or os.environ.get("VITSCOPE_TOKEN"),
                            address=cfg.host)
    finally:
        if server is not None:
            server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitscope`` command."""
    from vitscope.analyzer import AnalyzeConfig, ServeConfig
    from vitscope.extractor import ExtractConfig
    from vitscope.trainer import SweepConfig, TrainConfig

    logging.basicConfig(level=os.environ.get("VITSCOPE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = tyro.extras.subcommand_cli_from_dict(
        {
            "pipeline": PipelineConfig,
            "extract": ExtractConfig,
            "train": TrainConfig,
            "sweep": SweepConfig,
            "analyze": AnalyzeConfig,
            "serve": ServeConfig,
            "explore": ExploreConfig,
            "verify": VerifyConfig,
        },
        prog="vitscope",
        description="Look inside vision transformers with sparse autoencoders: extract activations, "
                    "train SAEs, analyse their latents and explore them.",
        args=argv,
    )
    if isinstance(cfg, PipelineConfig):
        run_pipeline(cfg)
    elif isinstance(cfg, ExtractConfig):
        from vitscope.extractor import extract

        res = extract(cfg)
        print(res.set_id)
    elif isinstance(cfg, TrainConfig):
        from vitscope.trainer import train

        print(train(cfg).sae_id)
    elif isinstance(cfg, SweepConfig):
        from vitscope.trainer import sweep_configs, train_sweep

        for r in train_sweep(sweep_configs(cfg)):
            print(r.sae_id)
    elif isinstance(cfg, AnalyzeConfig):
        from vitscope.analyzer import analyze

        print(analyze(cfg).analysis_id)
    elif isinstance(cfg, ServeConfig):
        from vitscope.analyzer import serve_forever

        serve_forever(cfg)
    elif isinstance(cfg, ExploreConfig):
        return run_explore(cfg)
    elif isinstance(cfg, VerifyConfig):
        return run_verify(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
