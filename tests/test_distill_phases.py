"""Distillation phases (issue 15, deviations 2 and 6): the authors' schedule (mu ramp, post-pruning phase
at full weight from a wide teacher, final task-loss phase at a lower LR from the best state), the snapshot
policies in a run, and the layer-distillation options."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_apt import CountSteps, SaveAt, quiet_trainer, repeated_batch_loader, synthetic_batch
from lightning import Callback

from apt_lightning import APTModule
from apt_lightning.callbacks import (
    AdaptivePruning,
    FinalStructureCheckpoint,
    SelfDistillation,
    SnapshotPolicy,
)
from apt_lightning.callbacks.selection import task_monitor
from apt_lightning.data.tasks import get_task
from apt_lightning.distill import Distiller
from apt_lightning.pruning import BlockTensors, Scorer

pytestmark = pytest.mark.usefixtures("one_thread")

# The run every test here trains: 16 optimizer steps, validation every 2 (global steps 2, 4, ..., 16),
# pruning from step 2 to step 8 in 3 events (steps 4, 6, 8) with 1-step windows: the final structure is
# reached at step 9, so validations from step 10 on are at the final structure.
STEPS, START, END = 16, 2, 8
FULL = ((4, 4, 4), (48, 48, 48), 32)  # heads, neurons per layer, hidden of the tiny backbone
BASE_LR = 2e-4  # APTModule's default AdamW; WarmupLinearLR with 6% of 16 steps = no warm-up


def scheduled_lr(step: int) -> float:
    return BASE_LR * (STEPS - step) / STEPS


class ScriptedModule(APTModule):
    """Validation logs `val/accuracy` = `script[global_step]` (0.5 for steps not in the script)."""

    def __init__(self, script: dict[int, float], **kw) -> None:
        super().__init__(**kw)
        self.script = script

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", self.script.get(self.global_step, 0.5))


def scripted(backbone, script: dict[int, float] | None = None) -> ScriptedModule:
    torch.manual_seed(0)
    return ScriptedModule(script or {}, backbone=str(backbone), task="sst2")


class HiddenFirst(Scorer):
    """Every block scores 1 except hidden dims 0-3 (0): the search prunes those four first."""

    def compute(self, structure) -> BlockTensors:
        scores = BlockTensors.full(structure.shapes(), 1.0)
        scores.hidden[:4] = 0.0
        return scores


class Never(SnapshotPolicy):
    """No snapshot at any event: the teacher stays the one taken when the ramp starts (the dense model)."""

    def should_snapshot(self, trainer, event) -> bool:
        return False


class Probe(Callback):
    """Per optimizer step: mu, the LR, the student's physical widths (heads, neurons, hidden), and the
    steps at which the distillation loss was computed."""

    def __init__(self) -> None:
        self.mu: dict[int, float] = {}
        self.lr: dict[int, float] = {}
        self.widths: dict[int, tuple] = {}
        self.distilled: set[int] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        loss = pl_module.distiller.loss

        def spy(*args, **kwargs):
            self.distilled.add(trainer.global_step)
            return loss(*args, **kwargs)

        pl_module.distiller.loss = spy

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.mu[step] = pl_module.distill_weight
        self.lr[step] = optimizer.param_groups[0]["lr"]
        shapes = pl_module.structure.shapes()
        self.widths[step] = (tuple(shapes.heads), tuple(shapes.neurons), shapes.hidden)


def fit(model, callbacks, tmp_path, **kw):
    trainer = quiet_trainer(
        max_steps=STEPS,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
        **kw,
    )
    trainer.fit(model, repeated_batch_loader(STEPS), repeated_batch_loader(1))
    return trainer


def pruning(**kw) -> AdaptivePruning:
    args = dict(target_sparsity=0.5, start_step=START, end_step=END, num_events=3, decay_steps=1, plot=False)
    return AdaptivePruning(**{**args, **kw})


# ---------------------------------------------------------------------------------------------- phases
def test_authors_phases_switch_at_the_right_steps(backbone, tmp_path):
    """mu: 0, then the ramp to mu_max over pruning, post_mu until distill_until, then 0 on the task loss
    alone at final_lr_scale x the scheduled LR; the student is compacted when distillation ends."""
    model = scripted(backbone)
    distill = SelfDistillation(
        schedule="authors",
        mu_max=0.5,
        distill_until=12,
        snapshot=Never(),
        final_from="current",
        layer_blocks=3,
    )
    probe = Probe()
    fit(model, [pruning(compact_at="never"), distill, probe], tmp_path)
    ramp = {s: 0.5 * (s - START) / (END - START) for s in range(START, END)}
    want = {s: 0.0 for s in range(START)} | ramp | {s: 1.0 for s in range(END, 12)}
    want |= {s: 0.0 for s in range(12, STEPS)}
    assert probe.mu == pytest.approx(want)
    assert distill.phases == {"post_pruning": END, "final": 12}
    # the final phase: no distillation loss, the LR 0.1x the schedule, which continues (no restart)
    assert probe.distilled == set(range(START + 1, 12))  # mu > 0 from the second ramp step
    for s in range(STEPS):
        assert probe.lr[s] == pytest.approx(scheduled_lr(s) * (0.1 if s >= 12 else 1.0)), s
    # masked (full width) until distillation ended, compacted from then on
    assert all(probe.widths[s] == FULL for s in range(12))
    assert probe.widths[12] != FULL and not model.teacher.ready


def test_in_pruning_keeps_its_phases(backbone, tmp_path):
    """The present form: mu ramps to mu_max and distillation ends with the pruning phase (old default)."""
    model = scripted(backbone)
    distill = SelfDistillation(mu_max=0.5, layer_blocks=3)
    probe = Probe()
    fit(model, [pruning(), distill, probe], tmp_path)
    assert distill.schedule == "in_pruning" and distill.final_from == "current"
    assert probe.mu == pytest.approx(
        {s: 0.0 for s in range(START)}
        | {s: 0.5 * (s - START) / (END - START) for s in range(START, END)}
        | {s: 0.0 for s in range(END, STEPS)}
    )
    assert all(probe.lr[s] == pytest.approx(scheduled_lr(s) * 0.1) for s in range(END, STEPS))
    assert [h["reason"] for h in distill.history] == ["start", "event 0", "event 1", "event 2"]


def test_authors_defaults():
    cb = SelfDistillation(schedule="authors", mu_max=0.5)
    assert (cb.post_mu, cb.final_from, cb.snapshot) == (1.0, "best", "on_improvement")
    cb.start, cb.end = 2, 6
    assert [cb.mu_at(s) for s in (1, 2, 4, 6, 9)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    cb = SelfDistillation(mu_max=0.5)
    assert (cb.post_mu, cb.final_from, cb.snapshot) == (0.5, "current", "every_event")
    assert SelfDistillation(schedule="authors", post_mu=0.7, final_from="current").post_mu == 0.7
    cb.start, cb.end, cb.stop = 10, 110, None
    assert cb._resolve_stop(1000) == 110  # in_pruning: with the ramp
    authors = SelfDistillation(schedule="authors")
    authors.start, authors.end = 10, 110
    assert authors._resolve_stop(1000) == 110 + 890 // 2  # half the steps after pruning
    with pytest.warns(UserWarning, match="post_lr_scale is now final_lr_scale"):
        assert SelfDistillation(post_lr_scale=1.0).final_lr_scale == 1.0  # recorded configs still load


# ---------------------------------------------------------------------------------------------- wide teacher
class TeacherProbe(Callback):
    """At the start of step 2 (after SelfDistillation's snapshot there): the student's output with masks
    off, from a copy. At step 11 (post-pruning): the teacher's and the student's outputs on the same
    batch, the hidden mask and the student's widths."""

    def __init__(self) -> None:
        self.reference = None
        self.teacher = self.student = None
        self.masks_hidden = None
        self.shapes = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        inputs = {k: v for k, v in synthetic_batch(seed=3).items() if k != "labels"}
        if trainer.global_step == START:
            snapshot = copy.deepcopy(pl_module.student).eval()
            snapshot.apt_masks.enabled = False
            with torch.no_grad():
                self.reference = snapshot(**inputs, output_hidden_states=True)
        if trainer.global_step == 11:
            self.teacher = pl_module.teacher(pl_module.student, inputs, output_hidden_states=True)
            was = pl_module.student.training
            pl_module.student.eval()
            with torch.no_grad():
                self.student = pl_module.student(**inputs, output_hidden_states=True)
            pl_module.student.train(was)
            self.masks_hidden = pl_module.structure.masks.hidden.clone()
            self.shapes = pl_module.structure.shapes()


def test_teacher_stays_wide_after_pruning(backbone, tmp_path):
    """With no refresh after the start, the post-pruning teacher is the dense snapshot: its forward uses
    the pruned blocks and hidden dims, which the masked, uncompacted student no longer has."""
    model = scripted(backbone)
    distill = SelfDistillation(
        schedule="authors", start_step=START, end_step=END, distill_until=14, snapshot=Never(), layer_blocks=3
    )
    probe = TeacherProbe()
    with torch.no_grad():  # adapters away from B = 0, so the snapshot differs from the bare backbone
        for p in model.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    fit(model, [pruning(compact_at="never", scorer=HiddenFirst()), distill, probe], tmp_path)
    assert [h["reason"] for h in distill.history] == ["start"]
    assert probe.shapes.heads == [4, 4, 4] and probe.shapes.hidden == 32  # not compacted at step 11
    assert (probe.masks_hidden[:4] == 0).all() and (probe.masks_hidden[4:] == 1).all()
    # the teacher is the snapshot at full width: the step-2 student with masks off
    torch.testing.assert_close(probe.teacher.logits, probe.reference.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probe.student.logits, probe.reference.logits, atol=1e-3)
    # its hidden states keep the dims the student masks; the student's are 0 there
    assert probe.teacher.hidden_states[-1][..., :4].abs().amax() > 0.1
    assert probe.student.hidden_states[-1][..., :4].abs().amax() == 0
    # distillation over: the student is compacted and Tr follows its kept hidden dims
    assert model.structure.shapes().hidden == 28
    assert model.distiller.transform.proj.in_features == model.distiller.transform.proj.out_features == 28


def test_snapshot_on_improvement_refreshes_and_compacts_only_then(backbone, tmp_path):
    """OnImprovement (the authors' default) takes a snapshot at an event only if the last validation
    improved the metric; under the authors' schedule the student is compacted exactly then."""
    # validations at steps 2, 4, 6: event 0 (step 4) sees 0.6 (first: snapshot), event 1 (step 6) sees 0.5
    # (worse: none), event 2 (step 8) sees 0.7 (better: snapshot, compacting events 0 and 1's masks)
    model = scripted(backbone, {2: 0.6, 4: 0.5, 6: 0.7})
    distill = SelfDistillation(schedule="authors", distill_until=14, layer_blocks=3)
    probe = Probe()
    fit(model, [pruning(compact_at="never"), distill, probe], tmp_path)
    assert distill.snapshot == "on_improvement"
    assert [h["reason"] for h in distill.history] == ["start", "event 0", "event 2"]
    assert all(probe.widths[s] == FULL for s in range(8))
    assert probe.widths[8] != FULL  # compacted at event 2, before its snapshot
    assert all(probe.widths[s] == probe.widths[8] for s in range(8, 14))  # not again until distillation ends
    assert probe.widths[14] != probe.widths[8]  # compacted to event 2's masks when distillation ended


class LossTask:
    """sst2 selected by `val/loss`, lower is better (as `task: instruction`): a task with `mode` "min"."""

    primary_metric, metric_names, mode = "loss", ("loss",), "min"

    def __init__(self, task) -> None:
        self.task = task

    def __getattr__(self, name: str):
        return getattr(self.task, name)


class LossScripted(APTModule):
    """Validation logs `val/loss` = `script[global_step]`; the task says lower is better."""

    def __init__(self, script: dict[int, float], **kw) -> None:
        super().__init__(**kw)
        self.script = script
        self.task = LossTask(self.task)

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.script[self.global_step])


