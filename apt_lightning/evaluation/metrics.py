"""acc, acc_norm, their standard errors and the chance level, as lm-eval-harness defines them, and the results
of a zero-shot run (per task and averaged over tasks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from apt_lightning.evaluation.items import MultipleChoiceItem

_AVERAGED = ("acc", "acc_norm", "chance")  # the metrics averaged over tasks


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`); for 0/1
    values of mean p this is sqrt(p (1 - p) / (n - 1)). NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def predictions(item: MultipleChoiceItem, logliks: Sequence[float]) -> tuple[int, int]:
    """The choice picked by acc (the largest summed log-likelihood) and by acc_norm (the largest
    log-likelihood per character of the choice)."""
    if len(logliks) != item.num_choices:
        raise ValueError(f"{len(logliks)} log-likelihoods for an item of {item.num_choices} choices")
    normed = [ll / length for ll, length in zip(logliks, item.norm_lengths, strict=True)]
    return argmax(logliks), argmax(normed)


@dataclass(frozen=True)
class TaskResult:
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    chance: float

    @classmethod
    def from_scores(
        cls, items: Sequence[MultipleChoiceItem], logliks: Sequence[Sequence[float]]
    ) -> TaskResult:
        """The task's metrics from each item's per-choice log-likelihoods."""
        if not items or len(items) != len(logliks):
            raise ValueError(f"{len(logliks)} score lists for {len(items)} items (need one per item, >= 1)")
        picks = [predictions(item, ll) for item, ll in zip(items, logliks, strict=True)]
        hits = [float(acc == item.gold) for item, (acc, _) in zip(items, picks, strict=True)]
        hits_norm = [float(norm == item.gold) for item, (_, norm) in zip(items, picks, strict=True)]
        return cls(
            n=len(items),
            acc=sum(hits) / len(items),
            acc_stderr=mean_stderr(hits),
            acc_norm=sum(hits_norm) / len(items),
            acc_norm_stderr=mean_stderr(hits_norm),
            chance=sum(1.0 / item.num_choices for item in items) / len(items),
        )

    def to_dict(self) -> dict:
        """JSON-ready; a standard error that is undefined (n < 2) is None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class ZeroShotResults:
    model: str
    tasks: dict[str, TaskResult]
    limit: int | None = None
    average: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("zero-shot results need at least one task")
        mean = {k: sum(getattr(r, k) for r in self.tasks.values()) / len(self.tasks) for k in _AVERAGED}
        object.__setattr__(self, "average", mean)

    def to_dict(self) -> dict:
        """{"model", "tasks": {name: {n, acc, acc_stderr, acc_norm, acc_norm_stderr, chance}}, "average":
        {acc, acc_norm, chance} (unweighted over tasks), "limit"}."""
        return {
            "model": self.model,
            "tasks": {name: r.to_dict() for name, r in self.tasks.items()},
            "average": dict(self.average),
            "limit": self.limit,
        }
