"""GLUE task registry: what each task's columns, labels and metrics are, in one table.

The DataModule, the LightningModule (head size, loss) and checkpointing (which metric to monitor) all
read the same :class:`GlueTask`, so adding a task is one registry entry rather than edits in three places.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torchmetrics
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task in the hub's (``nyu-mll/glue``) vocabulary.

    ``metric`` joins metric names with ``+``, the primary (model-selection) one first. ``tsv_aliases``
    maps the column names of the original GLUE TSVs to the hub's, so both layouts read the same.
    ``tsv_columns`` names the columns of a GLUE TSV that ships without a header row (CoLA).
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metric: str
    label_names: tuple[str, ...] = ()
    validation_split: str = "validation"
    tsv_aliases: dict[str, str] = field(default_factory=dict, hash=False)
    tsv_columns: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metric.split("+"))

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]


# Keyed by GLUE name; a new task (or a local variant) registers by adding an entry.
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("sst2", ("sentence",), 2, "accuracy", ("negative", "positive")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            3,
            "accuracy",
            ("entailment", "neutral", "contradiction"),
            validation_split="validation_matched",
            tsv_aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ),
        GlueTask("qnli", ("question", "sentence"), 2, "accuracy", ("entailment", "not_entailment")),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            2,
            "f1+accuracy",
            ("not_duplicate", "duplicate"),
            tsv_aliases={"is_duplicate": "label"},
        ),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            "f1+accuracy",
            ("not_equivalent", "equivalent"),
            tsv_aliases={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
        ),
        GlueTask(
            "cola",
            ("sentence",),
            2,
            "matthews",
            ("unacceptable", "acceptable"),
            tsv_columns=("source", "label", "notes", "sentence"),
        ),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, "pearson+spearman", tsv_aliases={"score": "label"}),
        GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy", ("entailment", "not_entailment")),
    )
}


def get_task(name: str) -> GlueTask:
    """Look a task up by its GLUE name (``sst2``, ``mnli``, ...)."""
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(GLUE_TASKS)}") from None


def build_metrics(task: GlueTask, prefix: str = "val/") -> torchmetrics.MetricCollection:
    """The task's GLUE metrics, keyed ``<prefix><name>`` (e.g. ``val/accuracy``, ``val/f1``).

    Update with ``(preds, target)`` where ``preds`` are predicted class ids (``logits.argmax(-1)``) for
    classification and scores (``logits.squeeze(-1)``) for regression. Accuracy is micro-averaged and F1
    is the binary F1 of class 1, as in the GLUE leaderboard.
    """
    n = task.num_labels
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=n, average="micro"),
        "f1": BinaryF1Score,
        "matthews": lambda: MulticlassMatthewsCorrCoef(num_classes=n),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    metrics = {name: factories[name]() for name in task.metric_names}
    return torchmetrics.MetricCollection(metrics, prefix=prefix)
