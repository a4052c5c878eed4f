"""Deciding adapter ranks: allocation strategies for adaptive tuning."""

from apt_lightning.tuning.allocation import (
    STRATEGIES,
    AdapterInfo,
    RankAllocation,
    StaticAllocation,
    TopHalfAllocation,
    UniformAllocation,
    build_allocation,
    tuning_params,
)

__all__ = [
    "STRATEGIES",
    "AdapterInfo",
    "RankAllocation",
    "StaticAllocation",
    "TopHalfAllocation",
    "UniformAllocation",
    "build_allocation",
    "tuning_params",
]
