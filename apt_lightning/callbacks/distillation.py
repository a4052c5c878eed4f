"""`SelfDistillation`: when to snapshot the teacher, how much the distillation loss weighs, and the phases
of training it defines (docs/method.md section 7).

Three phases, by optimizer step:
1. pruning phase (`start_step` to `end_step`, by default `AdaptivePruning`'s): mu, the weight of
   L_distill, rises linearly from 0 to `mu_max`; the teacher is refreshed at pruning events by a
   swappable `SnapshotPolicy`;
2. post-pruning distillation (`end_step` to the end of distillation): mu = `post_mu`;
3. final phase (after distillation): the task loss alone at `final_lr_scale` x the scheduled LR, from the
   best state at the final structure (`final_from="best"`) or the current one.

`schedule` picks the teacher's width and the defaults of the other choices:
- "in_pruning" (the default): the teacher follows every compaction, so it is at most one event wider than
  the student; snapshots at every event (`EveryEvent`); distillation ends with the pruning phase;
  `post_mu` = `mu_max`; the final phase goes on from the current state.
- "authors" (the authors' code): the teacher stays as wide as its last snapshot (possibly the dense model):
  the student is compacted only when the teacher takes a snapshot and when distillation ends, and trains
  masked in between (`AdaptivePruning(compact_at="never")`); snapshots only when the monitored dev metric
  improved (`OnImprovement`); distillation ends halfway through the steps left after pruning (the authors
  distil 18 of the 37 epochs after it); `post_mu` = 1; the final phase starts from the best state.

`distill_epochs` (whole epochs) or `distill_until` (a step or a fraction of the run) set the end of
distillation under either schedule.
"""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning import distributed
from apt_lightning.callbacks.events import PruningEvent, find_callback, structure_final
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.selection import check_mode, task_monitor
from apt_lightning.distill import Distiller, TeacherView
from apt_lightning.distill.losses import check_layer_options
from apt_lightning.pruning.schedule import resolve_step

SCHEDULES = ("in_pruning", "authors")
FINAL_FROM = ("best", "current")


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


_POLICY_NAMES = {"every_event": EveryEvent, "on_improvement": OnImprovement}


