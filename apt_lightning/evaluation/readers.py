"""Readers of the local zero-shot sets, one per file format (the formats: the data folder's LLM_DATA.md).

Each returns the file's questions as `MultipleChoiceItem`s in file order, in the task's prompt format
(`prompts`). A file that does not parse fails with `ZeroShotDataError` naming the file, the line or item and
what was expected.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from apt_lightning.evaluation import prompts
from apt_lightning.evaluation.items import MultipleChoiceItem


class ZeroShotDataError(ValueError):
    """A zero-shot data file that cannot be read as its task's format."""


def _build(where: str, make: Callable[[], MultipleChoiceItem]) -> MultipleChoiceItem:
    try:
        return make()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise ZeroShotDataError(f"{where}: {type(err).__name__}: {err}") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ZeroShotDataError(f"{path} cannot be read: {err}") from err


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, object) for every non-empty line."""
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise ZeroShotDataError(f"{where}: not a JSON line: {err}") from err


def _json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ZeroShotDataError(f"{path}: not valid JSON: {err}") from err


def _labels(path: Path, allowed: tuple[str, ...], count: int, of: Path) -> list[str]:
    """A label file: one label a line, aligned with the `count` items of `of`."""
    labels = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(labels) != count:
        raise ZeroShotDataError(
            f"{path} has {len(labels)} labels but {of} has {count} items; they must align"
        )
    for number, label in enumerate(labels, 1):
        if label not in allowed:
            raise ZeroShotDataError(f"{path}:{number}: label {label!r}, expected one of {list(allowed)}")
    return labels


def read_arc(path: Path) -> list[MultipleChoiceItem]:
    """ARC JSONL: `question.stem`, `question.choices[].{text,label}`, `answerKey` (a letter or a digit)."""

    def item(obj: dict) -> MultipleChoiceItem:
        choices = obj["question"]["choices"]
        labels = [c["label"] for c in choices]
        if obj["answerKey"] not in labels:
            raise ValueError(f"answerKey {obj['answerKey']!r} is not one of the choice labels {labels}")
        return prompts.arc(
            obj["question"]["stem"], [c["text"] for c in choices], labels.index(obj["answerKey"])
        )

    return [_build(where, lambda o=obj: item(o)) for where, obj in _jsonl(path)]


def read_piqa(path: Path, labels_path: Path) -> list[MultipleChoiceItem]:
    """PIQA JSONL (`goal`, `sol1`, `sol2`) with its label list (0: sol1, 1: sol2)."""
    rows = list(_jsonl(path))
    labels = _labels(labels_path, ("0", "1"), len(rows), path)
    return [
        _build(where, lambda o=obj, g=int(label): prompts.piqa(o["goal"], [o["sol1"], o["sol2"]], g))
        for (where, obj), label in zip(rows, labels, strict=True)
    ]


def read_boolq(path: Path) -> list[MultipleChoiceItem]:
    """SuperGLUE BoolQ JSONL (`passage`, `question`, `label`); the label is the string "true"/"false" in the
    local copy (a JSON boolean is accepted too)."""

    def item(obj: dict) -> MultipleChoiceItem:
        label = obj["label"]
        if isinstance(label, bool):
            return prompts.boolq(obj["passage"], obj["question"], label)
        if label not in ("true", "false"):
            raise ValueError(f"label {label!r}, expected 'true' or 'false'")
        return prompts.boolq(obj["passage"], obj["question"], label == "true")

    return [_build(where, lambda o=obj: item(o)) for where, obj in _jsonl(path)]


_OBQA_CHOICES = re.compile(r"\(A\) (.*) \(B\) (.*) \(C\) (.*) \(D\) (.*)", re.DOTALL)
_OBQA_HEADER = ["ID", "Question Stem", "Choices", "Complete Question", "Answer Key"]


def read_openbookqa(path: Path) -> list[MultipleChoiceItem]:
    """The OpenBookQA release TSV: `Question Stem`, `Choices` ("(A) .. (B) .. (C) .. (D) .."),
    `Answer Key`."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or rows[0] != _OBQA_HEADER:
        raise ZeroShotDataError(f"{path}: header {rows[0] if rows else None}, expected {_OBQA_HEADER}")

    def item(row: list[str]) -> MultipleChoiceItem:
        if len(row) != len(_OBQA_HEADER):
            raise ValueError(f"{len(row)} fields, expected {len(_OBQA_HEADER)}")
        match = _OBQA_CHOICES.fullmatch(row[2])
        if match is None:
            raise ValueError(f"choices {row[2]!r} are not '(A) .. (B) .. (C) .. (D) ..'")
        key = row[4].strip()
        if key not in prompts.LETTERS:
            raise ValueError(f"answer key {row[4]!r}, expected A-D")
        return prompts.openbookqa(row[1], list(match.groups()), prompts.LETTERS.index(key))

    return [_build(f"{path}:{number}", lambda r=row: item(r)) for number, row in enumerate(rows[1:], 2)]


