"""The zero-shot results as JSON and as a Markdown table, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from apt_lightning.evaluation.metrics import ZeroShotResults
from apt_lightning.evaluation.tasks import TASKS
from apt_lightning.files import write_json_atomic, write_text_atomic


def _percent(value: float, stderr: float | None = None) -> str:
    text = f"{100 * value:.1f}"
    if stderr is not None and not math.isnan(stderr):
        text += f" ± {100 * stderr:.1f}"
    return text


def markdown_table(results: ZeroShotResults) -> str:
    """One row per task (items, acc ± s.e., acc_norm ± s.e., chance; in %) and the unweighted average."""
    limit = f", first {results.limit} items per task" if results.limit is not None else ""
    lines = [
        f"Zero-shot accuracy of `{results.model}` (%, ± standard error{limit})",
        "",
        "| task | n | acc | acc_norm | chance |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.tasks.items():
        title = TASKS[name].title if name in TASKS else name
        row = [title, str(r.n), _percent(r.acc, r.acc_stderr), _percent(r.acc_norm, r.acc_norm_stderr)]
        lines.append("| " + " | ".join(row + [_percent(r.chance)]) + " |")
    avg = results.average
    cells = ["**average**", "", _percent(avg["acc"]), _percent(avg["acc_norm"]), _percent(avg["chance"])]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    results: ZeroShotResults, json_path: str | Path | None = None, markdown_path: str | Path | None = None
) -> None:
    """Write the JSON (`ZeroShotResults.to_dict`) and / or the Markdown table, each atomically."""
    if json_path is not None:
        write_json_atomic(json_path, results.to_dict())
    if markdown_path is not None:
        write_text_atomic(markdown_path, markdown_table(results))
