"""Collecting a suite folder: one `runs.csv` row per run folder (blanks where a file is missing).

Inputs (per run folder, `apt_lightning.tools.suite.layout`): ``run.json`` (what the run is),
``done.json`` / ``failed.json`` (status; the test metric of the checkpoint selected on a carved validation
split), ``logs/efficiency.json`` (EfficiencyMonitor: memory, step time,
metric history, pruning overhead), ``logs/pruning.json`` (AdaptivePruning events), ``logs/metrics.csv``
(CSVLogger; the fallback for the metric history), ``inference.json`` (the exported model and the dense
model under apt-bench's `benchmark`, or `generation_benchmark` for a causal LM), ``zero_shot.json``
(apt-eval's accuracies of a causal LM's export).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from apt_lightning.callbacks.efficiency import counted
from apt_lightning.tools.report.summary import ratio
from apt_lightning.tools.suite.layout import (
    BENCH_FAILED,
    CONFIG,
    DONE,
    EFFICIENCY,
    FAILED,
    INFERENCE,
    LOG_DIR,
    PRUNING,
    RUN_META,
    ZERO_SHOT,
    best_metric,
    metric_history,
    metric_mode,
    number,
    read_json,
    run_folders,
    seed_of,
)

RUN_FIELDS = [
    "variant",
    "task_key",
    "task",
    "task_label",
    "seed",
    "status",
    "monitor",
    "mode",
    "best_metric",
    "best_over",
    "final_metric",
    "perplexity",
    "test_metric",
    "selected_step",
    "sparsity",
    "sparsity_source",
    "heads_per_layer",
    "neurons_per_layer",
    "hidden",
    "train_wall_s",
    "tta_s",
    "tta_threshold",
    "tta_source",
    "peak_memory_mb",
    "memory_kind",
    "median_step_s",
    "train_samples_per_s",
    "score_s",
    "search_s",
    "compact_s",
    "grow_s",
    "overhead_fraction",
    "inf_samples_per_s",
    "inf_latency_ms",
    "inf_peak_mb",
    "inf_params",
    "dense_samples_per_s",
    "dense_latency_ms",
    "dense_peak_mb",
    "dense_params",
    "inf_speedup",
    "inf_latency_ratio",
    "inf_memory_ratio",
    "inf_params_ratio",
    "inf_round_spread",
    "inf_kind",
    "inf_source",
    "inf_prefill_tokens_per_s",
    "inf_decode_tokens_per_s",
    "dense_prefill_tokens_per_s",
    "dense_decode_tokens_per_s",
    "inf_prefill_speedup",
    "inf_decode_speedup",
    "zs_acc",
    "zs_acc_norm",
    "zs_chance",
    "zs_tasks",
    "device",
    "run_dir",
    "error",
]


def _sparsity(log_dir: Path, efficiency: dict | None, config_text: str) -> tuple[float | None, str]:
    structure = (efficiency or {}).get("structure") or {}
    if number(structure.get("sparsity")) is not None:
        return float(structure["sparsity"]), "efficiency.json structure"
    pruning = read_json(log_dir / PRUNING)
    events = [e for e in (pruning or {}).get("events", []) if number(e.get("achieved_sparsity")) is not None]
    if events:
        return float(events[-1]["achieved_sparsity"]), PRUNING
    if "AdaptivePruning" not in config_text:
        return 0.0, "no pruning"
    return None, "missing"


def _history(efficiency: dict | None) -> list[dict]:
    """efficiency.json's validations, metrics read as numbers (None where missing or not a number)."""
    history = (efficiency or {}).get("metric_history") or []
    return [{**h, "metric": number(h.get("metric"))} for h in history if isinstance(h, dict)]


def best_over(efficiency: dict | None) -> str:
    """Which validations a run's best metric counted (`callbacks.efficiency.counted`: those at the final
    structure, with a metric): "all N", "K of N, steps A-B", "none of N" or "" without a history. Files
    written before the `at_final_structure` flag existed took the best over every validation: "all N"."""
    history = _history(efficiency)
    if not history:
        return ""
    steps = [h.get("step") for h in counted(history)]
    if len(steps) == len(history):
        return f"all {len(history)}"
    if not steps:
        return f"none of {len(history)}"
    return f"{len(steps)} of {len(history)}, steps {steps[0]}-{steps[-1]}"


def perplexity(monitor: str, best: float | None) -> float | None:
    """The validation perplexity of a causal-LM run at the validations its best metric counted: exp(best
    eval loss) when the monitor is val/loss (perplexity is exp(loss) at every validation, so this is the
    lowest perplexity among them), the best metric itself when it is val/perplexity, else None. Not the
    lowest logged one: a validation during pruning, at a wider model, may have the lowest."""
    if best is None:
        return None
    if monitor == "val/loss":
        return math.exp(best)
    return best if monitor == "val/perplexity" else None


