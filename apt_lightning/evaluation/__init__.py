"""Zero-shot multiple-choice evaluation of causal LMs (lm-eval-harness's acc / acc_norm on local sets)."""

from apt_lightning.evaluation.evaluate import evaluate_zero_shot
from apt_lightning.evaluation.items import MultipleChoiceItem
from apt_lightning.evaluation.metrics import TaskResult, ZeroShotResults, mean_stderr
from apt_lightning.evaluation.readers import ZeroShotDataError
from apt_lightning.evaluation.report import markdown_table, write_results
from apt_lightning.evaluation.scoring import encode_pair, loglikelihoods
from apt_lightning.evaluation.tasks import TASK_NAMES, TASKS, default_data_root, resolve_task_names

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "MultipleChoiceItem",
    "TaskResult",
    "ZeroShotDataError",
    "ZeroShotResults",
    "default_data_root",
    "encode_pair",
    "evaluate_zero_shot",
    "loglikelihoods",
    "markdown_table",
    "mean_stderr",
    "resolve_task_names",
    "write_results",
]
