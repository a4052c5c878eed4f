"""Putting `APTLinear` adapters into a model, finding them, and merging them back."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from apt_lightning.adapters.linear import APTLinear


@dataclass
class AdapterConfig:
    """Which Linears get adapters (matched by name suffix at a `.` boundary) and their initial shape.

    `targets` None takes the model family's defaults (BERT: query, value, FFN-in; LLaMA: q_proj, v_proj);
    rank 8, alpha 16 (docs/method.md section 2).
    """

    targets: list[str] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.targets is not None and not self.targets:
            raise ValueError(
                "adapter targets must name at least one module (use `adapters: null` for full FT)"
            )
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_adapters(model: nn.Module, config: AdapterConfig) -> dict[str, APTLinear]:
    """Replace every Linear matching a target with an `APTLinear` sharing its weights; freeze the rest
    of those layers. Raises if a target matches nothing, listing what Linear names look like."""
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, APTLinear)
    }
    targets = config.targets
    if targets is None:
        from apt_lightning.structure import get_structure

        targets = get_structure(model).default_adapter_targets
    for target in targets:
        if not any(_matches(n, target) for n in linears):
            examples = ", ".join(
                sorted({n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears})[
                    :12
                ]
            )
            raise ValueError(
                f"adapter target {target!r} matches no Linear module in {type(model).__name__}; "
                f"names end like: {examples}"
            )
    added = {}
    for name, linear in linears.items():
        if any(_matches(name, t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            adapter = APTLinear.from_linear(
                linear, rank=config.rank, alpha=config.alpha, dropout=config.dropout
            )
            setattr(parent, child, adapter)
            added[name] = adapter
    return added


def adapter_modules(model: nn.Module) -> dict[str, APTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, APTLinear)}


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its Linear (W <- W + s B A). Returns how many were merged."""
    merged = 0
    for name, module in list(adapter_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merge())
        merged += 1
    return merged
