"""Self-distillation losses (docs/method.md section 7).

L_distill = w_pred * L_pred + w_layer * L_layer, with
- L_pred: tau^2 * KL(softmax(t / tau) || softmax(s / tau)) (MSE for regression); for a causal LM the KL is
  over the vocabulary at each position that predicts a response token, averaged over those positions
  (`causal_lm_prediction_loss` on the logits rows `apt_lightning.causal_lm.logits_at` computes: prompt and
  padding positions take no part and get no logits);
- L_layer: sum over sampled teacher layers i of MSE(Tr(H_s^{phi(i)}), H_t^i); phi(i) = i if student layer
  i is alive, else the nearest alive layer (the one with the lower MSE when two are equally near); Tr is a
  hidden x hidden map initialised to the identity, frozen, plus a trainable LoRA adapter.

Three details of L_layer are options, each with the authors' code's behaviour available (docs/method.md
section 7): which teacher layers (`layer_sampling`: "blocks", one drawn per block of consecutive layers each
step, or "all"), over which hidden dims the MSE averages (`layer_mse`: "kept", the student's kept dims, or
"all" dims of the teacher), and which student layers are alive (`alive`: "either" sublayer left, or "both").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apt_lightning.adapters import APTLinear
from apt_lightning.structure.slicing import slice_linear


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits, teacher_logits)
    log_p = F.log_softmax(student_logits / tau, -1)
    log_q = F.log_softmax(teacher_logits / tau, -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * tau**2


def causal_lm_prediction_loss(
    student_rows: torch.Tensor, teacher_rows: torch.Tensor, tau: float
) -> torch.Tensor:
    """L_pred of a causal LM: tau^2 * KL(softmax(t / tau) || softmax(s / tau)) over the vocabulary, in fp32,
    averaged over the rows: the logits (n, vocab) at the n positions that predict a response token
    (`apt_lightning.causal_lm.logits_at` / `next_token_targets`); 0 when the batch has none."""
    if student_rows.shape != teacher_rows.shape or student_rows.dim() != 2:
        raise ValueError(
            f"student and teacher logits rows must both be (n, vocab), got {tuple(student_rows.shape)} and "
            f"{tuple(teacher_rows.shape)}"
        )
    if not student_rows.shape[0]:
        return student_rows.sum() * 0.0
    return prediction_loss(student_rows.float(), teacher_rows.float(), tau)


def sample_teacher_layers(
    num_layers: int, blocks: int, generator: torch.Generator | None = None
) -> list[int]:
    """One layer index drawn uniformly from each of `blocks` consecutive blocks of layers."""
    bounds = torch.linspace(0, num_layers, min(blocks, num_layers) + 1).round().long().tolist()
    return [
        int(torch.randint(lo, hi, (1,), generator=generator))
        for lo, hi in zip(bounds, bounds[1:], strict=False)
        if hi > lo
    ]


LAYER_SAMPLING = ("blocks", "all")
LAYER_MSE = ("kept", "all")
ALIVE = ("either", "both")


def check_layer_options(layer_sampling: str, layer_mse: str, alive: str) -> None:
    for name, value, allowed in (
        ("layer_sampling", layer_sampling, LAYER_SAMPLING),
        ("layer_mse", layer_mse, LAYER_MSE),
        ("alive", alive, ALIVE),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def alive_layers(masks, num_layers: int, alive: str = "either") -> list[bool]:
    """Student layers a teacher layer may map to: "either" (a layer with heads or neurons left) or "both"
    (heads and neurons left, the authors' code); every layer without masks."""
    if masks is None:
        return [True] * num_layers
    if alive == "both":
        return [not (masks.head_zero[i] or masks.neuron_zero[i]) for i in range(num_layers)]
    return [not (masks.head_zero[i] and masks.neuron_zero[i]) for i in range(num_layers)]


def nearest_alive(layer: int, alive: list[bool]) -> list[int]:
    """phi candidates for teacher layer `layer`: itself if alive, else the nearest alive layers."""
    if alive[layer]:
        return [layer]
    for d in range(1, len(alive)):
        found = [j for j in (layer - d, layer + d) if 0 <= j < len(alive) and alive[j]]
        if found:
            return found
    return []


class HiddenTransform(nn.Module):
    """Tr: identity-initialised hidden x hidden map with a trainable rank-r adapter."""

    def __init__(self, hidden: int, rank: int = 8) -> None:
        super().__init__()
        base = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.eye(hidden))
        self.proj = APTLinear.from_linear(base, rank=rank, alpha=2.0 * rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Distiller(nn.Module):
    """Computes L_distill for `APTModule.training_step` from the student's output and a teacher forward."""

    def __init__(
        self,
        hidden: int,
        tau: float = 4.0,
        pred_weight: float = 1.0,
        layer_weight: float = 0.9,
        layer_blocks: int = 4,
        transform_rank: int = 8,
        seed: int = 0,
        layer_sampling: str = "blocks",
        layer_mse: str = "kept",
        alive: str = "either",
    ) -> None:
        super().__init__()
        check_layer_options(layer_sampling, layer_mse, alive)
        self.tau, self.pred_weight, self.layer_weight, self.layer_blocks = (
            tau,
            pred_weight,
            layer_weight,
            layer_blocks,
        )
        self.layer_sampling, self.layer_mse, self.alive = layer_sampling, layer_mse, alive
        self.transform = HiddenTransform(hidden, transform_rank)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def needs_hidden(self) -> bool:
        return self.layer_weight > 0

    def follow_hidden(self, kept: torch.Tensor) -> None:
        slice_linear(self.transform.proj, out_index=kept, in_index=kept)

    def resize_hidden(self, hidden: int) -> None:
        if self.transform.proj.in_features != hidden:
            self.follow_hidden(torch.arange(hidden))

    def loss(
        self, pl_module, inputs: dict, student_out, response_rows: bool = False
    ) -> dict[str, torch.Tensor]:
        """`response_rows`: the logits are a causal LM's rows at its response positions, (n, vocab), and the
        teacher forward runs in the same `apt_lightning.causal_lm.logits_at` block, so its logits are the
        same rows; L_pred is then `causal_lm_prediction_loss`. False: classification / regression logits."""
        teacher_out = pl_module.teacher(pl_module.student, inputs, output_hidden_states=self.needs_hidden)
        student, teacher = student_out.logits, teacher_out.logits
        if response_rows:
            pred = causal_lm_prediction_loss(student, teacher, self.tau)
        else:
            pred = prediction_loss(student, teacher, self.tau)
        parts = {"pred_loss": pred}
        total = self.pred_weight * parts["pred_loss"]
        if self.needs_hidden:
            parts["layer_loss"] = self.layer_loss(
                pl_module, student_out.hidden_states, teacher_out.hidden_states
            )
            total = total + self.layer_weight * parts["layer_loss"]
        parts["distill"] = total
        return parts

    def layer_loss(self, pl_module, student_hidden, teacher_hidden) -> torch.Tensor:
        """hidden_states[i + 1] is the output of layer i."""
        n = len(student_hidden) - 1
        masks = getattr(pl_module.student, "apt_masks", None)
        alive = alive_layers(masks, n, self.alive)
        kept_only = self.layer_mse == "kept" and masks is not None and not masks.hidden_full
        weight = masks.hidden if kept_only else None
        layers = (
            list(range(n))
            if self.layer_sampling == "all"
            else sample_teacher_layers(n, self.layer_blocks, self.generator)
        )
        total = student_hidden[-1].new_zeros(())
        for i in layers:
            target = teacher_hidden[i + 1]
            losses = [
                self._mse(self.transform(student_hidden[j + 1]), target, weight)
                for j in nearest_alive(i, alive)
            ]
            if losses:
                total = total + torch.stack(losses).min()
        return total

    @staticmethod
    def _mse(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        diff = (x - y).pow(2)
        if weight is None:
            return diff.mean()
        return (diff * weight).sum() / (weight.sum() * diff[..., 0].numel())
