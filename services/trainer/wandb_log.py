"""Weights & Biases logging (optional: ``pip install wandb``): one W&B run per SAE, named by
its id, so a sweep's SAEs can be compared side by side. ``WANDB_MODE=offline`` works."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .training import SaeTrainer, TrainResult


class WandbLogger:
    def __init__(self, project: str, members: list[SaeTrainer]):
        try:
            import wandb
        except ImportError:
            raise ImportError("--wandb-project needs Weights & Biases: pip install wandb") from None
        self.runs = {
            mb.plan.sae_id: wandb.init(project=project, name=mb.plan.sae_id, id=mb.plan.sae_id, resume="allow",
                                       config={**mb.plan.hyper, "sae_id": mb.plan.sae_id}, reinit="create_new")
            for mb in members
        }

    def log(self, members: list[SaeTrainer], step: int, tokens: int) -> None:
        """The live figures of the latest step."""
        for mb in members:
            live = {f"train/{k}": v.item() for k, v in mb.live.items()}
            self.runs[mb.plan.sae_id].log({**live, "train/dead": mb.dead(tokens), "tokens": tokens}, step=step)

    def finish(self, members: list[SaeTrainer], results: list[TrainResult]) -> None:
        """Final evaluation metrics as each run's summary, then close the runs."""
        for mb, r in zip(members, results, strict=True):
            run = self.runs[mb.plan.sae_id]
            run.summary.update({f"eval/{k}": v for k, v in r.metrics.items()})
            run.finish()
