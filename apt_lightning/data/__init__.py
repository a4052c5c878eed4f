"""Data: task descriptions (a GLUE preset name or a user's own ``TaskSpec``: columns, labels, metrics), the
DataModule that reads them, and the checks that local files pass before training (errors name the file, the
line and the fix)."""

from apt_lightning.data.glue import GLUE_HUB_PATH, GLUEDataModule
from apt_lightning.data.tasks import GLUE_TASKS, GlueTask, TaskSpec, build_metrics, get_task
from apt_lightning.data.validation import (
    DataEncodingError,
    DataFileError,
    EmptyDataError,
    EmptyTextError,
    LabelError,
    MalformedDataError,
    MaxLengthError,
    MissingColumnError,
    check_max_length,
)

__all__ = [
    "GLUE_HUB_PATH",
    "GLUE_TASKS",
    "DataEncodingError",
    "DataFileError",
    "EmptyDataError",
    "EmptyTextError",
    "GLUEDataModule",
    "GlueTask",
    "LabelError",
    "MalformedDataError",
    "MaxLengthError",
    "MissingColumnError",
    "TaskSpec",
    "build_metrics",
    "check_max_length",
    "get_task",
]