def test_a_loss_task_makes_lower_better(backbone, tmp_path):
    """Without monitor and mode, "best" follows the task (`val/loss`, min): OnImprovement refreshes the
    teacher on a lower loss and not on a higher one, `final_from="best"` restores the lowest loss at the
    final structure, and `FinalStructureCheckpoint` keeps that point."""
    # events 0, 1, 2 (steps 4, 6, 8) see the validations at steps 2, 4, 6; 10-14 are at the final structure
    script = {2: 0.6, 4: 0.7, 6: 0.5, 8: 0.9, 10: 0.4, 12: 0.45, 14: 0.6, 16: 0.3}
    torch.manual_seed(0)
    model = LossScripted(script, backbone=str(backbone), task="sst2")
    distill = SelfDistillation(schedule="authors", distill_until=14, layer_blocks=3)
    select = FinalStructureCheckpoint(dirpath=tmp_path / "best", save_top_k=2)
    fit(model, [pruning(compact_at="never"), distill, select], tmp_path, enable_checkpointing=True)
    assert (distill.monitor, distill.mode) == ("val/loss", "min")
    assert [h["reason"] for h in distill.history] == ["start", "event 0", "event 2"]  # not event 1's 0.7
    assert distill.phases["restored_best_step"] == 10
    assert (select.monitor, select.mode) == ("val/loss", "min")
    assert float(select.best_model_score) == pytest.approx(0.3)
    assert select.best_model_path.endswith("best-16.ckpt")
    assert sorted(Path(p).name for p in select.best_k_models) == ["best-10.ckpt", "best-16.ckpt"]


