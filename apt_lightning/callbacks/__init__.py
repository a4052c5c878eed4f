"""Callbacks that make APT's decisions on a schedule, the efficiency monitor, the run dashboard and the
checkpoint that selects among models of the final structure."""

from apt_lightning.callbacks.dashboard import RunDashboard
from apt_lightning.callbacks.distillation import EveryEvent, OnImprovement, SelfDistillation, SnapshotPolicy
from apt_lightning.callbacks.efficiency import EfficiencyMonitor
from apt_lightning.callbacks.events import PruningEvent
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.selection import FinalStructureCheckpoint
from apt_lightning.callbacks.tuning import AdaptiveTuning

__all__ = [
    "AdaptivePruning",
    "AdaptiveTuning",
    "EfficiencyMonitor",
    "EveryEvent",
    "FinalStructureCheckpoint",
    "OnImprovement",
    "PruningEvent",
    "RunDashboard",
    "SelfDistillation",
    "SnapshotPolicy",
]
