"""Deciding what to prune: scorers, the block search, the sparsity schedule."""

from apt_lightning.pruning.blocks import BlockTensors, block_costs, kept_kv_groups, kept_param_count
from apt_lightning.pruning.oneshot import DATA_FREE_SCORERS, prune_to_sparsity
from apt_lightning.pruning.recorded import StructureError, last_pruning_event, prune_to_structure
from apt_lightning.pruning.schedule import CubicSchedule
from apt_lightning.pruning.scorers import (
    MagnitudeScorer,
    OutlierAwareSalience,
    RandomScorer,
    Scorer,
    UniformScorer,
    build_scorer,
    register_scorer,
)
from apt_lightning.pruning.search import select_blocks

__all__ = [
    "DATA_FREE_SCORERS",
    "BlockTensors",
    "CubicSchedule",
    "MagnitudeScorer",
    "OutlierAwareSalience",
    "RandomScorer",
    "Scorer",
    "StructureError",
    "UniformScorer",
    "block_costs",
    "build_scorer",
    "kept_kv_groups",
    "kept_param_count",
    "last_pruning_event",
    "prune_to_sparsity",
    "prune_to_structure",
    "register_scorer",
    "select_blocks",
]