def test_monitor_and_mode_given_or_from_the_task():
    """Explicit values win; a monitor without a mode follows the task when it is one of the task's
    metrics, else a loss is minimised and anything else maximised."""
    loss = LossTask(get_task("sst2"))
    assert task_monitor(get_task("sst2")) == ("val/accuracy", "max")
    assert task_monitor(get_task("cola")) == ("val/matthews", "max")
    assert task_monitor(loss) == ("val/loss", "min")
    assert task_monitor(None) == ("val/accuracy", "max")
    assert task_monitor(loss, "val/accuracy") == ("val/accuracy", "max")
    assert task_monitor(get_task("sst2"), "val/loss") == ("val/loss", "min")
    assert task_monitor(loss, mode="max") == ("val/loss", "max")
    assert task_monitor(get_task("sst2"), "val/f1", "min") == ("val/f1", "min")
    with pytest.raises(ValueError, match="mode must be one of"):
        task_monitor(loss, mode="lower")


def test_final_phase_starts_from_the_best_state_at_final_structure(backbone, tmp_path):
    """final_from="best": when distillation ends, the adapters and head of the best validation at the
    final structure come back (not the mid-pruning maximum, not the current state)."""
    script = {6: 0.95, 10: 0.7, 12: 0.8}  # the maximum at step 6 is mid-pruning: it must not count

    class Keep(Callback):
        def __init__(self) -> None:
            self.at: dict[int, dict] = {}
            self.at_finish: dict | None = None

        def on_validation_end(self, trainer, pl_module) -> None:
            self.at[trainer.global_step] = trainable(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 14:
                self.at_finish = trainable(pl_module)

    def trainable(pl_module) -> dict:
        return {n: p.detach().clone() for n, p in pl_module.student.named_parameters() if p.requires_grad}

    model = scripted(backbone, script)
    distill = SelfDistillation(schedule="authors", distill_until=14, snapshot=Never(), layer_blocks=3)
    keep = Keep()
    fit(model, [pruning(compact_at="never"), distill, keep], tmp_path)
    assert distill.phases["restored_best_step"] == 12
    for name, tensor in keep.at_finish.items():  # the step-12 state, compacted like the student
        assert tensor.numel() <= keep.at[12][name].numel(), name
    # compare on a tensor compaction does not touch (the classifier's output rows)
    torch.testing.assert_close(keep.at_finish["classifier.bias"], keep.at[12]["classifier.bias"])
    assert not torch.equal(keep.at[14]["classifier.bias"], keep.at[12]["classifier.bias"])


class SnapshotSpy(Callback):
    """At every teacher snapshot: the step, whether the masks are hard and all 1 (the student compacted to
    exactly its kept blocks) and the student's widths."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[int, bool, tuple]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        snapshot = pl_module.teacher.snapshot

        def spy(student) -> None:
            masks, shapes = pl_module.structure.masks, pl_module.structure.shapes()
            compacted = masks.is_hard() and all(bool((t == 1).all()) for t in masks.buffers())
            widths = (tuple(shapes.heads), tuple(shapes.neurons), shapes.hidden)
            self.snapshots.append((trainer.global_step, compacted, widths))
            snapshot(student)

        pl_module.teacher.snapshot = spy


def test_authors_schedule_with_mask_decay_before(backbone, tmp_path):
    """`mask_decay="before"` announces an event when its window opens (steps 3, 5, 7 here; hard masks at 4,
    6, 8). The previous window has closed by then, so a snapshot there compacts the student to hard masks;
    inside a window (fractional masks) nothing is compacted, and the final compaction takes the last
    event's hard masks."""
    # validations at 2, 4, 6: the window of event 0 (step 3) sees 0.6 (first: snapshot), event 1's (5) 0.5
    # (worse: none), event 2's (7) 0.7 (better: snapshot, compacting events 0 and 1's masks)
    model = scripted(backbone, {2: 0.6, 4: 0.5, 6: 0.7})
    prune = pruning(compact_at="never", mask_decay="before", decay_alpha=0.5)
    distill = SelfDistillation(schedule="authors", distill_until=14, layer_blocks=3)
    probe, spy = Probe(), SnapshotSpy()
    fit(model, [prune, distill, probe, spy], tmp_path)
    assert [prune.schedule.window(k) for k in range(3)] == [(3, 4), (5, 6), (7, 8)]
    assert [h["reason"] for h in distill.history] == ["start", "event 0", "event 2"]
    assert [(step, compacted) for step, compacted, _ in spy.snapshots] == [(2, True), (3, True), (7, True)]
    assert all(probe.widths[s] == FULL for s in range(7))
    assert probe.widths[7] == spy.snapshots[-1][2] != FULL  # compacted at event 2's window start
    assert all(probe.widths[s] == probe.widths[7] for s in range(7, 14))  # masked, not compacted, in between
    final = prune.history[-1]
    kept = (tuple(final["heads_per_layer"]), tuple(final["neurons_per_layer"]), final["hidden_kept"])
    assert probe.widths[14] == kept
    assert model.structure.masks.is_hard() and not model.teacher.ready


def test_authors_final_compaction_waits_for_the_last_window(backbone, tmp_path):
    """Distillation ending while pruning goes on (distill_epochs=1 of 4-step epochs: step 4, in event 0's
    window): the final compaction waits until the last window has closed, so the student ends compacted to
    the final structure rather than to an intermediate one with masked blocks left over."""
    model = scripted(backbone)
    prune = pruning(compact_at="never")
    distill = SelfDistillation(schedule="authors", distill_epochs=1, snapshot=Never(), final_from="current")
    probe = Probe()
    trainer = quiet_trainer(
        max_steps=STEPS,
        callbacks=[prune, distill, probe],
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
    )
    trainer.fit(model, repeated_batch_loader(4), repeated_batch_loader(1))
    assert distill.phases["final"] == 4 and not model.teacher.ready
    assert all(probe.widths[s] == FULL for s in range(9))  # the last window closes at step 9
    final = prune.history[-1]
    kept = (tuple(final["heads_per_layer"]), tuple(final["neurons_per_layer"]), final["hidden_kept"])
    assert probe.widths[9] == kept
    assert all(bool((t == 1).all()) for t in model.structure.masks.buffers())  # nothing left masked


def test_authors_schedule_needs_pruning_that_does_not_compact(backbone, tmp_path):
    counter = CountSteps()
    model = scripted(backbone)
    with pytest.raises(ValueError, match="compact_at='event'.*set pruning.compact_at: never"):
        fit(model, [pruning(), SelfDistillation(schedule="authors"), counter], tmp_path)
    assert counter.batches == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": "paper"}, "schedule must be one of"),
        ({"post_mu": 0.0}, "post_mu"),
        ({"final_from": "last"}, "final_from"),
        ({"snapshot": "sometimes"}, "snapshot must be"),
        ({"distill_epochs": 2, "distill_until": 0.5}, "not both"),
        ({"layer_sampling": "some"}, "layer_sampling must be one of"),
        ({"layer_mse": "masked"}, "layer_mse must be one of"),
        ({"alive": "any"}, "alive must be one of"),
        ({"mode": "up"}, "mode"),
    ],
)
def test_bad_phase_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfDistillation(**kwargs)


