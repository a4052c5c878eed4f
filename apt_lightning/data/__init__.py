"""GLUE data: the task registry (columns, labels, metrics) and the DataModule that reads it."""

from apt_lightning.data.glue import GLUE_HUB_PATH, GLUEDataModule
from apt_lightning.data.tasks import GLUE_TASKS, GlueTask, build_metrics, get_task

__all__ = ["GLUE_HUB_PATH", "GLUE_TASKS", "GLUEDataModule", "GlueTask", "build_metrics", "get_task"]
