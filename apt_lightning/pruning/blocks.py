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

    def combine(self, other: BlockTensors, fn) -> BlockTensors:
        """`fn(mine, other's)` tensor by tensor."""
        return BlockTensors(
            [fn(a, b) for a, b in zip(self.heads, other.heads, strict=True)],
            [fn(a, b) for a, b in zip(self.neurons, other.neurons, strict=True)],
            fn(self.hidden, other.hidden),
        )

    @classmethod
    def from_masks(cls, masks) -> BlockTensors:
        """A model's masks (`PruningMasks`) on the CPU, one device read: copies, never views of buffers."""
        return cls(
            [masks.head(i).to("cpu", copy=True) for i in range(masks.num_layers)],
            [masks.neuron(i).to("cpu", copy=True) for i in range(masks.num_layers)],
            masks.hidden.to("cpu", copy=True),
        )

    def to_masks(self, masks, hidden: bool = True) -> None:
        """Set a model's masks (`PruningMasks`) to these values, the hidden one unless `hidden` is False."""
        for i in range(masks.num_layers):
            masks.set("head", self.heads[i], i)
            masks.set("neuron", self.neurons[i], i)
        if hidden:
            masks.set("hidden", self.hidden)

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
    """Parameters each block carries in the APT count (docs/method.md section 5), from the family's unit
    costs at the current widths: a query head its own cost plus its share of its key/value head's, a neuron
    its cost, a hidden dim the whole count divided by D. The search's exact count (`kept_param_count`)
    charges a key/value head once, with the first query head of its group that is kept."""
    d, c = shapes.hidden, shapes.costs
    heads = []
    for layer, h in enumerate(shapes.heads):
        groups = shapes.head_groups(layer)
        size = torch.tensor([float(groups.count(g)) for g in groups]) if h else torch.zeros(0)
        heads.append(d * (c.head + c.kv_head / size.clamp_min(1.0)))
    return BlockTensors(
        heads,
        [torch.full((f,), float(d * c.neuron)) for f in shapes.neurons],
        torch.full((d,), float(shapes.counted_params() // max(d, 1))),
    )


def kept_param_count(keep: BlockTensors, shapes: ModelShapes) -> int:
    """The APT count of a 0/1 keep decision on a model of `shapes`: a key/value head counts while any query
    head of its group is kept."""
    c = shapes.costs
    per_dim = 0
    for layer, (h, f) in enumerate(zip(keep.heads, keep.neurons, strict=True)):
        kept = torch.nonzero(h > 0).flatten().tolist()
        groups = shapes.head_groups(layer)
        per_dim += c.head * len(kept) + c.kv_head * len({groups[i] for i in kept}) + c.neuron * int(f.sum())
    return int(keep.hidden.sum()) * per_dim


def kept_kv_groups(keep: BlockTensors, shapes: ModelShapes) -> list[list[int]]:
    """Query heads a keep decision keeps in each key/value group of each layer ([] without GQA)."""
    if not shapes.kv_groups:
        return []
    out = []
    for layer, h in enumerate(keep.heads):
        groups = shapes.head_groups(layer)
        counts = [0] * len(shapes.kv_groups[layer])
        for i in torch.nonzero(h > 0).flatten().tolist():
            counts[groups[i]] += 1
        out.append(counts)
    return out
