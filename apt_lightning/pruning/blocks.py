"""Per-block quantities (scores, keep decisions) for heads, neurons and hidden dims, and their costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apt_lightning.structure import ModelShapes


@dataclass
class BlockTensors:
    """One tensor per layer for heads and for neurons, one for hidden dims."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    hidden: torch.Tensor

    def map(self, fn) -> BlockTensors:
        return BlockTensors([fn(t) for t in self.heads], [fn(t) for t in self.neurons], fn(self.hidden))

    def flat(self) -> torch.Tensor:
        return torch.cat([*self.heads, *self.neurons, self.hidden])

    def counts(self) -> tuple[list[int], list[int], int]:
        """For 0/1 keep tensors: kept heads and neurons per layer and kept hidden dims."""
        return (
            [int(t.sum()) for t in self.heads],
            [int(t.sum()) for t in self.neurons],
            int(self.hidden.sum()),
        )

    @classmethod
    def full(cls, shapes: ModelShapes, value: float = 1.0) -> BlockTensors:
        return cls(
            [torch.full((h,), value) for h in shapes.heads],
            [torch.full((f,), value) for f in shapes.neurons],
            torch.full((shapes.hidden,), value),
        )


def block_costs(shapes: ModelShapes) -> BlockTensors:
    """Parameters each block carries in the APT count (docs/method.md section 5): a head 4 D d_h, a
    neuron 2 D, a hidden dim sum_l (4 H_l d_h + 2 F_l), at the current widths."""
    d, dh = shapes.hidden, shapes.head_dim
    per_hidden = sum(4 * h * dh + 2 * f for h, f in zip(shapes.heads, shapes.neurons, strict=True))
    return BlockTensors(
        [torch.full((h,), float(4 * d * dh)) for h in shapes.heads],
        [torch.full((f,), float(2 * d)) for f in shapes.neurons],
        torch.full((d,), float(per_hidden)),
    )
