"""The protocol every model family implements, the shapes and parameter costs it reports, the registry.

A family (one module under `structure/families/`) owns everything architecture-specific: where heads,
neurons and hidden dims live, their exact parameter costs, the masked norm, where hidden masks sit,
compaction, default adapter targets, task-head names and benchmark presets. Everything else in the
project (search, scorers, callbacks, export, bench) sees only `ModelShapes` with their `UnitCosts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from apt_lightning.structure.masks import PruningMasks
from apt_lightning.structure.slicing import SliceLog


@dataclass(frozen=True)
class UnitCosts:
    """Counted weights per block per kept hidden dimension (the APT count is linear in D).

    `head`: one query head (BERT: q, k, v, o rows/columns = 4 d_h; GQA decoders: q and o = 2 d_h);
    `kv_head`: one key/value head, counted while any query head of its group is kept (GQA: k and v =
    2 d_h; 0 where every head has its own k/v, already in `head`); `neuron`: one FFN neuron (GELU FFN 2,
    SwiGLU 3)."""

    head: int
    kv_head: int
    neuron: int


@dataclass
class ModelShapes:
    """Prunable widths: query heads and FFN neurons per layer, the shared hidden size, and for grouped-query
    attention the query heads kept in each key/value group of each layer (`kv_groups`; empty when every
    head has its own k/v). `full_*` are the widths before any pruning."""

    heads: list[int]
    neurons: list[int]
    hidden: int
    head_dim: int
    costs: UnitCosts
    kv_groups: list[list[int]] = field(default_factory=list)
    full_heads: list[int] = field(default_factory=list)
    full_neurons: list[int] = field(default_factory=list)
    full_hidden: int = 0
    full_kv_groups: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.costs, dict):
            self.costs = UnitCosts(**self.costs)
        self.full_heads = self.full_heads or list(self.heads)
        self.full_neurons = self.full_neurons or list(self.neurons)
        self.full_hidden = self.full_hidden or self.hidden
        self.full_kv_groups = self.full_kv_groups or [list(g) for g in self.kv_groups]
        if self.kv_groups and [sum(g) for g in self.kv_groups] != self.heads:
            raise ValueError(f"kv_groups {self.kv_groups} do not add up to the heads per layer {self.heads}")

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def kv_heads(self) -> list[int]:
        """Key/value heads alive per layer (those with a query head left); the query heads without GQA."""
        if not self.kv_groups:
            return list(self.heads)
        return [sum(1 for n in groups if n) for groups in self.kv_groups]

    def head_groups(self, layer: int) -> list[int]:
        """The key/value group of each query head of `layer`, in order (without GQA, each head its own)."""
        if not self.kv_groups:
            return list(range(self.heads[layer]))
        return [g for g, n in enumerate(self.kv_groups[layer]) for _ in range(n)]

    def counted_params(self) -> int:
        """The APT count at these widths: D * sum_l (head H_l + kv_head G_l + neuron F_l), the weight
        matrices of attention and FFN (biases, norms, embeddings and the task head are not counted)."""
        c = self.costs
        per_dim = sum(
            c.head * h + c.kv_head * g + c.neuron * f
            for h, g, f in zip(self.heads, self.kv_heads(), self.neurons, strict=True)
        )
        return self.hidden * per_dim

    def full(self) -> ModelShapes:
        """The unpruned shapes."""
        return ModelShapes(
            list(self.full_heads),
            list(self.full_neurons),
            self.full_hidden,
            self.head_dim,
            self.costs,
            [list(g) for g in self.full_kv_groups],
        )

    def same_widths(self, other: ModelShapes) -> bool:
        mine = (self.heads, self.neurons, self.hidden, self.kv_groups)
        return mine == (other.heads, other.neurons, other.hidden, other.kv_groups)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShapes:
        return cls(**d)


class PrunableStructure(Protocol):
    """Where a family keeps heads, neurons and hidden dims, and the mechanics to mask and remove them.

    Class-level facts: `model_types` it handles, `default_adapter_targets` (Linear name suffixes),
    `head_modules` (task-head modules trained in full beside the adapters), `presets` (benchmark
    configs built in code, random weights) and `fusions` (inference fusions `fuse` offers)."""

    model_types: ClassVar[tuple[str, ...]]
    default_adapter_targets: ClassVar[list[str]]
    head_modules: ClassVar[list[str]]
    presets: ClassVar[dict[str, Callable[..., Any]]]
    fusions: ClassVar[tuple[str, ...]]

    def fuse(self, fusions: list[str]) -> dict[str, int]: ...

    model: nn.Module
    masks: PruningMasks | None
    head_dim: int

    def shapes(self) -> ModelShapes: ...

    def exact_param_count(self) -> int: ...

    def install_masks(self) -> PruningMasks: ...

    def remove_masks(self) -> None: ...

    def compact(self) -> SliceLog: ...

    def reshape(self, shapes: ModelShapes) -> None: ...

    def head_output_weight(self, layer: int) -> torch.Tensor | None: ...

    def ffn_output_weight(self, layer: int) -> torch.Tensor | None: ...

    def hidden_input_weights(self) -> list[tuple[int, torch.Tensor]]: ...

    def branch_input_sites(self) -> set[int]:
        """Hidden-mask sites whose norm output only one branch reads (no residual stream): there the total
        gradient is the branch's. Other branches report their inputs through `MaskHooks.observe_branch`.
        Optional: only the branch form of the hidden salience needs it."""
        ...


_FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Class decorator: make a structure class handle its `model_types` (`config.model_type` values)."""
    for t in cls.model_types:
        _FAMILIES[t] = cls
    return cls


