"""Checks on local data files, with errors that name the file, the line and the fix.

Every reader (``readers.py``) ends in :func:`check_frame`: the rows pandas parsed must be exactly the
records the structural scan found (so nothing was silently merged or dropped), the task's columns must be
there, every text field must hold text, and every label must be one the task allows. A :class:`Rows`
carries where each parsed row came from (its physical line, or its record number where a format has no
lines), so a message can point at the line to fix. ``check_max_length`` refuses a ``max_length`` beyond
the backbone's position embeddings before training starts rather than as an index error mid-epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apt_lightning.data.tasks import TaskSpec
from apt_lightning.structure import position_limit

_SHOWN = 5  # how many line numbers a message lists


class DataFileError(ValueError):
    """A local data file that cannot be used as it is. ``path`` and ``line`` (None where the problem has
    no single line) say where; the message ends with the fix."""

    def __init__(self, path: Path, problem: str, fix: str, line: int | None = None, what: str = "") -> None:
        self.path, self.line = Path(path), line
        where = f"{what} file `{path}`" if what else f"`{path}`"
        if line is not None:
            where += f" line {line}"
        super().__init__(f"{where}: {problem}; {fix}")


class DataEncodingError(DataFileError):
    """The file's bytes are not UTF-8."""


class EmptyDataError(DataFileError):
    """The file is empty, or has a header and no data rows."""


class MalformedDataError(DataFileError):
    """The file's structure is broken: a quote left open, a row with the wrong number of fields, a line
    that is not JSON, or rows that pandas parsed differently from the structural scan."""


class MissingColumnError(DataFileError):
    """A column the task needs is not in the file (or not in some of its records)."""


class EmptyTextError(DataFileError):
    """A text field is empty, whitespace only, or not text at all."""


class LabelError(DataFileError):
    """A label the task does not allow: not a number or label name, not an integer, or out of range."""


class MaxLengthError(ValueError):
    """``max_length`` is longer than the backbone's position embeddings."""


@dataclass(frozen=True)
class Rows:
    """Where the parsed rows of one file came from.

    ``lines[i]`` is the physical line (1-based) where row ``i`` starts, or None where the format has no
    lines (Parquet, a JSON array): then rows are named by their 1-based position (``unit`` row or record).
    ``header_line`` is the header's line, None for headerless files and formats without a header.
    """

    path: Path
    what: str  # "train" / "validation"
    count: int
    lines: tuple[int, ...] | None = None
    unit: str = "row"
    header_line: int | None = None

    def error(self, kind: type[DataFileError], problem: str, fix: str, line: int | None = None):
        return kind(self.path, problem, fix, line=line, what=self.what)

    def at(self, rows: np.ndarray) -> tuple[int | None, str]:
        """The line of the first of ``rows`` (positional indices) for the message's prefix, and a list of
        up to five of them ("lines 3, 9, 12 and 4 more") for its body."""
        first = int(rows[0])
        if self.lines is not None:
            numbers, word = [self.lines[int(r)] for r in rows[:_SHOWN]], "line"
        else:
            numbers, word = [int(r) + 1 for r in rows[:_SHOWN]], self.unit
        more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
        listed = f"{word}{'s' if len(rows) > 1 else ''} {', '.join(map(str, numbers))}{more}"
        return (self.lines[first] if self.lines is not None else None), listed

    def name(self, row: int) -> str:
        return f"line {self.lines[row]}" if self.lines is not None else f"{self.unit} {row + 1}"


def check_frame(frame: pd.DataFrame, task: TaskSpec, rows: Rows) -> pd.DataFrame:
    """Check a parsed file against its structural scan and the task; return the task's text columns and
    ``label`` (from ``task.label_column``), the text as ``str`` and labels as ids (floats for regression)."""
    if len(frame) != rows.count:
        raise rows.error(
            MalformedDataError,
            f"pandas parsed {len(frame)} rows but the file has {rows.count} records; the file's quoting "
            "or line breaks are inconsistent",
            "check the quoting and the line endings (one record per line), or convert the file to JSONL",
        )
    if rows.count == 0:
        raise rows.error(
            EmptyDataError,
            "the header is the only record: no data rows follow it" if rows.header_line else "no data rows",
            "add data rows below the header, or point data_dir at the folder with the full split",
            line=rows.header_line,
        )
    frame = frame.rename(
        columns={
            old: new
            for old, new in task.tsv_aliases.items()
            if old in frame.columns and new not in frame.columns
        }
    )
    required = [*task.text_columns, task.label_column]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        if task.is_glue:
            fix = (
                f"name the columns {required} (the hub's names"
                + (f", or the GLUE TSV's {list(task.tsv_aliases)}" if task.tsv_aliases else "")
                + "), or, for your own dataset, give a task mapping instead of the GLUE name "
                "(text_columns, label_column, label_names or num_labels: see apt_lightning.data.TaskSpec)"
            )
        else:
            fix = (
                f"name the columns {required}, or set the task's text_columns / label_column to the "
                "file's column names"
            )
        raise rows.error(
            MissingColumnError,
            f"missing column(s) {missing} for task {task.name!r}; found columns {list(frame.columns)}",
            fix,
            line=rows.header_line,
        )
    frame = frame[required].copy().reset_index(drop=True).rename(columns={task.label_column: "label"})
    for column in task.text_columns:
        check_text(frame[column], column, rows)
    frame["label"] = _label_ids(frame["label"], task, rows)
    return frame


