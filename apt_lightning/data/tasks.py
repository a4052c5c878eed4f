"""Task descriptions: what a dataset's columns, labels and metrics are, in one value.

The DataModule (columns, labels), the LightningModule (head size, loss, label names) and checkpointing
(which metric to monitor) all read the same :class:`TaskSpec`, so a user describes a dataset once. A task is
either a GLUE preset name (``sst2``, ``mnli``, ...) or a structured description of the user's own data::

    task:
      name: sentiment
      text_columns: [text]          # one column, or two for text pairs
      label_column: label
      label_names: [neg, neu, pos]  # or num_labels: 3 (names then read from string labels in the data)
      metric: accuracy              # accuracy, f1, matthews; pearson+spearman for regression
      hub_path: null                # a hub dataset (with hub_config) for online users; else data_dir

:func:`get_task` turns any of these (a name, a mapping, a ``TaskSpec``) into a checked ``TaskSpec``.

One task is not classification: ``instruction`` (:class:`InstructionTask`), causal-LM instruction tuning on
prompt/response pairs (``InstructionDataModule``), selected model-side by its ``objective`` (``causal_lm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torchmetrics
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

GLUE_HUB_PATH = "nyu-mll/glue"
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class TaskSpec:
    """One sequence classification or regression task: its columns, labels, metric and where it lives.

    Args:
        name: a name for messages and logs.
        text_columns: the text column, or the two columns of a text pair, in the data's names.
        label_column: the label column; in files its values are class ids, label names or (regression)
            numbers.
        num_labels: the number of classes (1 for regression). Optional when ``label_names`` are given.
        label_names: class names, id order (``id2label`` of exported models). With only ``num_labels``
            and string labels in the data, the names are the sorted distinct labels of the training data.
        metric: metric names joined with ``+``, the primary (model-selection) one first: ``accuracy``,
            ``f1`` (binary F1 of class 1; macro F1 for more classes), ``matthews``; ``pearson`` and
            ``spearman`` for regression. Default: ``accuracy``, or ``pearson+spearman`` for regression.
        is_regression: one real-valued output trained with MSE (``num_labels`` is then 1).
        hub_path: a hub dataset (``load_dataset(hub_path, hub_config)``) read when the DataModule has no
            ``data_dir``; None: local files only.
        hub_config: the hub dataset's configuration name, if it has several.
        validation_split: the hub's validation split (local files: ``dev.*``/``validation.*`` or it).
        tsv_aliases: column renames applied to files before the checks (the GLUE TSVs' own names).
        tsv_columns: the column names of a headerless TSV (CoLA).
    """

    name: str = "custom"
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    num_labels: int | None = None
    label_names: tuple[str, ...] = ()
    metric: str | None = None
    is_regression: bool = False
    hub_path: str | None = None
    hub_config: str | None = None
    validation_split: str = "validation"
    tsv_aliases: dict[str, str] = field(default_factory=dict, hash=False)
    tsv_columns: tuple[str, ...] = ()
    objective: ClassVar[str] = "classification"  # the model's head and loss (InstructionTask: causal_lm)
    mode: ClassVar[str] = "max"  # every classification and regression metric: higher is better

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        texts = (self.text_columns,) if isinstance(self.text_columns, str) else tuple(self.text_columns)
        if len(texts) not in (1, 2) or not all(isinstance(c, str) and c for c in texts):
            raise ValueError(
                f"{where}: text_columns must name one text column or two (a text pair), got {list(texts)}"
            )
        if self.label_column in texts:
            raise ValueError(f"{where}: label_column {self.label_column!r} is also a text column")
        names = tuple(str(n) for n in self.label_names or ())
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: label_names {list(names)} has duplicates")
        regression = bool(self.is_regression) or (self.num_labels == 1 and not names)
        num = self.num_labels
        if regression:
            if names or num not in (None, 1):
                raise ValueError(
                    f"{where}: a regression task has one output and no label names; drop num_labels "
                    f"({num}) / label_names ({list(names)}) or set is_regression: false"
                )
            num = 1
        elif num is None:
            if not names:
                raise ValueError(
                    f"{where}: give label_names (e.g. [neg, pos]) or num_labels (class ids 0..n-1, or "
                    "string labels whose sorted names are read from the data), or is_regression: true"
                )
            num = len(names)
        elif num < 2:
            raise ValueError(f"{where}: num_labels must be 2 or more for classification, got {num}")
        elif names and len(names) != num:
            raise ValueError(f"{where}: num_labels={num} but {len(names)} label_names {list(names)}")
        metric = self.metric or ("pearson+spearman" if regression else "accuracy")
        allowed = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
        unknown = [m for m in metric.split("+") if m not in allowed]
        if unknown:
            kind = "regression" if regression else "classification"
            raise ValueError(
                f"{where}: metric {unknown} is not a {kind} metric; choose from {list(allowed)} "
                "(join several with '+', the first selects the model)"
            )
        for attr, value in (
            ("text_columns", texts),
            ("label_names", names),
            ("num_labels", num),
            ("metric", metric),
            ("is_regression", regression),
            ("tsv_aliases", dict(self.tsv_aliases or {})),
            ("tsv_columns", tuple(self.tsv_columns or ())),
        ):
            object.__setattr__(self, attr, value)

    @property
    def is_glue(self) -> bool:
        """Whether this is one of the GLUE presets (``get_task("sst2")``)."""
        return GLUE_TASKS.get(self.name) == self

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metric.split("+"))

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]

    def with_label_names(self, names: tuple[str, ...]) -> TaskSpec:
        """This task with class names (read from the data) filled in."""
        return replace(self, label_names=tuple(names))

    def to_config(self) -> str | dict:
        """What to store and print: the GLUE name for a preset, else the fields that say something
        (lists for tuples), which ``get_task`` reads back."""
        if self.is_glue:
            return self.name
        out = {}
        for key, value in asdict(self).items():
            if value in (None, (), {}) or (key == "validation_split" and value == "validation"):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class InstructionTask:
    """Causal-LM instruction tuning (``task: instruction``): a decoder (``AutoModelForCausalLM``) trained on
    next-token cross-entropy over the response tokens only (docs/method.md, "Instruction tuning"). Validation
    logs that loss, averaged over every response token of the eval set (``val/loss``, the model-selection
    metric: lower is better) and its exponential (``val/perplexity``). Data: ``InstructionDataModule``."""

    name: ClassVar[str] = "instruction"
    objective: ClassVar[str] = "causal_lm"
    mode: ClassVar[str] = "min"
    metric: ClassVar[str] = "loss+perplexity"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "perplexity")
    primary_metric: ClassVar[str] = "loss"
    label_names: ClassVar[tuple[str, ...]] = ()
    is_regression: ClassVar[bool] = False
    is_glue: ClassVar[bool] = False

    def to_config(self) -> str:
        return self.name


INSTRUCTION_TASK = InstructionTask()

GlueTask = TaskSpec  # the GLUE presets are TaskSpecs; the old name stays importable


def _glue(name, text_columns, num_labels, metric, label_names=(), **kw) -> TaskSpec:
    return TaskSpec(
        name=name,
        text_columns=text_columns,
        num_labels=num_labels,
        metric=metric,
        label_names=label_names,
        hub_path=GLUE_HUB_PATH,
        hub_config=name,
        **kw,
    )


# Keyed by GLUE name: the presets a plain string `task` names.
GLUE_TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        _glue("sst2", ("sentence",), 2, "accuracy", ("negative", "positive")),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            3,
            "accuracy",
            ("entailment", "neutral", "contradiction"),
            validation_split="validation_matched",
            tsv_aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ),
        _glue("qnli", ("question", "sentence"), 2, "accuracy", ("entailment", "not_entailment")),
        _glue(
            "qqp",
            ("question1", "question2"),
            2,
            "f1+accuracy",
            ("not_duplicate", "duplicate"),
            tsv_aliases={"is_duplicate": "label"},
        ),
        _glue(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            "f1+accuracy",
            ("not_equivalent", "equivalent"),
            tsv_aliases={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
        ),
        _glue(
            "cola",
            ("sentence",),
            2,
            "matthews",
            ("unacceptable", "acceptable"),
            tsv_columns=("source", "label", "notes", "sentence"),
        ),
        _glue("stsb", ("sentence1", "sentence2"), 1, "pearson+spearman", tsv_aliases={"score": "label"}),
        _glue("rte", ("sentence1", "sentence2"), 2, "accuracy", ("entailment", "not_entailment")),
    )
}


def get_task(task: str | TaskSpec | InstructionTask | Mapping) -> TaskSpec | InstructionTask:
    """The task a ``task`` argument describes: a GLUE name (``sst2``, ``mnli``, ...), ``instruction``
    (causal-LM instruction tuning), a ``TaskSpec``, or a mapping of ``TaskSpec``'s fields (as a YAML config
    or a checkpoint's hyperparameters hold it)."""
    if isinstance(task, TaskSpec | InstructionTask):
        return task
    if isinstance(task, str):
        if task == INSTRUCTION_TASK.name:
            return INSTRUCTION_TASK
        try:
            return GLUE_TASKS[task]
        except KeyError:
            raise ValueError(
                f"unknown task {task!r}; choose one of: {', '.join(GLUE_TASKS)}, "
                f"{INSTRUCTION_TASK.name!r} (causal-LM instruction tuning), or describe your own "
                "dataset with a mapping (name, text_columns, label_column, label_names or num_labels, "
                "metric; see apt_lightning.data.TaskSpec)"
            ) from None
    if hasattr(task, "as_dict"):  # a jsonargparse Namespace
        task = task.as_dict()
    if isinstance(task, Mapping):
        known = set(TaskSpec.__dataclass_fields__)
        unknown = sorted(set(task) - known)
        if unknown:
            raise ValueError(f"task: unknown field(s) {unknown}; a task has {sorted(known)}")
        return TaskSpec(**task)
    raise TypeError(f"task must be a GLUE name, a mapping or a TaskSpec, got {type(task).__name__}")


def build_metrics(task: TaskSpec, prefix: str = "val/") -> torchmetrics.MetricCollection:
    """The task's metrics, keyed ``<prefix><name>`` (e.g. ``val/accuracy``, ``val/f1``).

    Update with ``(preds, target)`` where ``preds`` are predicted class ids (``logits.argmax(-1)``) for
    classification and scores (``logits.squeeze(-1)``) for regression. Accuracy is micro-averaged; F1 is
    the binary F1 of class 1 for two classes, as in the GLUE leaderboard, and macro F1 for more.
    """
    n = task.num_labels
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=n, average="micro"),
        "f1": BinaryF1Score if n == 2 else lambda: MulticlassF1Score(num_classes=n, average="macro"),
        "matthews": lambda: MulticlassMatthewsCorrCoef(num_classes=n),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    metrics = {name: factories[name]() for name in task.metric_names}
    return torchmetrics.MetricCollection(metrics, prefix=prefix)
