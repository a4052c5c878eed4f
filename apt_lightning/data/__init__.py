"""Data: task descriptions (a GLUE preset name or a user's own ``TaskSpec``: columns, labels, metrics), the
DataModule that reads them, and the checks that local files pass before training (errors name the file, the
line and the fix); instruction data (Alpaca format) for causal-LM training (``task: instruction``)."""

from apt_lightning.data.glue import GLUE_HUB_PATH, GLUEDataModule
from apt_lightning.data.instruction import InstructionDataModule, format_prompt
from apt_lightning.data.tasks import (
    GLUE_TASKS,
    INSTRUCTION_TASK,
    GlueTask,
    InstructionTask,
    TaskSpec,
    build_metrics,
    get_task,
)
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
    "INSTRUCTION_TASK",
    "DataEncodingError",
    "DataFileError",
    "EmptyDataError",
    "EmptyTextError",
    "GLUEDataModule",
    "GlueTask",
    "InstructionDataModule",
    "InstructionTask",
    "LabelError",
    "MalformedDataError",
    "MaxLengthError",
    "MissingColumnError",
    "TaskSpec",
    "build_metrics",
    "check_max_length",
    "format_prompt",
    "get_task",
]
