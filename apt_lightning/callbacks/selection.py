"""`FinalStructureCheckpoint`: keep the best validation point among those taken at the final structure.

Model selection on a pruning run must compare models of the size it delivers: a validation point taken
before the last pruning step scores a wider model, so a maximum taken there (one suite run's best was
mid-pruning) overstates the result. A point counts once every width-changing callback is done
(`events.structure_final`: `AdaptivePruning` after its last mask-decay window, `TorchPruningPeer` after its
last step; a run without either counts every point). The efficiency monitor's best metric, the run summary,
the suite report and `SelfDistillation(final_from="best")` count the same points (docs/method.md section 9).
With the validation split carved from the training data (`GLUEDataModule(val_from_train=...)`) the
checkpoint kept here is then tested on the official dev set (docs/method.md, "Honest model selection").
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning.callbacks.events import structure_final

MODES = ("max", "min")


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None (the task's), got {mode!r}")


def task_monitor(task: Any, monitor: str | None = None, mode: str | None = None) -> tuple[str, str]:
    """The validation metric a "best" is taken on and its direction; explicit values win.

    By default the task's primary metric (`val/<metric>`; `val/accuracy` without a task) in the task's
    direction (`task.mode`: "min" for `task: instruction`'s `val/loss`, "max" for tasks without one). A
    monitor given without a mode: the task's direction when it is one of the task's metrics, else "min" for
    a name with "loss" in it and "max" otherwise (the rule of the run summary)."""
    check_mode(mode)
    monitor = monitor or f"val/{getattr(task, 'primary_metric', None) or 'accuracy'}"
    if mode is None:
        if monitor.removeprefix("val/") in getattr(task, "metric_names", ("accuracy",)):
            mode = str(getattr(task, "mode", "max"))
        else:
            mode = "min" if "loss" in monitor else "max"
    return monitor, mode


class FinalStructureCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` (monitor, mode, save_top_k, ... as there) that saves only at validation ends
    after the model's widths stopped changing. Defaults: the best one by the task's primary metric in the
    task's direction (`val/accuracy`, max, on GLUE; `val/loss`, min, for `task: instruction`; resolved in
    `setup` by `task_monitor`), weights only."""

    def __init__(
        self,
        monitor: str | None = None,
        mode: str | None = None,
        dirpath: str | None = None,
        filename: str = "best-{step}",
        save_top_k: int = 1,
        save_weights_only: bool = True,
    ) -> None:
        check_mode(mode)
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode or "max",
            # Lightning refuses top-k > 1 without a monitor; the task's is set in `setup`
            save_top_k=save_top_k if monitor is not None else min(save_top_k, 1),
            save_weights_only=save_weights_only,
            save_on_train_epoch_end=False,
            auto_insert_metric_name=False,
        )
        self.save_top_k = save_top_k
        self._given: tuple[str | None, str | None] | None = (monitor, mode)  # None once resolved

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._given is not None:  # before Lightning restores this callback's state (keyed by both)
            self.monitor, self.mode = task_monitor(getattr(pl_module, "task", None), *self._given)
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            self._given = None
        super().setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if structure_final(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if structure_final(trainer):
            super().on_train_epoch_end(trainer, pl_module)
