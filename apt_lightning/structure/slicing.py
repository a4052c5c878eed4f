"""Physical removal of rows / columns, recorded as a log of `SliceOp`s.

Every compaction goes through these helpers and returns the operations it applied under full
parameter names, so anything that keeps per-parameter tensors (the teacher snapshot, salience
statistics) can follow the model with `apply_slice_log` instead of re-deriving the indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SliceOp:
    """Keep `index` along dimension `dim` of parameter `param` (a local or a full name)."""

    param: str
    dim: int
    index: torch.Tensor


def _slice_parameter(module: nn.Module, op: SliceOp) -> None:
    old = getattr(module, op.param)
    new = old.data.index_select(op.dim, op.index.to(old.device))  # a copy already
    setattr(module, op.param, nn.Parameter(new, requires_grad=old.requires_grad))


def linear_slice_ops(
    module: nn.Linear, out_index: torch.Tensor | None, in_index: torch.Tensor | None
) -> list[SliceOp]:
    if hasattr(module, "slice_ops"):  # adapters also slice their own factors
        return module.slice_ops(out_index, in_index)
    ops = []
    if out_index is not None:
        ops.append(SliceOp("weight", 0, out_index))
        if module.bias is not None:
            ops.append(SliceOp("bias", 0, out_index))
    if in_index is not None:
        ops.append(SliceOp("weight", 1, in_index))
    return ops


def slice_linear(
    module: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None
) -> list[SliceOp]:
    """Keep the output rows `out_index` and the input columns `in_index` of a Linear (or `APTLinear`)."""
    ops = linear_slice_ops(module, out_index, in_index)
    for op in ops:
        _slice_parameter(module, op)
    module.out_features, module.in_features = module.weight.shape
    return ops


def slice_layernorm(module: nn.LayerNorm, index: torch.Tensor) -> list[SliceOp]:
    ops = [SliceOp(name, 0, index) for name in ("weight", "bias") if getattr(module, name, None) is not None]
    for op in ops:
        _slice_parameter(module, op)
    module.normalized_shape = (len(index),)
    return ops


def slice_embedding(module: nn.Embedding, index: torch.Tensor) -> list[SliceOp]:
    op = SliceOp("weight", 1, index)
    _slice_parameter(module, op)
    module.embedding_dim = len(index)
    return [op]


class SliceLog(list):
    """The ordered list of `SliceOp`s with full parameter names that one compaction applied."""

    def record(self, prefix: str, ops: list[SliceOp]) -> None:
        self.extend(SliceOp(f"{prefix}.{op.param}" if prefix else op.param, op.dim, op.index) for op in ops)

    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Slice the tensors named like the model's parameters the same way (others pass through)."""
        out = dict(tensors)
        for op in self:
            if op.param in out:
                t = out[op.param]
                out[op.param] = t.index_select(op.dim, op.index.to(t.device))
        return out
