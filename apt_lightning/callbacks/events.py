"""Pruning events that other callbacks react to (rank growth, teacher snapshots).

`AdaptivePruning` calls `on_pruning_event(trainer, pl_module, event)` on every callback that defines it,
just before it scores and searches, so listeners act on the model as it was before this event.

A callback that changes the model's widths says through a `pruning_done` property when it will change
them no more (`structure_final`: the best metric, checkpoint selection and `SelfDistillation`'s best state
count only points at the final structure).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning import Callback, LightningModule, Trainer


@dataclass(frozen=True)
class PruningEvent:
    index: int  # 0-based
    num_events: int
    step: int
    target_sparsity: float

    @property
    def progress(self) -> float:
        """Fraction of the pruning phase done once this event completes, in (0, 1]."""
        return (self.index + 1) / self.num_events


def broadcast(trainer: Trainer, pl_module: LightningModule, event: PruningEvent) -> None:
    for cb in trainer.callbacks:
        hook = getattr(cb, "on_pruning_event", None)
        if hook is not None:
            hook(trainer, pl_module, event)


def find_callback(trainer: Trainer, cls: type[Callback]) -> Callback | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def structure_final(trainer: Trainer) -> bool:
    """Whether no callback will change the model's widths any more (each one's `pruning_done`)."""
    return all(getattr(cb, "pruning_done", True) for cb in trainer.callbacks)