def family_of(model_type: str | None) -> type:
    """The structure class for a `config.model_type`."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model type {model_type!r} has no prunable-structure family; supported: {sorted(_FAMILIES)}. "
            "Add one under apt_lightning/structure/families/ (implement PrunableStructure, @register_family)."
        )
    return _FAMILIES[model_type]


# Models that number positions from pad_token_id + 1 (fairseq's convention): their usable length is
# max_position_embeddings - (pad_token_id + 1), e.g. 514 - 2 = 512 for RoBERTa.
_OFFSET_POSITIONS = {
    "roberta",
    "roberta-prelayernorm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "xmod",
    "ibert",
    "longformer",
    "luke",
    "mpnet",
}


def position_limit(config) -> tuple[int, str] | None:
    """The longest input the model's position embeddings take, and how that number was found; None when
    the config does not say (e.g. relative or rotary positions without a maximum)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        positions = getattr(config, attr, None)
        if isinstance(positions, int) and positions > 0:
            break
    else:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1
        return (
            positions - offset,
            f"{attr}={positions} less pad_token_id + 1 = {offset}, where positions start",
        )
    return positions, f"{attr}={positions}"


def max_positions(config) -> int:
    """Longest input a model of `config` accepts (`position_limit`; unbounded when the config has none)."""
    limit = position_limit(config)
    return 1 << 30 if limit is None else limit[0]


def registered_families() -> dict[str, type]:
    """Every registered model type and its structure class."""
    return dict(_FAMILIES)


def get_structure(model: nn.Module) -> PrunableStructure:
    """The family object for `model`, created once and cached on the model."""
    cached = getattr(model, "_apt_structure", None)
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    structure = family_of(model_type)(model)
    object.__setattr__(model, "_apt_structure", structure)
    return structure


def preset_config(name: str, num_labels: int = 2):
    """A transformers config of a well-known architecture built in code (shapes offline, random weights)."""
    presets = {p: f for cls in set(_FAMILIES.values()) for p, f in cls.presets.items()}
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; built in: {', '.join(sorted(presets))}")
    return presets[name](num_labels)


def preset_names() -> list[str]:
    return sorted({p for cls in set(_FAMILIES.values()) for p in cls.presets})


def first_n(n: int, total: int, what: str) -> torch.Tensor:
    """A 0/1 mask keeping the first `n` of `total` blocks (the skeleton `reshape` cuts a fresh model to)."""
    if n > total:
        raise ValueError(f"{what}: {n} exceeds the model's {total}")
    return (torch.arange(total) < n).float()