def test_authors_distillation_must_end_after_pruning(backbone, tmp_path):
    model = scripted(backbone)
    distill = SelfDistillation(schedule="authors", distill_until=6)
    with pytest.raises(ValueError, match="not after the pruning phase"):
        fit(model, [pruning(compact_at="never"), distill], tmp_path)


# ---------------------------------------------------------------------------------------------- layer options
def _layer_setup(backbone):
    """A student whose layer 1 lost its heads and whose hidden dims 0-3 are masked; hidden states: teacher
    random, student = teacher (so any loss comes from where they are made to differ)."""
    torch.manual_seed(0)
    model = APTModule(backbone=str(backbone), task="sst2")
    masks = model.structure.install_masks()
    masks.set("head", torch.zeros(4), 1)
    hidden = torch.ones(32)
    hidden[:4] = 0.0
    masks.set("hidden", hidden)
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 32, generator=g) for _ in range(4)]  # embeddings + 3 layers
    student = [t.clone() for t in teacher]
    return model, teacher, student


def test_layer_sampling_all_uses_every_layer(backbone):
    model, teacher, student = _layer_setup(backbone)
    for i in range(1, 4):  # each layer differs by a different amount
        student[i] = student[i] + 0.1 * i
    per_layer = [F.mse_loss(student[i][..., 4:], teacher[i][..., 4:]) for i in range(1, 4)]
    every = Distiller(32, layer_blocks=1, layer_sampling="all").layer_loss(model, student, teacher)
    torch.testing.assert_close(every, sum(per_layer))
    one = Distiller(32, layer_blocks=1).layer_loss(model, student, teacher)  # one block: one layer
    assert any(torch.allclose(one, x) for x in per_layer)


