"""Which validation points a run's best metric counts: those taken at the final sparsity (docs/method.md
section 9).

A pruned model's dev metric before its last pruning event belongs to a wider model than the one the run
delivers, so a maximum taken there (one suite run's best was mid-pruning) overstates the result. A point
counts once `AdaptivePruning` has finished all its events (the last mask-decay window closed, masks hard at
the target); a run without `AdaptivePruning` (FT, LoRA) counts every point.

`FinalSparsityCheckpoint` applies the same rule to checkpoint selection: a `ModelCheckpoint` whose
monitored top-k ignores validations before the final sparsity (`save_last` and unmonitored checkpoints
are unchanged).
"""

from __future__ import annotations

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning.callbacks.events import find_callback
from apt_lightning.callbacks.pruning import AdaptivePruning


def at_final_sparsity(trainer: Trainer) -> bool:
    """True once the run's pruning (if any) has finished every event; always True without pruning."""
    pruner = find_callback(trainer, AdaptivePruning)
    if pruner is None:
        return True
    finished = sum("achieved_sparsity" in record for record in pruner.history)
    return finished >= pruner.num_events


class FinalSparsityCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` whose monitored top-k only considers validations at the final sparsity, so the
    best checkpoint is one of the model the run delivers; same arguments as `ModelCheckpoint`."""

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and not at_final_sparsity(trainer):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)