class SelfDistillation(Callback):
    """Args:
    tau: softmax temperature of L_pred (> 0).
    pred_weight / layer_weight: L_distill = pred_weight * L_pred + layer_weight * L_layer, each in [0, 1].
    layer_blocks: with `layer_sampling="blocks"`, teacher layers sampled per step (one per block of
        consecutive layers).
    layer_sampling / layer_mse / alive: details of L_layer (`apt_lightning.distill.losses`): "blocks" or
        "all" teacher layers; MSE over the student's "kept" hidden dims or "all"; a student layer is alive
        with "either" sublayer left or only with "both" (the authors' code: "all", "all", "both").
    schedule: "in_pruning" or "authors" (the module docstring).
    start_step / end_step: the mu ramp (steps or fractions of the run); default: the pruning phase.
    mu_max: where the ramp ends, in (0, 1]. 1 (the paper) leaves the task loss out at the end of the ramp;
        below 1 it keeps a share (1 - mu_max) of the task loss.
    post_mu: mu after the ramp until distillation ends, in (0, 1]; None: the schedule's default.
    snapshot: a `SnapshotPolicy`, or "every_event" / "on_improvement" (monitoring `monitor`); None: the
        schedule's default.
    distill_epochs: distillation ends after this many epochs (>= 1).
    distill_until: distillation ends at this step (int) or fraction of the run (float); not with
        `distill_epochs`. With neither, the schedule's default.
    final_lr_scale: the final phase trains on the task loss alone at this factor of the scheduled LR, in
        (0, 1] (the optimizer is rebuilt; the LR schedule continues over the remaining steps).
    final_from: "best" restores the trainable tensors of the best validation at the final structure
        (`monitor`) before the final phase (the authors reload their best checkpoint); "current" goes on
        from where distillation ended. None: the schedule's default.
    monitor / mode: the validation metric "best" means, for `final_from` and "on_improvement", and its
        direction ("max" or "min"); default the task's primary metric (`val/<metric>`) in the task's
        direction (`val/loss`, min, for `task: instruction`). A monitor given without a mode: the task's
        direction when it is one of the task's metrics, else "min" for a loss and "max" otherwise
        (`callbacks.selection.task_monitor`).
    transform_rank: rank of the adapter on the layer transformation Tr.
    post_lr_scale: the former name of `final_lr_scale` (configs recorded before the rename).
    """

    def __init__(
        self,
        tau: float = 4.0,
        pred_weight: float = 1.0,
        layer_weight: float = 0.9,
        layer_blocks: int = 4,
        layer_sampling: str = "blocks",
        layer_mse: str = "kept",
        alive: str = "either",
        schedule: str = "in_pruning",
        start_step: int | float | None = None,
        end_step: int | float | None = None,
        mu_max: float = 1.0,
        post_mu: float | None = None,
        snapshot: SnapshotPolicy | str | None = None,
        distill_epochs: int | None = None,
        distill_until: int | float | None = None,
        final_lr_scale: float = 0.1,
        final_from: str | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        transform_rank: int = 8,
        post_lr_scale: float | None = None,
    ) -> None:
        if post_lr_scale is not None:  # configs recorded before the final phase had its own name
            rank_zero_warn(
                "SelfDistillation: post_lr_scale is now final_lr_scale; using it as final_lr_scale"
            )
            final_lr_scale = post_lr_scale
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        for name, w in (("pred_weight", pred_weight), ("layer_weight", layer_weight)):
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {w}")
        check_layer_options(layer_sampling, layer_mse, alive)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 < mu_max <= 1.0:
            raise ValueError(f"mu_max must be in (0, 1], got {mu_max}")
        if post_mu is not None and not 0.0 < post_mu <= 1.0:
            raise ValueError(f"post_mu must be in (0, 1] or None, got {post_mu}")
        if not 0.0 < final_lr_scale <= 1.0:
            raise ValueError(f"final_lr_scale must be in (0, 1], got {final_lr_scale}")
        if final_from is not None and final_from not in FINAL_FROM:
            raise ValueError(f"final_from must be one of {FINAL_FROM} or None, got {final_from!r}")
        check_mode(mode)
        if distill_epochs is not None and distill_epochs < 1:
            raise ValueError(f"distill_epochs must be >= 1 or None, got {distill_epochs}")
        if distill_epochs is not None and distill_until is not None:
            raise ValueError("give distill_epochs or distill_until, not both")
        if isinstance(snapshot, str) and snapshot not in _POLICY_NAMES:
            raise ValueError(
                f"snapshot must be a SnapshotPolicy or one of {sorted(_POLICY_NAMES)}, got {snapshot!r}"
            )
        authors = schedule == "authors"
        self.tau, self.pred_weight, self.layer_weight = tau, pred_weight, layer_weight
        self.layer_blocks, self.transform_rank = layer_blocks, transform_rank
        self.layer_sampling, self.layer_mse, self.alive = layer_sampling, layer_mse, alive
        self.schedule = schedule
        self.start_step, self.end_step, self.mu_max = start_step, end_step, mu_max
        self.post_mu = post_mu if post_mu is not None else (1.0 if authors else mu_max)
        self.snapshot = snapshot if snapshot is not None else ("on_improvement" if authors else "every_event")
        self.policy: SnapshotPolicy | None = snapshot if isinstance(snapshot, SnapshotPolicy) else None
        self.distill_epochs, self.distill_until = distill_epochs, distill_until
        self.final_lr_scale = final_lr_scale
        self.final_from = final_from if final_from is not None else ("best" if authors else "current")
        self.monitor, self.mode = monitor, mode
        self.start = self.end = 0
        self.stop: int | None = None  # the step distillation ends at (None: at the end of an epoch)
        self.finished = False
        self.history: list[dict] = []  # teacher snapshots
        self.phases: dict[str, int] = {}  # the step each phase began at
        self.best: dict | None = None  # {"value", "step", "tensors"}: best validation at the final structure
        self._compact_pending = False
        self._distiller: Distiller | None = None

    # ------------------------------------------------------------------ set-up
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
        self.stop = self._resolve_stop(total)
        if self.schedule == "authors" and pruning is not None and pruning.compact_at != "never":
            raise ValueError(
                f"SelfDistillation(schedule='authors') keeps the teacher wider than the pruned student, so "
                f"the student may only be compacted when the teacher takes a snapshot and when distillation "
                f"ends (this callback does both); AdaptivePruning has compact_at={pruning.compact_at!r}: "
                "set pruning.compact_at: never"
            )
        self.monitor, self.mode = task_monitor(getattr(pl_module, "task", None), self.monitor, self.mode)
        if self.policy is None:
            policy = _POLICY_NAMES[self.snapshot]
            self.policy = policy(self.monitor, self.mode) if policy is OnImprovement else policy()
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
                layer_sampling=self.layer_sampling,
                layer_mse=self.layer_mse,
                alive=self.alive,
            )
        self._distiller = pl_module.distiller
        if pl_module.teacher is None:
            pl_module.teacher = TeacherView()

    def _resolve_stop(self, total: int) -> int | None:
        """The step distillation ends at; None when `distill_epochs` ends it at an epoch's end."""
        if self.distill_epochs is not None:
            return None
        if self.distill_until is not None:
            stop = resolve_step(self.distill_until, total, "distill_until")
        elif self.schedule == "authors":  # the authors distil 18 of the 37 epochs after pruning
            stop = self.end + (total - self.end) // 2
        else:
            stop = self.end
        if self.schedule == "authors" and stop <= self.end:
            raise ValueError(
                f"distillation ends at step {stop}, not after the pruning phase (ends at step {self.end}); "
                "schedule 'authors' distils after pruning: set distill_until later"
            )
        return stop

    # ------------------------------------------------------------------ the phases
    def mu_at(self, step: int) -> float:
        if self.finished or step < self.start:
            return 0.0
        if step < self.end:
            return self.mu_max * (step - self.start) / (self.end - self.start)
        return self.post_mu

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.finished and self.stop is not None and step >= self.stop:
            self._finish(trainer, pl_module)
        if self._compact_pending:
            self._compact(trainer, pl_module)
        if not pl_module.teacher.ready and step >= self.start and not self.finished:
            self._snapshot(trainer, pl_module, "start")
        if step >= self.end and not self.finished:
            self.phases.setdefault("post_pruning", step)
        pl_module.distill_weight = self.mu_at(step) if pl_module.teacher.ready else 0.0

    def on_pruning_event(self, trainer: Trainer, pl_module: LightningModule, event: PruningEvent) -> None:
        if not self.finished and self.policy.should_snapshot(trainer, event):
            self._snapshot(trainer, pl_module, f"event {event.index}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the best trainable tensors at the final structure (for `final_from="best"`)."""
        if trainer.sanity_checking or self.finished or self.final_from != "best":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not structure_final(trainer):
            return
        value = float(value)
        if self.best is not None and not (
            value > self.best["value"] if self.mode == "max" else value < self.best["value"]
        ):
            return
        tensors = {n: p.detach().clone() for n, p in pl_module.student.named_parameters() if p.requires_grad}
        self.best = {"value": value, "step": trainer.global_step, "tensors": tensors}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.distill_epochs is not None
            and not self.finished
            and trainer.current_epoch + 1 >= self.distill_epochs
        ):
            self._finish(trainer, pl_module)

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> None:
        if self.schedule == "authors":  # the authors' code compacts, then sets the teacher
            self._compact(trainer, pl_module)
        pl_module.teacher.snapshot(pl_module.student)
        self.history.append({"step": trainer.global_step, "reason": reason})
        pl_module.log("distill/snapshots", float(pl_module.teacher.snapshots))

    def _compact(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the blocks hard-masked so far (`AdaptivePruning.compact_now`: its statistics follow).

        A snapshot's compaction needs hard masks: inside a mask-decay window it is skipped and the teacher
        is the wider model. The final one (distillation ended) waits until pruning is done, masks hard at
        the final structure, so no later event leaves masked blocks uncompacted; until then it is pending.
        Both `mask_decay` modes announce an event with the previous window closed, so snapshots at events
        always compact."""
        self._compact_pending = False
        pruning = find_callback(trainer, AdaptivePruning)
        masks = pl_module.structure.masks if pruning is not None else None
        if masks is None:
            return
        if not (pruning.pruning_done if self.finished else masks.is_hard()):
            self._compact_pending = self.finished  # the final compaction must happen; a snapshot's may not
            return
        pruning.compact_now(pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """End of distillation: restore the best state (`final_from="best"`), compact (`authors`), drop
        the teacher, and train on the task loss alone at `final_lr_scale` x the scheduled LR."""
        self.finished = True
        self.phases["final"] = trainer.global_step
        pl_module.distill_weight = 0.0
        restored = self._restore_best(pl_module)
        rebuild = restored or self.final_lr_scale != pl_module.lr_scale
        pl_module.lr_scale = self.final_lr_scale
        if self.schedule == "authors":
            self._compact(trainer, pl_module)
        pl_module.teacher.clear()
        if rebuild:  # Adam moments restart: the objective (and, restored, the weights) changed
            pl_module.rebuild_optimizer()

    def _restore_best(self, pl_module: LightningModule) -> bool:
        if self.final_from != "best":
            return False
        if self.best is None:
            rank_zero_warn(
                f"SelfDistillation: no validation of {self.monitor!r} at the final structure before "
                "distillation ended; the final phase starts from the current state"
            )
            return False
        params = dict(pl_module.student.named_parameters())
        with torch.no_grad():
            for name, tensor in self.best["tensors"].items():
                param = params.get(name)
                if param is None or param.shape != tensor.shape:
                    raise RuntimeError(
                        f"SelfDistillation: the best state's {name} no longer fits the student "
                        f"({None if param is None else tuple(param.shape)} vs {tuple(tensor.shape)})"
                    )
                param.copy_(tensor)
        self.phases["restored_best_step"] = self.best["step"]
        self.best = None  # used: its memory is freed
        return True

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        state = {
            "finished": self.finished,
            "history": self.history,
            "phases": self.phases,
            "best": self.best,
            "compact_pending": self._compact_pending,
            "policy": self.policy.state_dict() if self.policy is not None else {},
            "schedule": self.schedule,
            "mu_max": self.mu_max,
            "ramp": {
                "start_step": self.start_step,
                "end_step": self.end_step,
                "distill_until": self.distill_until,
                "steps": [self.start, self.end, self.stop],
            },
        }
        if self._distiller is not None:  # a resumed run draws the same teacher layers
            state["layer_sampler"] = self._distiller.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("schedule", "in_pruning")
        if saved != self.schedule:
            raise ValueError(
                f"SelfDistillation: the checkpoint trained with schedule={saved!r}, this run configures "
                f"{self.schedule!r}; the teacher's width and the compaction differ between them. Resume with "
                f"schedule: {saved}, or start a new run."
            )
        saved = state.get("mu_max", 1.0)  # checkpoints from before mu_max existed ramped to 1
        if saved != self.mu_max:
            rank_zero_warn(
                f"SelfDistillation: the checkpoint trained with mu_max={saved}, this run uses mu_max="
                f"{self.mu_max}; the resumed run ramps to {self.mu_max}"
            )
        self._load_ramp(state.get("ramp"))
        self.finished = state["finished"]
        self.history = state["history"]
        self.phases = dict(state.get("phases", {}))
        self.best = state.get("best")
        self._compact_pending = state.get("compact_pending", False)
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self._distiller is not None and "layer_sampler" in state:
            self._distiller.generator.set_state(state["layer_sampler"])

    def _load_ramp(self, saved: dict | None) -> None:
        """The phases of a resumed run: with the same start_step / end_step / distill_until arguments it
        keeps the saved steps even if the run length changed (fractions are not re-resolved, as in
        `AdaptivePruning`); with changed arguments the new steps apply from the resumed step, and a warning
        says so."""
        if saved is None or not self.end:  # older checkpoint, or not set up for fitting
            return
        steps = [int(s) if s is not None else None for s in saved["steps"]]
        current = [self.start, self.end, self.stop][: len(steps)]  # older checkpoints saved [start, end]
        if steps == current:
            return
        args = (saved["start_step"], saved["end_step"], saved.get("distill_until"))
        if args == (self.start_step, self.end_step, self.distill_until):
            rank_zero_warn(
                f"SelfDistillation: the run length changed since the checkpoint; the distillation phases "
                f"keep their saved steps {steps} (they would now resolve to {current})"
            )
            self.start, self.end = steps[:2]
            if len(steps) > 2:
                self.stop = steps[2]
        else:
            rank_zero_warn(
                f"SelfDistillation: the checkpoint's distillation phases were at steps {steps}, this run "
                f"configures {current}; the resumed run follows the new steps, so mu may jump at the first "
                "resumed step"
            )
