"""Prunable structure of model families: masks, compaction, parameter counting."""

from apt_lightning.structure import bert  # noqa: F401  (registers the BERT-like family)
from apt_lightning.structure.base import (
    ModelShapes,
    PrunableStructure,
    apt_param_count,
    exact_encoder_param_count,
    get_structure,
    register_family,
)
from apt_lightning.structure.masks import MaskedLayerNorm, PruningMasks
from apt_lightning.structure.slicing import SliceLog, SliceOp

__all__ = [
    "MaskedLayerNorm",
    "ModelShapes",
    "PrunableStructure",
    "PruningMasks",
    "SliceLog",
    "SliceOp",
    "apt_param_count",
    "exact_encoder_param_count",
    "get_structure",
    "register_family",
]