def check_text(values: pd.Series, column: str, rows: Rows) -> None:
    """Every value of a text column present and non-blank text (MissingColumnError / EmptyTextError)."""
    absent = values.isna().to_numpy()
    blank = np.array([not isinstance(v, str) or not v.strip() for v in values]) & ~absent
    for bad, problem, fix in (
        (absent, f"no {column!r} field", f"give every record a {column!r}, or delete the record"),
        (blank, f"{column!r} is empty, whitespace only or not text", "write the text, or delete the row"),
    ):
        if bad.any():
            where = np.flatnonzero(bad)
            line, listed = rows.at(where)
            kind = MissingColumnError if bad is absent else EmptyTextError
            shown = "" if bad is absent else f" (got {values.iloc[where[0]]!r})"
            raise rows.error(
                kind, f"{problem}{shown} in {len(where)} of {rows.count} rows: {listed}", fix, line=line
            )


def _label_ids(labels: pd.Series, task: TaskSpec, rows: Rows) -> pd.Series:
    """Map labels (ids, numeric strings or names) to ints in [0, num_labels), or floats for regression."""
    labels = labels.reset_index(drop=True)
    if task.is_regression:
        values = pd.to_numeric(labels, errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        allowed = "finite numbers"
    else:
        by_name = {name: i for i, name in enumerate(task.label_names)}
        names_as_ids = labels.astype(str).str.strip().map(lambda v: by_name.get(v, v))
        values = pd.to_numeric(names_as_ids, errors="coerce")
        bad = values.isna() | (values % 1 != 0) | (values < 0) | (values >= task.num_labels)
        allowed = f"integers in [0, {task.num_labels})" + (
            f" or names {list(task.label_names)}" if task.label_names else ""
        )
    if bad.any():
        where = np.flatnonzero(bad.to_numpy())
        line, listed = rows.at(where)
        first, value = int(where[0]), values.iloc[int(where[0])]
        shown = labels.iloc[first]
        shown = shown.item() if hasattr(shown, "item") else shown  # 1.5, not np.float64(1.5)
        if labels.isna().iloc[first]:
            why = "no label"
        elif pd.isna(value):
            why = "not a number" + ("" if task.is_regression else " or a label name")
        elif not task.is_regression and value % 1 != 0:
            why = "not an integer class id"
        else:
            why = "out of range" if not task.is_regression else "not finite"
        fix = "correct or delete those rows (is this file for another task, or are the labels shifted?)"
        if task.label_names and not task.is_glue:
            fix = "correct or delete those rows, or add the label to the task's label_names"
        column = "" if task.label_column == "label" else f" (column {task.label_column!r})"
        raise rows.error(
            LabelError,
            f"label {shown!r} is not valid for task {task.name!r}, {why} "
            f"({len(where)} of {len(labels)} rows): {listed}; allowed: {allowed}{column}",
            fix,
            line=line,
        )
    return values.astype(float if task.is_regression else int)


def check_max_length(max_length: int, config, backbone: str) -> None:
    """Refuse a ``max_length`` longer than ``config``'s position embeddings (raises MaxLengthError)."""
    limit = position_limit(config)
    if limit is not None and max_length > limit[0]:
        raise MaxLengthError(
            f"max_length={max_length} is longer than backbone {backbone!r} can take: its position "
            f"embeddings cover {limit[0]} tokens ({limit[1]}); pass max_length <= {limit[0]} "
            f"(e.g. --data.init_args.max_length={limit[0]})"
        )
