"""Inference-time fusions for serving: fewer, larger kernels per layer, offered per model family.

The BERT family offers `qkv` (one Q/K/V matrix product) and `gelu` (GELU in the FFN product's epilogue);
see `apt_lightning.structure.families.bert_fusion`. Fuse a merged, compacted model (after `apt-export` /
`compact_for_inference`), and save the unfused one.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from apt_lightning.structure import get_structure, registered_families

FUSIONS = tuple(dict.fromkeys(f for cls in set(registered_families().values()) for f in cls.fusions))


def fuse_for_inference(model: nn.Module, fusions: Iterable[str] = FUSIONS) -> dict[str, int]:
    """Apply the model family's fusions in place; returns how many modules each fusion replaced. Raises
    ValueError for a fusion the model's family does not offer (naming what it offers)."""
    fusions = list(dict.fromkeys(fusions))
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown:
        raise ValueError(f"unknown fusion(s) {unknown}; allowed: {', '.join(FUSIONS)}")
    structure = get_structure(model)
    offered = type(structure).fusions
    missing = [f for f in fusions if f not in offered]
    if missing:
        model_type = getattr(model.config, "model_type", None)
        raise ValueError(
            f"model type {model_type!r} offers no fusion {missing}; it offers: {list(offered) or 'none'}"
        )
    return structure.fuse(fusions)