def test_layer_mse_all_counts_masked_dims(backbone):
    model, teacher, student = _layer_setup(backbone)
    for i in range(1, 4):
        student[i][..., :4] = 0.0  # the student's masked dims; the teacher's stay
    kept = Distiller(32, layer_sampling="all").layer_loss(model, student, teacher)
    assert float(kept.detach()) == pytest.approx(0.0, abs=1e-10)  # kept dims agree
    every = Distiller(32, layer_sampling="all", layer_mse="all").layer_loss(model, student, teacher)
    want = sum(teacher[i][..., :4].pow(2).sum() / teacher[i].numel() for i in range(1, 4))
    torch.testing.assert_close(every, want)


def test_alive_both_maps_half_pruned_layers_to_a_neighbour(backbone):
    """Layer 1 has neurons but no heads: alive for "either" (it maps to itself), dead for "both" (the
    nearest layer with both sublayers stands in)."""
    model, teacher, student = _layer_setup(backbone)
    student[2] = student[2] + 1.0  # student layer 1 is off by 1 everywhere
    kwargs = dict(layer_sampling="all", layer_mse="all")
    either = Distiller(32, **kwargs).layer_loss(model, student, teacher)
    torch.testing.assert_close(either, torch.tensor(1.0))
    both = Distiller(32, alive="both", **kwargs).layer_loss(model, student, teacher)
    neighbours = torch.minimum(F.mse_loss(student[1], teacher[2]), F.mse_loss(student[3], teacher[2]))
    torch.testing.assert_close(both, neighbours)
    assert not torch.allclose(both, either)