def read_hellaswag(path: Path) -> list[MultipleChoiceItem]:
    """llama.cpp's HellaSwag text: 6 lines a task (context, gold index 0-3, four endings)."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ZeroShotDataError(f"{path} has {len(lines)} lines, not a multiple of 6 (6 lines per task)")

    def item(block: list[str]) -> MultipleChoiceItem:
        if block[1].strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"gold line {block[1]!r}, expected 0-3")
        return prompts.hellaswag(block[0], block[2:6], int(block[1]))

    return [
        _build(f"{path}:{start + 1}", lambda b=lines[start : start + 6]: item(b))
        for start in range(0, len(lines), 6)
    ]


_WINOGRANDE = re.compile(
    r"Please choose the correct answer to fill in the blank to complete the given sentence: (?P<sentence>.*)"
    r"\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*) Answer format: option1/option2",
    re.DOTALL,
)


def read_winogrande(path: Path, labels_path: Path) -> list[MultipleChoiceItem]:
    """LLM-Adapters' WinoGrande JSON (sentence and options parsed back out of `instruction`) with the original
    label list (1 or 2), which must agree with each item's `answer`."""
    data = _json(path)
    if not isinstance(data, list):
        raise ZeroShotDataError(f"{path} holds a {type(data).__name__}, expected a JSON list")
    labels = _labels(labels_path, ("1", "2"), len(data), path)

    def item(obj: dict, label: str) -> MultipleChoiceItem:
        match = _WINOGRANDE.fullmatch(obj["instruction"])
        if match is None:
            raise ValueError("instruction is not LLM-Adapters' WinoGrande template")
        if obj["answer"] != f"option{label}":
            raise ValueError(f"answer {obj['answer']!r} disagrees with label {label} of {labels_path}")
        if match["sentence"].count("_") != 1:
            raise ValueError(f"sentence {match['sentence']!r} must hold exactly one blank '_'")
        return prompts.winogrande(match["sentence"], [match["option1"], match["option2"]], int(label) - 1)

    return [
        _build(f"{path}: item {i}", lambda o=obj, lab=label: item(o, lab))
        for i, (obj, label) in enumerate(zip(data, labels, strict=True))
    ]


def read_mmlu(folder: Path) -> list[MultipleChoiceItem]:
    """hendrycks MMLU CSVs `<subject>_test.csv` (no header; question, A, B, C, D, answer letter), subjects in
    sorted file-name order, rows in file order."""
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise ZeroShotDataError(f"{folder} holds no <subject>_test.csv files")
    items = []
    for path in files:
        subject = path.name.removesuffix("_test.csv")
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        items += [
            _build(f"{path}: record {n}", lambda r=row, s=subject: _mmlu_item(s, r))
            for n, row in enumerate(rows, 1)
        ]
    return items


def _mmlu_item(subject: str, row: list[str]) -> MultipleChoiceItem:
    if len(row) != 6 or row[5] not in prompts.LETTERS:
        raise ValueError(f"{len(row)} fields ending {row[-1:]!r}; expected question, A, B, C, D, answer A-D")
    return prompts.mmlu(subject, row[0], row[1:5], prompts.LETTERS.index(row[5]))


def read_truthfulqa_mc1(path: Path) -> list[MultipleChoiceItem]:
    """TruthfulQA's `mc_task.json`: `question` and `mc1_targets` ({answer: 1 for the one true answer,
    else 0})."""
    data = _json(path)
    if not isinstance(data, list):
        raise ZeroShotDataError(f"{path} holds a {type(data).__name__}, expected a JSON list")

    def item(obj: dict) -> MultipleChoiceItem:
        targets = obj["mc1_targets"]
        marks = list(targets.values())
        if sorted(set(marks)) != [0, 1] or marks.count(1) != 1:
            raise ValueError(f"mc1_targets marks {marks}: expected exactly one 1 among 0s")
        return prompts.truthfulqa_mc1(obj["question"], list(targets), marks.index(1))

    return [_build(f"{path}: item {i}", lambda o=obj: item(o)) for i, obj in enumerate(data)]
