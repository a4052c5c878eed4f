"""The ablation report: every run of a suite folder into `runs.csv`, `results.csv`, `RESULTS.md` and plots.

Usage: ``apt-ablate report SUITE_DIR`` or ``python -m apt_lightning.tools.report SUITE_DIR``.

Reads the run folders (`collect`, through `apt_lightning.tools.suite.layout`) and the suite folder's
``suite.json`` (descriptions, the FT reference variant); missing pieces leave blanks.

Outputs, each written atomically: ``runs.csv`` (one row per run), ``results.csv`` (one row per variant
and task: mean, spread and ratios), ``RESULTS.md`` (readable on its own), ``metric_vs_sparsity.png``,
``metric_vs_speedup.png``, ``metric_vs_time.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apt_lightning.files import write_text_atomic
from apt_lightning.tools.report.causal_lm import zero_shot_reference
from apt_lightning.tools.report.collect import RUN_FIELDS, collect_runs
from apt_lightning.tools.report.markdown import csv_text, render_markdown, variant_order
from apt_lightning.tools.report.plots import write_plots
from apt_lightning.tools.report.summary import RESULT_FIELDS, add_tta, summarize
from apt_lightning.tools.suite.layout import RESULTS_CSV, RESULTS_MD, RUNS_CSV, SUITE_META, read_json


def write_report(suite_dir: str | Path) -> Path:
    """Write runs.csv, results.csv, RESULTS.md and the plots into `suite_dir`; return the RESULTS.md path."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise FileNotFoundError(f"suite folder {suite_dir} not found")
    meta = read_json(suite_dir / SUITE_META) or {}
    rows = collect_runs(suite_dir)
    reference = meta.get("reference")
    if reference is None and any(r["variant"] == "ft" for r in rows):
        reference = meta["reference"] = "ft"
    add_tta(rows, reference)
    order = variant_order(meta, rows)
    meta["zero_shot_reference"] = zero_shot_reference(meta, rows)
    summary = summarize(rows, reference, order, meta["zero_shot_reference"])
    write_text_atomic(suite_dir / RUNS_CSV, csv_text(rows, RUN_FIELDS))
    write_text_atomic(suite_dir / RESULTS_CSV, csv_text(summary, RESULT_FIELDS))
    tasks = list(dict.fromkeys([*(meta.get("tasks") or {}), *(r["task_key"] for r in rows)]))
    plots = write_plots(rows, summary, tasks, order, reference, suite_dir) if rows else []
    out = suite_dir / RESULTS_MD
    write_text_atomic(out, render_markdown(suite_dir, meta, rows, summary, plots))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m apt_lightning.tools.report SUITE_DIR` (also `apt-ablate report SUITE_DIR`)."""
    parser = argparse.ArgumentParser(prog="apt-ablate report", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite_dir", help="the output folder of an apt-ablate suite")
    args = parser.parse_args(argv)
    if not Path(args.suite_dir).is_dir():
        parser.error(f"suite folder {args.suite_dir} not found")
    print(f"report: {write_report(args.suite_dir)}")
