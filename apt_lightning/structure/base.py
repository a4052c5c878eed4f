"""The protocol every model family implements, the shapes it reports, and the family registry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from apt_lightning.structure.masks import PruningMasks
from apt_lightning.structure.slicing import SliceLog


@dataclass
class ModelShapes:
    """Prunable widths of an encoder: heads and FFN neurons per layer, the shared hidden size."""

    heads: list[int]
    neurons: list[int]
    hidden: int
    head_dim: int
    full_heads: list[int] = field(default_factory=list)
    full_neurons: list[int] = field(default_factory=list)
    full_hidden: int = 0

    def __post_init__(self) -> None:
        self.full_heads = self.full_heads or list(self.heads)
        self.full_neurons = self.full_neurons or list(self.neurons)
        self.full_hidden = self.full_hidden or self.hidden

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def same_widths(self, other: ModelShapes) -> bool:
        return (self.heads, self.neurons, self.hidden) == (other.heads, other.neurons, other.hidden)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShapes:
        return cls(**d)


def apt_param_count(heads: list[int], neurons: list[int], hidden: int, head_dim: int) -> int:
    """The APT count C = D * sum_l (4 H_l d_h + 2 F_l): the weight matrices of q, k, v, the attention
    output, FFN-in and FFN-out of every encoder layer. Biases, LayerNorms, embeddings and the
    classification head are not counted (docs/method.md section 5)."""
    return hidden * sum(4 * h * head_dim + 2 * f for h, f in zip(heads, neurons, strict=True))


def exact_encoder_param_count(heads: list[int], neurons: list[int], hidden: int, head_dim: int) -> int:
    """Every parameter inside the encoder layers of a compacted BERT-like model: the APT count plus
    biases and the two LayerNorms per layer; a skipped sublayer (0 heads or 0 neurons) has none."""
    total = apt_param_count(heads, neurons, hidden, head_dim)
    for h, f in zip(heads, neurons, strict=True):
        if h:
            total += 3 * h * head_dim + hidden + 2 * hidden  # q/k/v biases, output bias, LayerNorm
        if f:
            total += f + hidden + 2 * hidden  # FFN-in bias, FFN-out bias, LayerNorm
    return total


class PrunableStructure(Protocol):
    """Where a family keeps heads, neurons and hidden dims, and the mechanics to mask and remove them."""

    model: nn.Module
    masks: PruningMasks | None

    def shapes(self) -> ModelShapes: ...

    def install_masks(self) -> PruningMasks: ...

    def remove_masks(self) -> None: ...

    def compact(self) -> SliceLog: ...

    def reshape(self, shapes: ModelShapes) -> None: ...

    def head_output_weight(self, layer: int) -> torch.Tensor | None: ...

    def ffn_output_weight(self, layer: int) -> torch.Tensor | None: ...

    def hidden_input_weights(self) -> list[tuple[int, torch.Tensor]]: ...


_FAMILIES: dict[str, type] = {}


def register_family(*model_types: str):
    """Class decorator: make a structure class handle the given `config.model_type`s."""

    def deco(cls: type) -> type:
        for t in model_types:
            _FAMILIES[t] = cls
        return cls

    return deco


def get_structure(model: nn.Module) -> PrunableStructure:
    """The family object for `model`, created once and cached on the model."""
    cached = getattr(model, "_apt_structure", None)
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model type {model_type!r} has no prunable-structure family; supported: {sorted(_FAMILIES)}. "
            "Add one by implementing PrunableStructure and decorating it with @register_family."
        )
    structure = _FAMILIES[model_type](model)
    object.__setattr__(model, "_apt_structure", structure)
    return structure