# ---------------------------------------------------------------------------------------------- resume
def test_authors_schedule_resumes_like_an_uninterrupted_run(backbone, tmp_path):
    """Saved in the post-pruning phase (masked, uncompacted, the best state of step 12 kept) and resumed:
    the final phase restores the same best state, compacts the same way and ends with the same weights."""

    def run(folder, ckpt_path=None, save=()):
        model = scripted(backbone, {10: 0.7, 12: 0.8})
        distill = SelfDistillation(schedule="authors", distill_until=14, snapshot=Never(), layer_blocks=3)
        saver = SaveAt(folder, list(save))
        trainer = quiet_trainer(
            max_steps=STEPS,
            callbacks=[pruning(compact_at="never"), distill, saver],
            default_root_dir=folder,
            limit_val_batches=1,
            val_check_interval=2,
        )
        loaders = repeated_batch_loader(STEPS), repeated_batch_loader(1)
        trainer.fit(model, *loaders, ckpt_path=ckpt_path, weights_only=False)
        return model, distill, saver

    ref, ref_distill, saver = run(tmp_path / "a", save=[13])
    model, distill, _ = run(tmp_path / "b", ckpt_path=saver.paths[13])
    assert distill.phases == ref_distill.phases and distill.phases["restored_best_step"] == 12
    assert distill.history == ref_distill.history and distill.finished
    state, ref_state = model.state_dict(), ref.state_dict()
    assert set(state) == set(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_another_schedule():
    state = SelfDistillation().state_dict()
    with pytest.raises(ValueError, match="schedule='in_pruning', this run configures 'authors'"):
        SelfDistillation(schedule="authors").load_state_dict(state)
