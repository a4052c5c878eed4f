"""Callbacks that make APT's decisions on a schedule, and the efficiency monitor."""

from apt_lightning.callbacks.distillation import EveryEvent, OnImprovement, SelfDistillation, SnapshotPolicy
from apt_lightning.callbacks.efficiency import EfficiencyMonitor
from apt_lightning.callbacks.events import PruningEvent
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.tuning import AdaptiveTuning

__all__ = [
    "AdaptivePruning",
    "AdaptiveTuning",
    "EfficiencyMonitor",
    "EveryEvent",
    "OnImprovement",
    "PruningEvent",
    "SelfDistillation",
    "SnapshotPolicy",
]
