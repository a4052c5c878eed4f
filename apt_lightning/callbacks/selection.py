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

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning.callbacks.events import structure_final


class FinalStructureCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` (monitor, mode, save_top_k, ... as there) that saves only at validation ends
    after the model's widths stopped changing. Defaults: the best one by `val/accuracy`, weights only."""

    def __init__(
        self,
        monitor: str = "val/accuracy",
        mode: str = "max",
        dirpath: str | None = None,
        filename: str = "best-{step}",
        save_top_k: int = 1,
        save_weights_only: bool = True,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            save_on_train_epoch_end=False,
            auto_insert_metric_name=False,
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if structure_final(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if structure_final(trainer):
            super().on_train_epoch_end(trainer, pl_module)
