"""The run folder: the one place that names the files a suite's runs are written to and read from.

Each run lives in ``<output_dir>/<variant>/<task>/seed<N>/``: ``config.yaml`` (exactly what apt-fit
got), ``run.json`` (what the run is, how to rerun it), ``train.lock`` (who trains it: the claiming
apt-ablate process, its worker and the worker's GPUs; see `tools.suite.lock`), ``train.log``, ``logs/``
(metrics.csv, pruning.json, efficiency.json), ``final.ckpt``, then ``done.json`` (written atomically
when training succeeded, the worker's last write: finished runs are skipped next time, and done wins
over any failed.json) or ``failed.json`` (exit code and log tail; retried next time), and
``inference.json`` (the exported model against the dense one, measured after all training so no run
shares the device with a benchmark). A causal-LM run also gets ``export/`` (its exported model, from
``final.ckpt``) and ``zero_shot.json`` (apt-eval's accuracies of that export; ``zero_shot_failed.json``
when it failed). With a validation split carved from the training data (``data.init_args.val_from_train``),
``selection/`` holds the checkpoint chosen on it until the worker has tested it on the official dev set;
done.json then carries the test numbers. The suite folder holds ``suite.json`` (what the report needs to
describe the suite), ``_dense/`` (the dense models' measurements and zero-shot scores) and the report's files.

The training side (`train`, `inference`, `relabel`) writes these files and the report reads them, all
through the names and readers here. The ``logs/`` files are written by the library (EfficiencyMonitor,
AdaptivePruning, Lightning's CSVLogger); their names are repeated here because the library never imports
the tools.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_lightning.callbacks.efficiency import best_metric as best_of_history

# a run folder
DONE, FAILED, INFERENCE, BENCH_FAILED = "done.json", "failed.json", "inference.json", "inference_failed.json"
RUN_META, CONFIG = "run.json", "config.yaml"
ZERO_SHOT, EVAL_FAILED, EVAL_LOG, EXPORT_DIR = (
    "zero_shot.json",
    "zero_shot_failed.json",
    "zero_shot.log",
    "export",
)
LOG_DIR, TRAIN_LOG, FINAL_CKPT, LOCK = "logs", "train.log", "final.ckpt", "train.lock"
SELECTION_DIR = "selection"  # the checkpoint chosen on the carved validation split, until it is tested
# inside LOG_DIR, written by the library's callbacks and Lightning's CSVLogger
EFFICIENCY, PRUNING, METRICS = "efficiency.json", "pruning.json", "metrics.csv"
# the suite folder
SUITE_META, DENSE_DIR = "suite.json", "_dense"
RUNS_CSV, RESULTS_CSV, RESULTS_MD = "runs.csv", "results.csv", "RESULTS.md"
SEED_PREFIX = "seed"


def run_dir_for(output_dir: Path, variant: str, task: str, seed: int) -> Path:
    return output_dir / variant / task / f"{SEED_PREFIX}{seed}"


def run_folders(suite_dir: Path) -> list[Path]:
    """Every run folder under a suite folder (those holding a run.json), in a stable order."""
    return [p.parent for p in sorted(suite_dir.glob(f"*/*/*/{RUN_META}"))]


def seed_folders(variant_dir: Path) -> list[Path]:
    """The run folders of one variant (every task and seed), whatever their status."""
    return sorted(variant_dir.glob(f"*/{SEED_PREFIX}*"))


def seed_of(run_dir: Path) -> str:
    """The seed a run folder's name carries (``seed3`` -> ``"3"``)."""
    return run_dir.name.removeprefix(SEED_PREFIX)