def read_run(run_dir: Path) -> dict:
    """One runs.csv row from a run folder (blanks where a file is missing)."""
    meta = read_json(run_dir / RUN_META) or {}
    done, failed = read_json(run_dir / DONE), read_json(run_dir / FAILED)
    status = "done" if done else "failed" if failed else "incomplete"
    # the run's own folder first: done.json's log_dir is the path where it trained (relative to that
    # process's cwd, or on another machine), which for a moved or copied suite names another run's files
    log_dir = run_dir / LOG_DIR
    if not log_dir.is_dir():
        log_dir = Path((done or {}).get("log_dir") or log_dir)
    eff = read_json(log_dir / EFFICIENCY)
    monitor = meta.get("monitor") or (eff or {}).get("monitor") or "val/accuracy"
    config = run_dir / CONFIG
    config_text = config.read_text() if config.is_file() else ""
    wall = number((eff or {}).get("train_wall_s")) or number((done or {}).get("wall_s"))
    history, _ = metric_history(run_dir / LOG_DIR, monitor, eff, wall)
    mode = metric_mode(meta, eff)
    best = best_metric(eff, done, [v for _, _, v in history], mode)
    sparsity, sparsity_source = _sparsity(log_dir, eff, config_text)
    structure = (eff or {}).get("structure") or {}
    overhead = (eff or {}).get("pruning_overhead") or {}
    if not overhead:
        timing = ((read_json(log_dir / PRUNING) or {}).get("timing")) or {}
        overhead = {k: timing.get(k) for k in ("score_s", "search_s", "compact_s")}
    inference = read_json(run_dir / INFERENCE) or {}
    model, dense, e = inference.get("model") or {}, inference.get("dense") or {}, eff or {}
    bench_error = (read_json(run_dir / BENCH_FAILED) or {}).get("error", "")
    zero_shot = read_json(run_dir / ZERO_SHOT) or {}
    average = zero_shot.get("average") or {}
    task = run_dir.parent.name
    row = {
        "variant": meta.get("variant", run_dir.parent.parent.name),
        "task_key": meta.get("task_key", task),
        "task": meta.get("task", task),
        "task_label": meta.get("task_label", task),
        "seed": meta.get("seed", seed_of(run_dir)),
        "status": status,
        "monitor": monitor,
        "mode": mode,
        "best_metric": best,
        "best_over": best_over(eff),
        "final_metric": history[-1][2] if history else (done or {}).get("final_metric"),
        "perplexity": perplexity(monitor, best),
        "test_metric": number((done or {}).get("test_metric")),
        "selected_step": (done or {}).get("selected_step"),
        "sparsity": sparsity,
        "sparsity_source": sparsity_source,
        "heads_per_layer": " ".join(map(str, structure.get("heads_per_layer") or [])),
        "neurons_per_layer": " ".join(map(str, structure.get("neurons_per_layer") or [])),
        "hidden": structure.get("hidden"),
        "train_wall_s": wall,
        "peak_memory_mb": number(e.get("peak_memory_mb")),
        "memory_kind": e.get("memory_kind"),
        "median_step_s": number(e.get("median_step_s")),
        "train_samples_per_s": number(e.get("samples_per_s")),
        "score_s": number(overhead.get("score_s")),
        "search_s": number(overhead.get("search_s")),
        "compact_s": number(overhead.get("compact_s")),
        "grow_s": number(overhead.get("grow_s")),
        "overhead_fraction": number(overhead.get("per_step_fraction")),
        "inf_samples_per_s": number(model.get("samples_per_s")),
        "inf_latency_ms": number(model.get("latency_ms")),
        "inf_peak_mb": number(model.get("peak_mb")),
        "inf_params": number(model.get("params")),
        "dense_samples_per_s": number(dense.get("samples_per_s")),
        "dense_latency_ms": number(dense.get("latency_ms")),
        "dense_peak_mb": number(dense.get("peak_mb")),
        "dense_params": number(dense.get("params")),
        "inf_kind": inference.get("kind") or ("classifier" if inference else None),
        "inf_source": inference.get("source") or ("export" if inference else None),
        "inf_prefill_tokens_per_s": number(model.get("prefill_tokens_per_s")),
        "inf_decode_tokens_per_s": number(model.get("decode_tokens_per_s")),
        "dense_prefill_tokens_per_s": number(dense.get("prefill_tokens_per_s")),
        "dense_decode_tokens_per_s": number(dense.get("decode_tokens_per_s")),
        "zs_acc": number(average.get("acc")),
        "zs_acc_norm": number(average.get("acc_norm")),
        "zs_chance": number(average.get("chance")),
        "zs_tasks": " ".join(zero_shot.get("tasks") or {}),
        "device": e.get("device_name") or (done or {}).get("device"),
        "run_dir": str(run_dir),
        "error": (failed or {}).get("reason") or bench_error,
        "_history": history,
        "_efficiency": eff,
        "_meta": meta,
        "_failed": failed,
        "_done": done,
        "_inference": inference,
        "_zero_shot": zero_shot,
    }
    row["inf_speedup"] = ratio(row["inf_samples_per_s"], row["dense_samples_per_s"])
    row["inf_latency_ratio"] = ratio(row["inf_latency_ms"], row["dense_latency_ms"])
    row["inf_memory_ratio"] = ratio(row["inf_peak_mb"], row["dense_peak_mb"])
    row["inf_params_ratio"] = ratio(row["inf_params"], row["dense_params"])
    row["inf_prefill_speedup"] = ratio(row["inf_prefill_tokens_per_s"], row["dense_prefill_tokens_per_s"])
    row["inf_decode_speedup"] = ratio(row["inf_decode_tokens_per_s"], row["dense_decode_tokens_per_s"])
    rounds = "rounds_decode_tokens_per_s" if row["inf_kind"] == "causal-lm" else "rounds_samples_per_s"
    spreads = [_spread(model.get(rounds)), _spread(dense.get(rounds))]
    row["inf_round_spread"] = max((x for x in spreads if x is not None), default=None)
    return row


def _spread(values: list | None) -> float | None:
    vals = [v for v in (number(x) for x in values or []) if v]
    return (max(vals) - min(vals)) / statistics.median(vals) if len(vals) > 1 else None


def collect_runs(suite_dir: str | Path) -> list[dict]:
    """Every run folder under `suite_dir` (those holding a run.json), in a stable order."""
    return [read_run(run_dir) for run_dir in run_folders(Path(suite_dir))]
