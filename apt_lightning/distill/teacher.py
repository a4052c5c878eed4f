"""The teacher view: the student's frozen backbone plus a frozen snapshot of its trainable tensors.

No second model exists: the teacher forward is `torch.func.functional_call` on the student with the
snapshot tensors substituted for the trainable ones (adapters, head, trained norms), so every frozen weight is
the same storage.
It runs without gradients, in eval mode, with pruning masks off (full width at the current physical
shape, docs/method.md section 7). Compaction slice logs keep the snapshot's shapes in step. The teacher is
as wide as the student's frozen weights: keeping it wider than the pruned student (the authors' schedule)
means not compacting the student (`SelfDistillation(schedule="authors")`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from apt_lightning.structure import SliceLog


class TeacherView:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.snapshots = 0

    @property
    def ready(self) -> bool:
        return bool(self.tensors)

    @torch.no_grad()
    def snapshot(self, student: nn.Module) -> None:
        """Copy the trainable tensors (adapters, head, trained norms); frozen ones stay shared."""
        self.tensors = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        self.snapshots += 1

    def clear(self) -> None:
        """Drop the snapshot (distillation is over): its memory is freed, `ready` turns False."""
        self.tensors = {}

    def follow(self, log: SliceLog, student: nn.Module) -> None:
        """Apply a compaction to the snapshot; tensors of removed modules are dropped."""
        names = {n for n, _ in student.named_parameters()}
        self.tensors = {n: t for n, t in log.apply(self.tensors).items() if n in names}

    @torch.no_grad()
    def __call__(self, student: nn.Module, inputs: dict, output_hidden_states: bool = False):
        if not self.ready:
            raise RuntimeError("the teacher has no snapshot yet")
        device = next(student.parameters()).device
        if any(t.device != device for t in self.tensors.values()):  # e.g. restored from a CPU checkpoint
            self.tensors = {n: t.to(device) for n, t in self.tensors.items()}
        was_training = student.training
        masks = getattr(student, "apt_masks", None)
        student.eval()
        if masks is not None:
            masks.enabled = False
        try:
            return functional_call(
                student,
                self.tensors,
                args=(),
                kwargs={**inputs, "output_hidden_states": output_hidden_states},
                strict=False,
            )
        finally:
            if masks is not None:
                masks.enabled = True
            student.train(was_training)

    def state_dict(self) -> dict:
        return {"tensors": self.tensors, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.tensors = dict(state["tensors"])
        self.snapshots = state["snapshots"]