# ---------------------------------------------------------------------- status
def run_status(run_dir: Path) -> str:
    """done | failed | running | pending (running = a live process holds the run's train.lock, or a live
    worker wrote run.json and nothing else yet). done wins over a stale failed.json."""
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    if lock_holder(run_dir) is not None:
        return "running"
    meta = read_json(run_dir / RUN_META)
    if meta and meta.get("pid") and _is_worker(int(meta["pid"]), run_dir):
        return "running"
    return "pending"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None where there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def same_process(pid: int | None, start: str | None) -> bool:
    """Whether `pid` is alive (not a zombie) and, where /proc tells, still the process started at `start`."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(int(pid))
    if fields is None:
        return True  # no /proc: the pid is all there is to go by
    return fields[0] not in ("Z", "X") and (start is None or fields[19] == start)


def lock_holder(run_dir: Path) -> dict | None:
    """The record in the run's train.lock if a process it names is alive (the apt-ablate process that
    claimed the run, or its training worker); None if there is no lock or it is stale. A lock written on
    another machine cannot be checked from here and counts as held."""
    record = read_json(run_dir / LOCK)
    if not record or not record.get("owner"):
        return None
    if record.get("host") not in (None, socket.gethostname()):
        return record
    alive = same_process(record.get("owner"), record.get("owner_start")) or same_process(
        record.get("worker"), record.get("worker_start")
    )
    return record if alive else None


def _is_worker(pid: int, run_dir: Path) -> bool:
    """Whether `pid` is alive and (where /proc tells) a training process of this run folder."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            return str(run_dir) in cmdline.read_text().replace("\0", " ")
        except OSError:
            return False
    return True


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------- the metric a run reports
def number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def logged_metric(log_dir: Path, monitor: str) -> list[tuple[int | None, float]]:
    """(step, value) of every row of the CSVLogger's metrics.csv that holds `monitor` (blank or NaN: none)."""
    path = log_dir / METRICS
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [
            (None if r.get("step") in (None, "") else int(float(r["step"])), number(r[monitor]))
            for r in csv.DictReader(f)
            if r.get(monitor) not in (None, "")
        ]
    return [(s, v) for s, v in rows if v is not None]


def metric_history(
    log_dir: Path, monitor: str, efficiency: dict | None, wall_s: float | None
) -> tuple[list, str]:
    """[(wall_s, step, value)] of every validation, and where it came from: efficiency.json's history, or
    metrics.csv with times interpolated from the training wall time (``estimated``)."""
    history = (efficiency or {}).get("metric_history") or []
    rows = [
        (number(h.get("wall_s")), h.get("step"), number(h.get("metric")))
        for h in history
        if isinstance(h, dict)
    ]
    rows = [r for r in rows if r[0] is not None and r[2] is not None]
    if rows:
        return rows, EFFICIENCY
    points = [(s, v) for s, v in logged_metric(log_dir, monitor) if s is not None]
    if not points:
        return [], "none"
    last = max(s for s, _ in points) or 1
    scale = (wall_s or 0.0) / last
    return [(s * scale if wall_s else None, s, v) for s, v in points], f"{METRICS} (times estimated)"


def best_metric(
    efficiency: dict | None, done: dict | None, values: Sequence[float], mode: str = "max"
) -> float | None:
    """A run's best dev metric: the EfficiencyMonitor's (over the validations at the final structure; None
    when there was none), else done.json's, else the best of `values` (the validation history; `mode` max:
    higher is better, min: lower, e.g. a loss)."""
    if efficiency and efficiency.get("metric_history"):
        return number(efficiency.get("best_metric"))
    for record in (efficiency, done):
        best = number((record or {}).get("best_metric"))
        if best is not None:
            return best
    return best_of_history([{"metric": v} for v in values], mode)


def metric_mode(meta: dict | None, efficiency: dict | None) -> str:
    """Whether a run's monitored metric is better higher (max) or lower (min): run.json's record, else
    efficiency.json's, else max (the classification metrics of runs recorded before modes were)."""
    for record in (meta, efficiency):
        mode = (record or {}).get("mode")
        if mode in ("max", "min"):
            return mode
    return "max"
