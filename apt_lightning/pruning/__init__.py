"""Deciding what to prune: scorers, the block search, the sparsity schedule."""

from apt_lightning.pruning.blocks import BlockTensors, block_costs
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
from apt_lightning.pruning.search import kept_param_count, select_blocks

__all__ = [
    "BlockTensors",
    "CubicSchedule",
    "MagnitudeScorer",
    "OutlierAwareSalience",
    "RandomScorer",
    "Scorer",
    "UniformScorer",
    "block_costs",
    "build_scorer",
    "kept_param_count",
    "register_scorer",
    "select_blocks",
]
