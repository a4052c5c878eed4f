"""Self-distillation (issue 6): the teacher view on shared weights, the losses, the layer mapping,
compaction, the callback, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_apt import CountSteps, make_module, quiet_trainer, repeated_batch_loader, synthetic_batch
from lightning import Callback

from apt_lightning import APTModule
from apt_lightning.callbacks import (
    AdaptivePruning,
    AdaptiveTuning,
    EveryEvent,
    OnImprovement,
    SelfDistillation,
)
from apt_lightning.distill import (
    Distiller,
    HiddenTransform,
    TeacherView,
    nearest_alive,
    prediction_loss,
    sample_teacher_layers,
)
from apt_lightning.module import norm_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def perturb_trainable(model: APTModule, seed: int = 0, scale: float = 0.05) -> None:
    """Make adapters and head differ from their init (B = 0 would make the adapters invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.student.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def student_logits(model: APTModule, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.student(**inputs_of(batch)).logits


# ---------------------------------------------------------------------------------------------- teacher view
def test_teacher_matches_student_right_after_snapshot(backbone):
    model = make_module(backbone).eval()
    perturb_trainable(model)
    batch = synthetic_batch()
    teacher = TeacherView()
    assert not teacher.ready
    with pytest.raises(RuntimeError, match="no snapshot"):
        teacher(model.student, inputs_of(batch))
    teacher.snapshot(model.student)
    assert teacher.ready and teacher.snapshots == 1
    snap = student_logits(model, batch)
    torch.testing.assert_close(teacher(model.student, inputs_of(batch)).logits, snap)
    # the student moves on, the teacher stays at the snapshot
    perturb_trainable(model, seed=1)
    assert not torch.allclose(student_logits(model, batch), snap, atol=1e-4)
    torch.testing.assert_close(teacher(model.student, inputs_of(batch)).logits, snap)
    # the teacher runs in eval mode and leaves the student's mode as it was
    model.student.train()
    teacher(model.student, inputs_of(batch))
    assert model.student.training and all(m.training for m in model.student.modules())


def test_teacher_ignores_pruning_masks(backbone):
    model = make_module(backbone).eval()
    perturb_trainable(model)
    batch = synthetic_batch()
    teacher = TeacherView()
    teacher.snapshot(model.student)
    full = teacher(model.student, inputs_of(batch)).logits
    masks = model.structure.install_masks()
    masks.set("head", torch.tensor([1.0, 0.0, 0.5, 1.0]), 0)
    hidden = torch.ones(32)
    hidden[:4] = 0.0
    masks.set("hidden", hidden)
    assert not torch.allclose(student_logits(model, batch), full, atol=1e-4)  # the student is masked
    torch.testing.assert_close(teacher(model.student, inputs_of(batch)).logits, full)
    assert masks.enabled  # switched back on after the teacher forward


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def observe(self, kind: str, index: int, tensor: torch.Tensor) -> None:
        self.seen.append((kind, index))


def test_teacher_tensors_get_no_gradient(backbone):
    model = make_module(backbone)
    perturb_trainable(model)
    batch = synthetic_batch()
    teacher = TeacherView()
    teacher.snapshot(model.student)
    masks = model.structure.install_masks()
    masks.observer = recorder = RecordingObserver()  # as while AdaptivePruning collects salience
    t_out = teacher(model.student, inputs_of(batch), output_hidden_states=True)
    assert recorder.seen == []  # a teacher forward runs without autograd: it never feeds the scorer
    assert not t_out.logits.requires_grad and not any(h.requires_grad for h in t_out.hidden_states)
    out = model.student(**inputs_of(batch), output_hidden_states=True)
    assert recorder.seen  # (the student's forward does)
    masks.observer = None
    loss = F.cross_entropy(out.logits, batch["labels"]) + prediction_loss(out.logits + 0.1, t_out.logits, 4.0)
    loss.backward()
    assert all(not t.requires_grad and t.grad is None for t in teacher.tensors.values())
    trainable = [p for p in model.student.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # the student did get gradients


def test_frozen_tensors_are_shared_not_copied(backbone):
    model = make_module(backbone).eval()
    perturb_trainable(model)
    student = model.student
    params = dict(student.named_parameters())
    frozen_ptrs = {n: p.data_ptr() for n, p in params.items() if not p.requires_grad}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert frozen_ptrs and trainable
    teacher = TeacherView()
    teacher.snapshot(student)
    assert set(teacher.tensors) == trainable  # only trainable names: no frozen tensor is duplicated
    assert sum(t.numel() for t in teacher.tensors.values()) == sum(params[n].numel() for n in trainable)
    for name, t in teacher.tensors.items():  # the snapshot is a copy
        assert t.data_ptr() != params[name].data_ptr()
        torch.testing.assert_close(t, params[name].detach())
    batch = synthetic_batch()
    before = teacher(student, inputs_of(batch)).logits
    assert {n: p.data_ptr() for n, p in student.named_parameters() if not p.requires_grad} == frozen_ptrs
    # the teacher reads the student's frozen storage: change it in place and the teacher moves
    with torch.no_grad():
        student.bert.embeddings.word_embeddings.weight.mul_(2.0)
    assert not torch.allclose(teacher(student, inputs_of(batch)).logits, before, atol=1e-4)


# ---------------------------------------------------------------------------------------------- losses
def test_identity_transform_and_equal_models_give_zero_layer_loss(backbone):
    model = make_module(backbone).eval()
    perturb_trainable(model)
    transform = HiddenTransform(32, rank=4)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(transform(x), x)
    assert not transform.proj.weight.requires_grad
    assert transform.proj.lora_A.requires_grad and transform.proj.lora_B.requires_grad
    model.teacher = TeacherView()
    model.teacher.snapshot(model.student)
    distiller = Distiller(32, tau=4.0, pred_weight=1.0, layer_weight=0.9, layer_blocks=3)
    batch = synthetic_batch()
    out = model.student(**inputs_of(batch), output_hidden_states=True)
    parts = distiller.loss(model, inputs_of(batch), out)
    assert float(parts["layer_loss"]) == pytest.approx(0.0, abs=1e-10)
    assert float(parts["pred_loss"]) == pytest.approx(0.0, abs=1e-10)
    assert float(parts["distill"]) == pytest.approx(0.0, abs=1e-10)
    perturb_trainable(model, seed=3)  # now they differ
    out = model.student(**inputs_of(batch), output_hidden_states=True)
    parts = distiller.loss(model, inputs_of(batch), out)
    assert float(parts["layer_loss"]) > 1e-6 and float(parts["pred_loss"]) > 1e-8
    torch.testing.assert_close(parts["distill"], parts["pred_loss"] + 0.9 * parts["layer_loss"])


def test_prediction_loss_is_tau_scaled_kl():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    tau = 2.0
    p_t = F.softmax(t / tau, -1)
    want = (p_t * (p_t.log() - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    torch.testing.assert_close(prediction_loss(s, t, tau), want)
    assert float(prediction_loss(t, t, tau)) == pytest.approx(0.0, abs=1e-7)


def test_nearest_alive():
    alive = [True, False, False, True, True]
    assert nearest_alive(0, alive) == [0]
    assert nearest_alive(1, alive) == [0]
    assert nearest_alive(2, alive) == [3]
    assert nearest_alive(4, alive) == [4]
    assert sorted(nearest_alive(1, [True, False, True])) == [0, 2]  # equally near: both candidates
    assert nearest_alive(1, [False, False, False]) == []


def test_sample_teacher_layers_one_per_block():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        layers = sample_teacher_layers(12, 4, g)
        assert len(layers) == 4 and [i // 3 for i in layers] == [0, 1, 2, 3]
    assert sorted(sample_teacher_layers(3, 4, g)) == [0, 1, 2]


def layer_loss_with_masks(model: APTModule, dead: str):
    """L_layer where layer 1 is pruned (`dead` = "both": heads and neurons) or half pruned ("heads")."""
    masks = model.structure.install_masks()
    masks.set("head", torch.zeros(4), 1)
    if dead == "both":
        masks.set("neuron", torch.zeros(48), 1)
    g = torch.Generator().manual_seed(0)
    teacher_hidden = [torch.randn(2, 5, 32, generator=g) for _ in range(4)]  # embeddings + 3 layers
    student_hidden = [h.clone() for h in teacher_hidden]
    if dead == "both":
        student_hidden[2] = torch.full_like(student_hidden[2], float("nan"))  # must never be read
    distiller = Distiller(32, layer_blocks=3)  # one block per layer: every layer is sampled
    return distiller.layer_loss(model, student_hidden, teacher_hidden), teacher_hidden


def test_layer_mapping_skips_pruned_layers(backbone):
    model = make_module(backbone)
    loss, t = layer_loss_with_masks(model, dead="both")
    # teacher layer 1 maps to student layers 0 and 2 (equally near), keeping the lower MSE
    want = torch.minimum(F.mse_loss(t[1], t[2]), F.mse_loss(t[3], t[2]))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want)
    model = make_module(backbone)
    loss, _ = layer_loss_with_masks(model, dead="heads")  # neurons left: the layer is alive, maps to itself
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("train_norms", [False, True])
def test_compaction_keeps_teacher_and_student_consistent(backbone, train_norms):
    model = make_module(backbone, train_norms=train_norms).eval()
    perturb_trainable(model)
    masks = model.structure.install_masks()
    model.teacher, model.distiller = TeacherView(), Distiller(32)
    model.teacher.snapshot(model.student)
    masks.set("head", torch.tensor([1.0, 0.0, 1.0, 1.0]), 0)
    masks.set("head", torch.zeros(4), 1)  # layer 1 loses its attention block (and its q/v adapters)
    neurons = torch.ones(48)
    neurons[::3] = 0.0
    masks.set("neuron", neurons, 2)
    hidden = torch.ones(32)
    hidden[[3, 17, 30]] = 0.0
    masks.set("hidden", hidden)
    batch = synthetic_batch()
    masked = student_logits(model, batch)
    model.compact()
    params = dict(model.student.named_parameters())
    assert model.structure.shapes().hidden == 29 and model.structure.shapes().heads == [3, 0, 4]
    assert set(model.teacher.tensors) == {n for n, p in params.items() if p.requires_grad}
    assert not any(".layer.1.attention." in n for n in model.teacher.tensors)  # removed with the module
    assert any(".LayerNorm." in n for n in model.teacher.tensors) == train_norms  # trained norms are sliced
    for name, t in model.teacher.tensors.items():  # sliced exactly like the student
        assert t.shape == params[name].shape, name
        torch.testing.assert_close(t, params[name].detach(), msg=name)
    assert model.distiller.transform.proj.in_features == model.distiller.transform.proj.out_features == 29
    torch.testing.assert_close(student_logits(model, batch), masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.teacher(model.student, inputs_of(batch)).logits, masked, rtol=1e-5, atol=1e-5
    )
    if train_norms:  # the teacher keeps its own copy of trained norms: the student's later steps miss it
        with torch.no_grad():
            for norm in norm_modules(model.student):
                norm.weight.mul_(1.5)
        assert not torch.allclose(student_logits(model, batch), masked, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(
            model.teacher(model.student, inputs_of(batch)).logits, masked, rtol=1e-5, atol=1e-5
        )


class MuProbe(Callback):
    def __init__(self) -> None:
        self.mu: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mu.append(pl_module.distill_weight)


class TeacherAt(Callback):
    """At the start of optimizer step `step` (put it before SelfDistillation, which drops the teacher when
    distillation ends): the teacher's tensors, the student's parameters and a teacher forward."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.teacher: dict = {}
        self.params: dict = {}
        self.logits = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.teacher = {n: t.shape for n, t in pl_module.teacher.tensors.items()}
            self.params = {n: p.shape for n, p in pl_module.student.named_parameters()}
            self.logits = pl_module.teacher(pl_module.student, inputs_of(synthetic_batch())).logits


@pytest.mark.parametrize("mu_max", [1.0, 0.5])
def test_distillation_through_pruning_run(backbone, tmp_path, mu_max):
    model = make_module(backbone)
    pruning = AdaptivePruning(
        target_sparsity=0.5, start_step=2, end_step=8, num_events=3, decay_steps=1, plot=False
    )
    distill = SelfDistillation(snapshot=EveryEvent(), layer_blocks=3, mu_max=mu_max)
    tuning = AdaptiveTuning(budget_multiple=2.0)
    probe, teacher_at = MuProbe(), TeacherAt(8)
    trainer = quiet_trainer(
        max_steps=12, callbacks=[pruning, tuning, teacher_at, distill, probe], default_root_dir=tmp_path
    )
    trainer.fit(model, train_dataloaders=repeated_batch_loader(12))
    assert [h["reason"] for h in distill.history] == ["start", "event 0", "event 1", "event 2"]
    assert model.teacher.snapshots == 4
    # mu ramps over the pruning phase (steps 2-8) up to mu_max, and distillation ends with the ramp
    assert probe.mu[:2] == [0.0, 0.0] and max(probe.mu) <= mu_max and probe.mu[7] > 0.5 * mu_max
    assert probe.mu[8:] == [0.0] * 4
    assert not model.teacher.ready  # dropped when distillation ended
    shapes = model.structure.shapes()
    assert sum(shapes.heads) + sum(shapes.neurons) < 3 * 4 + 3 * 48  # it did prune and compact
    # the teacher followed the compaction that opened the last event: same shapes, up to grown ranks
    assert teacher_at.teacher and teacher_at.logits.shape == (8, 2)
    for name, t in teacher_at.teacher.items():
        p = teacher_at.params[name]
        if name.endswith("lora_A"):
            assert t[1:] == p[1:] and t[0] <= p[0], name
        elif name.endswith("lora_B"):
            assert t[0] == p[0] and t[1] <= p[1], name
        else:
            assert t == p, name
    assert model.distiller.transform.proj.in_features == shapes.hidden


# ---------------------------------------------------------------------------------------------- the callback
def test_mu_ramp_and_snapshot_policies():
    cb = SelfDistillation()
    cb.start, cb.end = 2, 6
    assert [cb.mu_at(s) for s in (0, 2, 4, 6, 10)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cb.finished = True
    assert cb.mu_at(4) == 0.0
    capped = SelfDistillation(mu_max=0.5)
    capped.start, capped.end = 2, 6
    assert [capped.mu_at(s) for s in (0, 4, 6, 10)] == [0.0, 0.25, 0.5, 0.5]  # the task loss keeps half
    state = capped.state_dict()
    assert state["mu_max"] == 0.5
    with pytest.warns(UserWarning, match="trained with mu_max=0.5, this run uses mu_max=1.0"):
        SelfDistillation().load_state_dict(state)
    del state["mu_max"]  # a checkpoint from before mu_max ramped to 1
    with pytest.warns(UserWarning, match="trained with mu_max=1.0"):
        capped.load_state_dict(state)
    assert EveryEvent().should_snapshot(None, None)
    policy = OnImprovement(monitor="val/accuracy", mode="max")
    metrics: dict = {}
    trainer = SimpleNamespace(callback_metrics=metrics)
    assert policy.should_snapshot(trainer, None)  # no validation yet, no snapshot yet: take the first
    seq = []
    for value in (0.5, 0.4, 0.6, 0.6):
        metrics["val/accuracy"] = torch.tensor(value)
        seq.append(policy.should_snapshot(trainer, None))
    assert seq == [True, False, True, False]
    low = OnImprovement(monitor="val/loss", mode="min")
    seq = []
    for value in (1.0, 1.2, 0.8):
        metrics["val/loss"] = torch.tensor(value)
        seq.append(low.should_snapshot(trainer, None))
    assert seq == [True, False, True]
    restored = OnImprovement()
    restored.load_state_dict(policy.state_dict())
    assert restored.best == pytest.approx(0.6)
    with pytest.raises(ValueError, match="mode"):
        OnImprovement(mode="up")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"pred_weight": 1.5}, "pred_weight"),
        ({"layer_weight": -0.1}, "layer_weight"),
        ({"final_lr_scale": 0.0}, "final_lr_scale"),
        ({"distill_epochs": 0}, "distill_epochs"),
        ({"mu_max": 0.0}, r"mu_max must be in \(0, 1\], got 0.0"),
        ({"mu_max": 1.5}, "mu_max"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfDistillation(**kwargs)


@pytest.mark.parametrize(
    "case,match",
    [
        ("full_ft", "no teacher source.*adapters: null"),
        ("no_schedule", "no teacher source.*start_step/end_step"),
        ("reversed", "must come before"),
    ],
)
def test_no_teacher_source_fails_before_training(backbone, tmp_path, case, match):
    model = make_module(backbone, adapters=None) if case == "full_ft" else make_module(backbone)
    callbacks = {
        "full_ft": [SelfDistillation(start_step=1, end_step=4)],
        "no_schedule": [SelfDistillation()],
        "reversed": [SelfDistillation(start_step=5, end_step=2)],
    }[case]
    counter = CountSteps()
    trainer = quiet_trainer(max_steps=8, callbacks=[*callbacks, counter], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train_dataloaders=repeated_batch_loader(8))
    assert counter.batches == 0 and trainer.global_step == 0


def test_on_improvement_rejects_a_metric_validation_never_logs():
    class FakeTrainer:
        callback_metrics = {"val/matthews": torch.tensor(0.3), "val/loss": torch.tensor(1.0)}

    policy = OnImprovement(monitor="val/accuracy")
    with pytest.raises(
        ValueError, match=r"'val/accuracy', which validation does not log; logged: \['val/loss'"
    ):
        policy.should_snapshot(FakeTrainer(), None)
    assert OnImprovement(monitor="val/matthews").should_snapshot(FakeTrainer(), None)
