"""Prunable structure of model families: masks, compaction, parameter costs and counts."""

from apt_lightning.structure import families  # noqa: F401  (registers the built-in families)
from apt_lightning.structure.base import (
    ModelShapes,
    PrunableStructure,
    UnitCosts,
    family_of,
    get_structure,
    max_positions,
    position_limit,
    preset_config,
    preset_names,
    register_family,
    registered_families,
)
from apt_lightning.structure.masks import MaskedLayerNorm, MaskedRMSNorm, PruningMasks
from apt_lightning.structure.slicing import SliceLog, SliceOp

__all__ = [
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "ModelShapes",
    "PrunableStructure",
    "PruningMasks",
    "SliceLog",
    "SliceOp",
    "UnitCosts",
    "family_of",
    "registered_families",
    "get_structure",
    "max_positions",
    "position_limit",
    "preset_config",
    "preset_names",
    "register_family",
]
