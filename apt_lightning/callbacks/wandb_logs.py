"""What the APT callbacks send to Weights & Biases beyond scalars: the W&B loggers of a trainer, histograms of
the block scores at each pruning event, the blocks kept per layer as a table."""

from __future__ import annotations

import torch
from lightning import Trainer

from apt_lightning.pruning import BlockTensors


def wandb_loggers(trainer: Trainer) -> list:
    """The trainer's W&B loggers (none when W&B is not configured; wandb is imported only then)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_score_histograms(trainer: Trainer, scores: BlockTensors, step: int) -> None:
    """Histograms of the head, neuron and hidden-dim scores a pruning search saw."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    loggers[0].experiment.log(
        {
            "prune/head_scores": wandb.Histogram(torch.cat(scores.heads).numpy()),
            "prune/neuron_scores": wandb.Histogram(torch.cat(scores.neurons).numpy()),
            "prune/hidden_scores": wandb.Histogram(scores.hidden.numpy()),
            "trainer/global_step": step,
        }
    )


def log_kept_table(trainer: Trainer, record: dict) -> None:
    """One row per layer of a pruning event's record: the heads and FFN neurons kept."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    rows = [
        [record["event"], layer, h, f]
        for layer, (h, f) in enumerate(
            zip(record["heads_per_layer"], record["neurons_per_layer"], strict=True)
        )
    ]
    loggers[0].log_table("prune/kept_per_layer", columns=["event", "layer", "heads", "neurons"], data=rows)
