"""The zero-shot tasks: each name, its local files (relative to the data root) and its reader."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apt_lightning.evaluation import readers
from apt_lightning.evaluation.items import MultipleChoiceItem

DATA_ROOT_ENV = "APT_DATA_ROOT"


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    title: str
    paths: tuple[str, ...]  # relative to the data root; passed to `read` in this order
    read: Callable[..., list[MultipleChoiceItem]]

    def check_files(self, data_root: str | Path) -> list[Path]:
        """The task's files under `data_root`; FileNotFoundError naming the missing ones and the fix."""
        files = [Path(data_root) / p for p in self.paths]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"task {self.name!r}: {', '.join(missing)} not found under the data root {data_root}; pass "
                f"--data-root (or set {DATA_ROOT_ENV}) to the folder holding {', '.join(self.paths)}"
            )
        return files

    def load(self, data_root: str | Path, limit: int | None = None) -> list[MultipleChoiceItem]:
        """The task's items from `data_root`, the first `limit` of them when given (as lm-eval's --limit)."""
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be a positive number of items, got {limit}")
        return self.read(*self.check_files(data_root))[:limit]


TASKS: dict[str, ZeroShotTask] = {
    t.name: t
    for t in (
        ZeroShotTask("arc_easy", "ARC-Easy", ("arc/ARC-Easy-Test.jsonl",), readers.read_arc),
        ZeroShotTask("arc_challenge", "ARC-Challenge", ("arc/ARC-Challenge-Test.jsonl",), readers.read_arc),
        ZeroShotTask("piqa", "PIQA", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), readers.read_piqa),
        ZeroShotTask("boolq", "BoolQ", ("boolq/val.jsonl",), readers.read_boolq),
        ZeroShotTask("openbookqa", "OpenBookQA", ("openbookqa/test.tsv",), readers.read_openbookqa),
        ZeroShotTask(
            "hellaswag", "HellaSwag", ("hellaswag/hellaswag_val_subset.txt",), readers.read_hellaswag
        ),
        ZeroShotTask(
            "winogrande",
            "WinoGrande",
            ("winogrande/dev.llm-adapters.json", "winogrande/dev-labels.lst"),
            readers.read_winogrande,
        ),
        ZeroShotTask("mmlu", "MMLU", ("mmlu/data/test",), readers.read_mmlu),
        ZeroShotTask(
            "truthfulqa_mc1", "TruthfulQA MC1", ("truthfulqa/mc_task.json",), readers.read_truthfulqa_mc1
        ),
    )
}
TASK_NAMES = tuple(TASKS)


def resolve_task_names(tasks: str | Sequence[str]) -> list[str]:
    """`"all"`, a comma-separated string or a list of task names -> the names, in the order given, once
    each."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TASK_NAMES)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        what = f"unknown task(s) {unknown}" if unknown else "no task given"
        raise ValueError(f"{what}; choose 'all' or a comma-separated list of: {', '.join(TASK_NAMES)}")
    return list(dict.fromkeys(names))


def default_data_root() -> Path:
    """$APT_DATA_ROOT, else `../shared/data` beside the repository root (the checkout holding apt_lightning),
    else `../shared/data` from the working directory (where the recipes' relative paths start)."""
    override = os.environ.get(DATA_ROOT_ENV)
    if override:
        return Path(os.path.expandvars(override)).expanduser()
    beside_repo = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside_repo if beside_repo.is_dir() else Path("..") / "shared" / "data"
