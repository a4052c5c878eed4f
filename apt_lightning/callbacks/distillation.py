"""`SelfDistillation`: when to snapshot the teacher and how much the distillation loss weighs.

mu (the weight of L_distill) rises linearly from 0 at `start_step` to 1 at `end_step` (by default the
pruning phase of `AdaptivePruning`). The teacher is refreshed at pruning events by a swappable
`SnapshotPolicy`. After `distill_epochs` epochs, mu drops to 0 and training continues on the task loss
at `post_lr_scale` times the learning rate (the paper's recipe).
"""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning import distributed
from apt_lightning.callbacks.events import PruningEvent, find_callback
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.distill import Distiller, TeacherView
from apt_lightning.pruning.schedule import resolve_step


class SnapshotPolicy:
    """Decides at each pruning event whether the teacher takes a new snapshot of the student."""

    def should_snapshot(self, trainer: Trainer, event: PruningEvent | None) -> bool:
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EveryEvent(SnapshotPolicy):
    """Refresh the teacher at every pruning event (the paper)."""


class OnImprovement(SnapshotPolicy):
    """Refresh only when the monitored validation metric improved since the last snapshot (the authors'
    code). Before any validation has run, the first snapshot is always taken."""

    def __init__(self, monitor: str = "val/accuracy", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None

    def should_snapshot(self, trainer: Trainer, event: PruningEvent | None) -> bool:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
            if logged:  # validation ran but never logs this name: every event would refresh the teacher
                raise ValueError(
                    f"OnImprovement monitors {self.monitor!r}, which validation does not log; "
                    f"logged: {logged}"
                )
            return self.best is None
        value = float(value)
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
        return better

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


class SelfDistillation(Callback):
    """Args:
    tau: softmax temperature of L_pred (> 0).
    pred_weight / layer_weight: L_distill = pred_weight * L_pred + layer_weight * L_layer, each in [0, 1].
    layer_blocks: teacher layers sampled per step (one per block of consecutive layers).
    start_step / end_step: the mu ramp (steps or fractions of the run); default: the pruning phase.
    mu_max: where the ramp ends, in (0, 1]. 1 (the paper) leaves the task loss out at the end of the ramp;
        below 1 it keeps a share (1 - mu_max) of the task loss throughout.
    snapshot: a `SnapshotPolicy` (EveryEvent, OnImprovement).
    distill_epochs: epochs with distillation; afterwards task loss only at `post_lr_scale` x LR. None
        ends distillation at the end of the ramp (`end_step`): after pruning, a teacher refreshed at
        every event is the pruned student itself, so distilling further only slows recovery.
    transform_rank: rank of the adapter on the layer transformation Tr.
    """

    def __init__(
        self,
        tau: float = 4.0,
        pred_weight: float = 1.0,
        layer_weight: float = 0.9,
        layer_blocks: int = 4,
        start_step: int | float | None = None,
        end_step: int | float | None = None,
        mu_max: float = 1.0,
        snapshot: SnapshotPolicy | None = None,
        distill_epochs: int | None = None,
        post_lr_scale: float = 0.1,
        transform_rank: int = 8,
    ) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        for name, w in (("pred_weight", pred_weight), ("layer_weight", layer_weight)):
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {w}")
        if not 0.0 < mu_max <= 1.0:
            raise ValueError(f"mu_max must be in (0, 1], got {mu_max}")
        if not 0.0 < post_lr_scale <= 1.0:
            raise ValueError(f"post_lr_scale must be in (0, 1], got {post_lr_scale}")
        if distill_epochs is not None and distill_epochs < 1:
            raise ValueError(f"distill_epochs must be >= 1 or None, got {distill_epochs}")
        self.tau, self.pred_weight, self.layer_weight = tau, pred_weight, layer_weight
        self.layer_blocks, self.transform_rank = layer_blocks, transform_rank
        self.start_step, self.end_step, self.mu_max = start_step, end_step, mu_max
        self.policy = snapshot or EveryEvent()
        self.distill_epochs, self.post_lr_scale = distill_epochs, post_lr_scale
        self.start = self.end = 0
        self.finished = False
        self.history: list[dict] = []
        self._distiller: Distiller | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.adapters():
            raise ValueError(
                "SelfDistillation has no teacher source: the teacher shares the student's frozen weights, "
                "but this model is fully fine-tuned (adapters: null). Use adapters or drop the callback."
            )
        pruning = find_callback(trainer, AdaptivePruning)
        total = int(trainer.estimated_stepping_batches)
        start = self.start_step if self.start_step is not None else (pruning.start_step if pruning else None)
        end = self.end_step if self.end_step is not None else (pruning.end_step if pruning else None)
        if start is None or end is None:
            raise ValueError(
                "SelfDistillation has no teacher source: give start_step/end_step or add AdaptivePruning, "
                "whose events refresh the teacher"
            )
        self.start, self.end = resolve_step(start, total, "start_step"), resolve_step(end, total, "end_step")
        if self.start >= self.end:
            raise ValueError(
                f"distillation start step ({self.start}) must come before the end step ({self.end})"
            )
        distributed.find_unused_parameters(trainer, "the distiller's transform trains only while distilling")
        hidden = pl_module.student.config.hidden_size
        if pl_module.distiller is None:
            pl_module.distiller = Distiller(
                hidden,
                self.tau,
                self.pred_weight,
                self.layer_weight,
                self.layer_blocks,
                self.transform_rank,
                # follows seed_everything (seeds sample different teacher layers); rank 0's on every rank
                seed=distributed.broadcast_object(torch.initial_seed()),
            )
        self._distiller = pl_module.distiller
        if pl_module.teacher is None:
            pl_module.teacher = TeacherView()

    def mu_at(self, step: int) -> float:
        if self.finished or step < self.start:
            return 0.0
        return self.mu_max * min(1.0, (step - self.start) / (self.end - self.start))

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> None:
        pl_module.teacher.snapshot(pl_module.student)
        self.history.append({"step": trainer.global_step, "reason": reason})
        pl_module.log("distill/snapshots", float(pl_module.teacher.snapshots))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.distill_epochs is None and not self.finished and step >= self.end:
            self._finish(pl_module)
        if not pl_module.teacher.ready and step >= self.start and not self.finished:
            self._snapshot(trainer, pl_module, "start")
        pl_module.distill_weight = self.mu_at(step) if pl_module.teacher.ready else 0.0

    def on_pruning_event(self, trainer: Trainer, pl_module: LightningModule, event: PruningEvent) -> None:
        if self.policy.should_snapshot(trainer, event):
            self._snapshot(trainer, pl_module, f"event {event.index}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.distill_epochs is not None
            and not self.finished
            and trainer.current_epoch + 1 >= self.distill_epochs
        ):
            self._finish(pl_module)

    def _finish(self, pl_module: LightningModule) -> None:
        """End of the distillation phase: task loss only, at `post_lr_scale` x the scheduled LR."""
        self.finished = True
        pl_module.distill_weight = 0.0
        if self.post_lr_scale != 1.0:
            pl_module.lr_scale = self.post_lr_scale
            pl_module.rebuild_optimizer()

    def state_dict(self) -> dict:
        state = {
            "finished": self.finished,
            "history": self.history,
            "policy": self.policy.state_dict(),
            "mu_max": self.mu_max,
            "ramp": {
                "start_step": self.start_step,
                "end_step": self.end_step,
                "steps": [self.start, self.end],
            },
        }
        if self._distiller is not None:  # a resumed run draws the same teacher layers
            state["layer_sampler"] = self._distiller.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("mu_max", 1.0)  # checkpoints from before mu_max existed ramped to 1
        if saved != self.mu_max:
            rank_zero_warn(
                f"SelfDistillation: the checkpoint trained with mu_max={saved}, this run uses mu_max="
                f"{self.mu_max}; the resumed run ramps to {self.mu_max}"
            )
        self._load_ramp(state.get("ramp"))
        self.finished = state["finished"]
        self.history = state["history"]
        self.policy.load_state_dict(state["policy"])
        if self._distiller is not None and "layer_sampler" in state:
            self._distiller.generator.set_state(state["layer_sampler"])

    def _load_ramp(self, saved: dict | None) -> None:
        """The mu ramp of a resumed run: with the same start_step / end_step arguments it keeps the saved
        steps even if the run length changed (fractions are not re-resolved, as in `AdaptivePruning`); with
        changed arguments the new ramp applies from the resumed step, and a warning says so."""
        if saved is None or not self.end:  # older checkpoint, or not set up for fitting
            return
        steps = [int(s) for s in saved["steps"]]
        if steps == [self.start, self.end]:
            return
        if (saved["start_step"], saved["end_step"]) == (self.start_step, self.end_step):
            rank_zero_warn(
                f"SelfDistillation: the run length changed since the checkpoint; the mu ramp keeps its saved "
                f"steps {steps} (it would now resolve to {[self.start, self.end]})"
            )
            self.start, self.end = steps
        else:
            rank_zero_warn(
                f"SelfDistillation: the checkpoint ramped mu over steps {steps}, this run configures "
                f"{[self.start, self.end]}; the resumed run follows the new ramp, so mu may jump at the "
                "first resumed step"
            )
