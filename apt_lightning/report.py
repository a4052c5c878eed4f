"""The ablation report: every run of a suite folder into `runs.csv`, `results.csv`, `RESULTS.md` and plots.

Usage: ``apt-ablate report SUITE_DIR`` or ``python -m apt_lightning.report SUITE_DIR``.

Inputs (per run folder ``<suite_dir>/<variant>/<task>/seed<N>/``, written by `apt_lightning.tools.suite`):
``run.json`` (what the run is), ``done.json`` / ``failed.json`` (status), ``logs/efficiency.json``
(EfficiencyMonitor: memory, step time, metric history, pruning overhead), ``logs/pruning.json``
(AdaptivePruning events), ``logs/metrics.csv`` (CSVLogger; the fallback for the metric history),
``inference.json`` (the exported model and the dense model under `apt_lightning.tools.bench.benchmark`),
and the suite folder's ``suite.json`` (descriptions, the FT reference variant). Missing pieces leave blanks.

Outputs, each written atomically: ``runs.csv`` (one row per run), ``results.csv`` (one row per variant
and task: mean, spread and ratios), ``RESULTS.md`` (readable on its own), ``metric_vs_sparsity.png``,
``metric_vs_speedup.png``, ``metric_vs_time.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from apt_lightning.files import write_text_atomic

TTA_FRACTION = 0.97
FULL_METHOD = "apt"  # the variant each ablation's effect is measured against
RUN_FIELDS = [
    "variant",
    "task_key",
    "task",
    "task_label",
    "seed",
    "status",
    "monitor",
    "best_metric",
    "final_metric",
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
    "device",
    "run_dir",
    "error",
]
RESULT_FIELDS = [
    "variant",
    "task_key",
    "task",
    "task_label",
    "monitor",
    "n",
    "n_failed",
    "seeds",
    "metric_mean",
    "metric_std",
    "metric_min",
    "metric_max",
    "pct_of_ft",
    "sparsity",
    "tta_s",
    "tta_reached",
    "tta_vs_ft",
    "peak_memory_mb",
    "memory_vs_ft",
    "median_step_ms",
    "step_vs_ft",
    "score_search_s",
    "overhead_fraction",
    "inf_samples_per_s",
    "inf_speedup",
    "inf_latency_ms",
    "inf_latency_ratio",
    "inf_peak_mb",
    "inf_memory_ratio",
    "inf_params_ratio",
    "inf_round_spread",
]


# ---------------------------------------------------------------------- reading
def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def metric_history(
    run_dir: Path, monitor: str, efficiency: dict | None, wall_s: float | None
) -> tuple[list, str]:
    """[(wall_s, step, value)] of every validation, and where it came from: efficiency.json's history, or
    metrics.csv with times interpolated from the training wall time (``estimated``)."""
    history = (efficiency or {}).get("metric_history") or []
    rows = [
        (_num(h.get("wall_s")), h.get("step"), _num(h.get("metric"))) for h in history if isinstance(h, dict)
    ]
    rows = [r for r in rows if r[0] is not None and r[2] is not None]
    if rows:
        return rows, "efficiency.json"
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return [], "none"
    with path.open() as f:
        points = [
            (int(float(r["step"])), _num(r[monitor]))
            for r in csv.DictReader(f)
            if r.get(monitor) not in (None, "") and r.get("step") not in (None, "")
        ]
    points = [(s, v) for s, v in points if v is not None]
    if not points:
        return [], "none"
    last = max(s for s, _ in points) or 1
    scale = (wall_s or 0.0) / last
    return [(s * scale if wall_s else None, s, v) for s, v in points], "metrics.csv (times estimated)"


def _sparsity(log_dir: Path, efficiency: dict | None, config_text: str) -> tuple[float | None, str]:
    structure = (efficiency or {}).get("structure") or {}
    if _num(structure.get("sparsity")) is not None:
        return float(structure["sparsity"]), "efficiency.json structure"
    pruning = _json(log_dir / "pruning.json")
    events = [e for e in (pruning or {}).get("events", []) if _num(e.get("achieved_sparsity")) is not None]
    if events:
        return float(events[-1]["achieved_sparsity"]), "pruning.json"
    if "AdaptivePruning" not in config_text:
        return 0.0, "no pruning"
    return None, "missing"


def read_run(run_dir: Path) -> dict:
    """One runs.csv row from a run folder (blanks where a file is missing)."""
    meta = _json(run_dir / "run.json") or {}
    done, failed = _json(run_dir / "done.json"), _json(run_dir / "failed.json")
    status = "done" if done else "failed" if failed else "incomplete"
    log_dir = Path((done or {}).get("log_dir") or run_dir / "logs")
    if not log_dir.is_dir():
        log_dir = run_dir / "logs"
    eff = _json(log_dir / "efficiency.json")
    monitor = meta.get("monitor") or (eff or {}).get("monitor") or "val/accuracy"
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else ""
    wall = _num((eff or {}).get("train_wall_s")) or _num((done or {}).get("wall_s"))
    history, _ = metric_history(run_dir, monitor, eff, wall)
    best = _num((eff or {}).get("best_metric"))
    if best is None:
        best = _num((done or {}).get("best_metric"))
    if best is None and history:
        best = max(v for _, _, v in history)
    sparsity, sparsity_source = _sparsity(log_dir, eff, config_text)
    structure = (eff or {}).get("structure") or {}
    overhead = (eff or {}).get("pruning_overhead") or {}
    if not overhead:
        timing = ((_json(log_dir / "pruning.json") or {}).get("timing")) or {}
        overhead = {k: timing.get(k) for k in ("score_s", "search_s", "compact_s")}
    inference = _json(run_dir / "inference.json") or {}
    model, dense, e = inference.get("model") or {}, inference.get("dense") or {}, eff or {}
    bench_error = (_json(run_dir / "inference_failed.json") or {}).get("error", "")
    task = run_dir.parent.name
    row = {
        "variant": meta.get("variant", run_dir.parent.parent.name),
        "task_key": meta.get("task_key", task),
        "task": meta.get("task", task),
        "task_label": meta.get("task_label", task),
        "seed": meta.get("seed", run_dir.name.removeprefix("seed")),
        "status": status,
        "monitor": monitor,
        "best_metric": best,
        "final_metric": history[-1][2] if history else (done or {}).get("final_metric"),
        "sparsity": sparsity,
        "sparsity_source": sparsity_source,
        "heads_per_layer": " ".join(map(str, structure.get("heads_per_layer") or [])),
        "neurons_per_layer": " ".join(map(str, structure.get("neurons_per_layer") or [])),
        "hidden": structure.get("hidden"),
        "train_wall_s": wall,
        "peak_memory_mb": _num(e.get("peak_memory_mb")),
        "memory_kind": e.get("memory_kind"),
        "median_step_s": _num(e.get("median_step_s")),
        "train_samples_per_s": _num(e.get("samples_per_s")),
        "score_s": _num(overhead.get("score_s")),
        "search_s": _num(overhead.get("search_s")),
        "compact_s": _num(overhead.get("compact_s")),
        "grow_s": _num(overhead.get("grow_s")),
        "overhead_fraction": _num(overhead.get("per_step_fraction")),
        "inf_samples_per_s": _num(model.get("samples_per_s")),
        "inf_latency_ms": _num(model.get("latency_ms")),
        "inf_peak_mb": _num(model.get("peak_mb")),
        "inf_params": _num(model.get("params")),
        "dense_samples_per_s": _num(dense.get("samples_per_s")),
        "dense_latency_ms": _num(dense.get("latency_ms")),
        "dense_peak_mb": _num(dense.get("peak_mb")),
        "dense_params": _num(dense.get("params")),
        "device": e.get("device_name") or (done or {}).get("device"),
        "run_dir": str(run_dir),
        "error": (failed or {}).get("reason") or bench_error,
        "_history": history,
        "_efficiency": eff,
        "_meta": meta,
        "_failed": failed,
        "_done": done,
        "_inference": inference,
    }
    row["inf_speedup"] = _ratio(row["inf_samples_per_s"], row["dense_samples_per_s"])
    row["inf_latency_ratio"] = _ratio(row["inf_latency_ms"], row["dense_latency_ms"])
    row["inf_memory_ratio"] = _ratio(row["inf_peak_mb"], row["dense_peak_mb"])
    row["inf_params_ratio"] = _ratio(row["inf_params"], row["dense_params"])
    spreads = [_spread(model.get("rounds_samples_per_s")), _spread(dense.get("rounds_samples_per_s"))]
    row["inf_round_spread"] = max((x for x in spreads if x is not None), default=None)
    return row


def _spread(values: list | None) -> float | None:
    vals = [v for v in (_num(x) for x in values or []) if v]
    return (max(vals) - min(vals)) / statistics.median(vals) if len(vals) > 1 else None


def collect_runs(suite_dir: str | Path) -> list[dict]:
    """Every run folder under `suite_dir` (those holding a run.json), in a stable order."""
    suite_dir = Path(suite_dir)
    rows = [read_run(p.parent) for p in sorted(suite_dir.glob("*/*/*/run.json"))]
    return rows


# ---------------------------------------------------------------------- numbers
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def time_to_threshold(history: list, threshold: float) -> float | None:
    """Wall seconds of the first validation whose metric reaches `threshold` (None: never reached)."""
    for wall, _, value in history:
        if value is not None and value >= threshold and wall is not None:
            return wall
    return None


def add_tta(rows: list[dict], reference: str | None) -> None:
    """TTA of every run: time to reach 97% of the FT run's best metric of the same task and seed (the FT
    mean of the task when that seed has no FT run); without an FT variant, 97% of the run's own best."""
    ft = {
        (r["task_key"], str(r["seed"])): r["best_metric"]
        for r in rows
        if r["variant"] == reference and r["status"] == "done" and r["best_metric"] is not None
    }
    ft_mean = {}
    for (task, _), value in ft.items():
        ft_mean.setdefault(task, []).append(value)
    ft_mean = {k: statistics.fmean(v) for k, v in ft_mean.items()}
    for r in rows:
        r["tta_s"] = r["tta_threshold"] = None
        r["tta_source"] = ""
        if r["status"] != "done" or not r["_history"]:
            continue
        ref = ft.get((r["task_key"], str(r["seed"])))
        source = f"{TTA_FRACTION:.0%} of FT seed {r['seed']}"
        if ref is None and r["task_key"] in ft_mean:
            ref, source = ft_mean[r["task_key"]], f"{TTA_FRACTION:.0%} of FT mean"
        if ref is None:
            ref, source = r["best_metric"], f"{TTA_FRACTION:.0%} of own best"
        if ref is None:
            continue
        r["tta_threshold"] = TTA_FRACTION * ref
        r["tta_s"] = time_to_threshold(r["_history"], r["tta_threshold"])
        r["tta_source"] = source + ("" if r["tta_s"] is not None else " (not reached)")


def summarize(rows: list[dict], reference: str | None, order: list[str] | None = None) -> list[dict]:
    """results.csv rows: one per variant and task, finished runs only; ratios against the FT variant."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["task_key"]), []).append(r)
    variant_order = list(order or [])
    variant_order += sorted({v for v, _ in groups} - set(variant_order))
    out = []
    keys = sorted(groups, key=lambda k: (k[1], variant_order.index(k[0])))
    for variant, task in keys:
        runs = groups[(variant, task)]
        done = [r for r in runs if r["status"] == "done"]
        metrics = [r["best_metric"] for r in done if r["best_metric"] is not None]
        ttas = [r["tta_s"] for r in done if r["tta_s"] is not None]
        steps = [r["median_step_s"] for r in done if r["median_step_s"] is not None]
        overhead = [
            (r["score_s"] or 0.0) + (r["search_s"] or 0.0)
            for r in done
            if r["score_s"] is not None or r["search_s"] is not None
        ]
        out.append(
            {
                "variant": variant,
                "task_key": task,
                "task": runs[0]["task"],
                "task_label": runs[0]["task_label"],
                "monitor": runs[0]["monitor"],
                "n": len(metrics),
                "n_failed": sum(r["status"] == "failed" for r in runs),
                "seeds": " ".join(str(r["seed"]) for r in done),
                "metric_mean": _mean(metrics),
                "metric_std": _std(metrics),
                "metric_min": min(metrics) if metrics else None,
                "metric_max": max(metrics) if metrics else None,
                "sparsity": _mean(r["sparsity"] for r in done),
                "tta_s": _mean(ttas),
                "tta_reached": f"{len(ttas)}/{len([r for r in done if r['_history']])}",
                "peak_memory_mb": _mean(r["peak_memory_mb"] for r in done),
                "median_step_ms": _mean(s * 1e3 for s in steps) if steps else None,
                "score_search_s": _mean(overhead) if overhead else None,
                "overhead_fraction": _mean(r["overhead_fraction"] for r in done),
                "inf_samples_per_s": _mean(r["inf_samples_per_s"] for r in done),
                "inf_speedup": _mean(r["inf_speedup"] for r in done),
                "inf_latency_ms": _mean(r["inf_latency_ms"] for r in done),
                "inf_latency_ratio": _mean(r["inf_latency_ratio"] for r in done),
                "inf_peak_mb": _mean(r["inf_peak_mb"] for r in done),
                "inf_memory_ratio": _mean(r["inf_memory_ratio"] for r in done),
                "inf_params_ratio": _mean(r["inf_params_ratio"] for r in done),
                "inf_round_spread": max(
                    (r["inf_round_spread"] for r in done if r["inf_round_spread"] is not None), default=None
                ),
            }
        )
    ft = {s["task_key"]: s for s in out if s["variant"] == reference}
    for s in out:
        ref = ft.get(s["task_key"], {})
        s["pct_of_ft"] = _ratio(s["metric_mean"], ref.get("metric_mean"))
        s["pct_of_ft"] = None if s["pct_of_ft"] is None else 100 * s["pct_of_ft"]
        s["tta_vs_ft"] = _ratio(s["tta_s"], ref.get("tta_s"))
        s["memory_vs_ft"] = _ratio(s["peak_memory_mb"], ref.get("peak_memory_mb"))
        s["step_vs_ft"] = _ratio(s["median_step_ms"], ref.get("median_step_ms"))
    return out


# ---------------------------------------------------------------------- writing
def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def _f(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, spec)}{suffix}"


def _metric_cell(s: dict) -> str:
    if s["metric_mean"] is None:
        return "–"
    scale = 100.0 if s["monitor"].endswith(("accuracy", "f1")) else 1.0
    spread = f" ± {s['metric_std'] * scale:.2f}" if s["metric_std"] is not None else ""
    return f"{s['metric_mean'] * scale:.2f}{spread} (n={s['n']})"


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _tables(summary: list[dict], tasks: list[str]) -> list[str]:
    lines: list[str] = []
    for task in tasks:
        rows = [s for s in summary if s["task_key"] == task]
        if not rows:
            continue
        metric = rows[0]["monitor"].removeprefix("val/")
        unit = " (%)" if metric in ("accuracy", "f1") else ""
        lines += [
            f"### {rows[0]['task_label']}",
            "",
            "Task metric and training efficiency:",
            "",
            f"| variant | best dev {metric}{unit}, mean ± std | % of FT | sparsity | TTA (s) | TTA / FT | "
            "reached | peak train mem (MB) | mem / FT | median step (ms) | score+search (s) | of step time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in rows:
            cells = [
                s["variant"],
                _metric_cell(s),
                _f(s["pct_of_ft"], ".1f"),
                _f(s["sparsity"], ".2f"),
                _f(s["tta_s"], ".0f"),
                _f(s["tta_vs_ft"], ".2f", "x"),
                s["tta_reached"],
                _f(s["peak_memory_mb"], ".0f"),
                _f(s["memory_vs_ft"], ".2f", "x"),
                _f(s["median_step_ms"], ".1f"),
                _f(s["score_search_s"], ".2f"),
                _f(_pct(s["overhead_fraction"]), ".1f", "%"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Inference efficiency of the exported model (adapters merged, pruned blocks removed) against "
            "the dense model:",
            "",
            "| variant | params / dense | samples/s | speedup | latency (ms) | latency / dense "
            "| peak mem (MB) | mem / dense |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        jitter = [s["inf_round_spread"] for s in rows if s.get("inf_round_spread") is not None]
        if jitter:
            lines[-2:-2] = [
                f"(Median of back-to-back rounds; rounds of the same model differed by up to "
                f"{100 * max(jitter):.0f}% in throughput.)",
                "",
            ]
        for s in rows:
            cells = [
                s["variant"],
                _f(s["inf_params_ratio"], ".2f"),
                _f(s["inf_samples_per_s"], ".0f"),
                _f(s["inf_speedup"], ".2f", "x"),
                _f(s["inf_latency_ms"], ".1f"),
                _f(s["inf_latency_ratio"], ".2f"),
                _f(s["inf_peak_mb"], ".0f"),
                _f(s["inf_memory_ratio"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


_SCATTERS = (
    ("metric_vs_sparsity.png", "sparsity", "achieved sparsity (counted encoder parameters removed)"),
    ("metric_vs_speedup.png", "inf_speedup", "inference speedup vs the dense model (samples/s ratio)"),
)


def _plots(
    rows: list[dict],
    summary: list[dict],
    tasks: list[str],
    order: list[str],
    reference: str | None,
    out: Path,
) -> list[str]:
    """The three PNGs (one panel per task); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apt_lightning.plots import save_atomic

    tasks = [t for t in tasks if any(s["task_key"] == t and s["metric_mean"] is not None for s in summary)]
    if not tasks:
        return []
    colors = {v: plt.cm.tab20((2 * i) % 20 + (i // 10) % 2) for i, v in enumerate(order)}
    labels = {s["task_key"]: s["task_label"] for s in summary}
    metric = summary[0]["monitor"].removeprefix("val/")

    def panels(title: str):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
        fig.suptitle(title)
        return fig, axes[0]

    written = []
    for name, xkey, xlabel in _SCATTERS:
        fig, axes = panels(f"best dev {metric} (mean ± std over seeds)")
        for ax, task in zip(axes, tasks, strict=True):
            for s in summary:
                if s["task_key"] != task or s["metric_mean"] is None:
                    continue
                x, y = s[xkey], s["metric_mean"]
                if x is None:  # e.g. not benchmarked: still show the FT level
                    if s["variant"] == reference:
                        ax.axhline(y, color="grey", ls="--", lw=1, label=s["variant"])
                    continue
                ax.errorbar(
                    x,
                    y,
                    yerr=s["metric_std"] or 0.0,
                    fmt="o",
                    capsize=3,
                    color=colors[s["variant"]],
                    label=s["variant"],
                )
                ax.annotate(s["variant"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
            ax.set(title=labels[task], xlabel=xlabel, ylabel=f"best dev {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        save_atomic(fig, out / name)
        plt.close(fig)
        written.append(name)

    fig, axes = panels(f"dev {metric} vs training wall time (every seed; dashed: TTA threshold)")
    for ax, task in zip(axes, tasks, strict=True):
        seen: set[str] = set()
        for r in rows:
            if r["task_key"] != task or not r["_history"] or r["_history"][0][0] is None:
                continue
            label = None if r["variant"] in seen else r["variant"]
            seen.add(r["variant"])
            ax.plot(
                [h[0] for h in r["_history"]],
                [h[2] for h in r["_history"]],
                marker=".",
                lw=1.2,
                color=colors[r["variant"]],
                label=label,
                alpha=0.85,
            )
        thresholds = [
            r["tta_threshold"]
            for r in rows
            if r["task_key"] == task and r["variant"] == reference and r["tta_threshold"] is not None
        ]
        if thresholds:
            ax.axhline(statistics.fmean(thresholds), color="grey", ls="--", lw=1)
        ax.set(title=labels[task], xlabel="training wall time (s)", ylabel=f"dev {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    save_atomic(fig, out / "metric_vs_time.png")
    plt.close(fig)
    written.append("metric_vs_time.png")
    return written


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def paper_scores(meta: dict) -> tuple[dict[str, dict[str, float]], str]:
    """{variant: {GLUE task: the paper's score}} from the `paper` key of each variant's overlay, for the
    variants that are their overlay (named after it), and the source the overlays cite."""
    import yaml

    scores: dict[str, dict[str, float]] = {}
    sources = []
    for v in meta.get("variants", []):
        if Path(v.get("overlay") or "").stem != v["name"]:
            continue
        paper = (yaml.safe_load(v.get("overlay_text") or "") or {}).get("paper") or {}
        scores[v["name"]] = {k: float(x) for k, x in paper.items() if k != "source"}
        if paper.get("source") and paper["source"] not in sources:
            sources.append(paper["source"])
    return scores, "; ".join(sources)


def effects(summary: list[dict], meta: dict) -> list[dict]:
    """Each variant's effect against full APT on the same task, in points (100 x the metric difference, as
    GLUE scores are published), beside the paper's, with a verdict. An effect within twice the standard
    deviation of APT's seeds counts as no clear effect; with one APT seed there is no spread to judge by."""
    paper, _ = paper_scores(meta)
    base = {s["task_key"]: s for s in summary if s["variant"] == FULL_METHOD}
    out = []
    for s in summary:
        full = base.get(s["task_key"])
        if s["variant"] in (FULL_METHOD, meta.get("reference")) or not full:
            continue
        if s["metric_mean"] is None or full["metric_mean"] is None:
            continue
        delta = (s["metric_mean"] - full["metric_mean"]) * 100.0
        noise = 2 * full["metric_std"] * 100.0 if full["metric_std"] is not None else None
        ours, theirs = paper.get(s["variant"], {}), paper.get(FULL_METHOD, {})
        task = s.get("task") or s["task_key"]
        paper_delta = ours[task] - theirs[task] if task in ours and task in theirs else None
        clear = None if noise is None else abs(delta) > noise
        if paper_delta is None:
            verdict = "not in the paper's table"
        elif clear is None:
            verdict = "no seed spread to judge by (one APT seed)"
        elif not clear or delta == 0:
            verdict = "no clear effect here"
        elif paper_delta == 0 or (delta > 0) != (paper_delta > 0):
            verdict = "disagrees"
        else:
            verdict = "agrees"
        out.append(
            {
                "variant": s["variant"],
                "task_key": s["task_key"],
                "effect": delta,
                "noise": noise,
                "clear": clear,
                "paper_effect": paper_delta,
                "verdict": verdict,
            }
        )
    return out


def _effects_section(summary: list[dict], meta: dict, tasks: list[str]) -> list[str]:
    rows = effects(summary, meta)
    if not rows:
        return []
    _, source = paper_scores(meta)
    lines = [
        f"## Effects against full APT{f' and in the paper ({source})' if source else ''}",
        "",
        f"Effect = the variant's mean metric minus full APT's (`{FULL_METHOD}`) on the same task, in points "
        "(100 x the difference). "
        "Clear = larger than twice the standard deviation of APT's seeds. The paper's effect is the same "
        "difference of its published scores (its model, data and schedule, not this suite's). Verdict: "
        "agrees / disagrees in direction when the effect here is clear.",
        "",
    ]
    for task in tasks:
        task_rows = [r for r in rows if r["task_key"] == task]
        if not task_rows:
            continue
        label = next(s["task_label"] for s in summary if s["task_key"] == task)
        lines += [
            f"### {label}",
            "",
            "| variant | effect here (pts) | clear | paper's effect (pts) | verdict |",
            "|---|---:|---|---:|---|",
        ]
        for r in task_rows:
            clear = (
                "n/a" if r["clear"] is None else f"{'yes' if r['clear'] else 'no'} (noise {r['noise']:.2f})"
            )
            lines.append(
                f"| {r['variant']} | {r['effect']:+.2f} | {clear} | "
                f"{_f(r['paper_effect'], '+.1f')} | {r['verdict']} |"
            )
        lines.append("")
    return lines


def _variant_sections(meta: dict, rows: list[dict], order: list[str]) -> list[str]:
    variants = {v["name"]: v for v in meta.get("variants", [])}
    suite_file = meta.get("suite_file", "SUITE.yaml")
    lines = ["## Variants", ""]
    for name in order:
        v = variants.get(name, {})
        runs = [r for r in rows if r["variant"] == name]
        desc = v.get("description") or next((r["_meta"].get("description") for r in runs if r["_meta"]), "")
        lines += [f"### {name}", "", (desc or "").strip() or "(no description)", ""]
        if v.get("overlay"):
            lines += [
                f"Overlay `{_rel(v['overlay'])}` on the base recipe `{_rel(v.get('base', ''))}`:",
                "",
                "```yaml",
                (v.get("overlay_text") or "").strip() or "# (empty)",
                "```",
                "",
            ]
        lines += [f"Rerun all its runs: `apt-ablate run {suite_file} --variants {name} --force`.", ""]
        example = next((r for r in runs if r["status"] == "done"), runs[0] if runs else None)
        if example:
            command = (
                example["_meta"].get("fit_command")
                or f"apt-fit fit --config {example['run_dir']}/config.yaml"
            )
            lines += ["One run by hand (its exact config):", "", "```", command, "```", ""]
    return lines


def _definitions(bench: dict | None, inf_device: str | None) -> list[str]:
    at = f" at batch {bench.get('batch_size')}, sequence {bench.get('seq_len')}" if bench else ""
    on = f" on {inf_device}" if inf_device else ""
    return [
        "## What the numbers are",
        "",
        "- **best dev metric**: the best validation value of the task's primary metric over the run's "
        "validation checks; mean ± sample standard deviation over seeds (n = finished seeds). Accuracy "
        "and F1 in %.",
        "- **% of FT**: mean metric / mean metric of the FT reference on the same task.",
        "- **sparsity**: fraction of the counted encoder parameters (heads, FFN neurons, hidden dims; "
        "embeddings and classifier not counted) removed in the final model.",
        f"- **TTA**: training wall seconds until the dev metric first reached {TTA_FRACTION:.0%} of the FT "
        "run's best metric of the same task and seed (the FT mean if that seed has no FT run), read from the "
        "validation history, so it moves in steps of the validation interval; averaged over the seeds that "
        "reached it (**reached** = k/n). **TTA / FT** divides by the FT reference's own TTA.",
        "- **peak train mem**: `torch.cuda.max_memory_allocated` during fit on a GPU (the process's peak "
        "RSS on a CPU). **median step**: median wall time of one optimizer step, the APT callbacks' work "
        "included.",
        "- **score+search**: seconds spent computing block scores and searching the blocks to keep, summed "
        "over training; **of step time**: that total over the summed step time.",
        "- **inference**: the final checkpoint with adapters merged and pruned blocks physically removed, "
        f"timed by `apt_lightning.tools.bench.benchmark` on random token ids{at}{on}, against the unpruned "
        "model of the same backbone and task measured the same way. Speedup = samples/s ratio; latency = "
        "median forward time of one batch; peak mem = weights + activations.",
        "- Runs trained in parallel share one device: training times and memory compare within the suite, "
        "not with a run alone on a device. Inference is measured after all training, one model at a time.",
        "",
    ]


def _runs_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | status | best metric | sparsity | heads kept per layer | train wall (s) | folder |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}/{r['task_key']}/seed{r['seed']} | {r['status']} | "
            f"{_f(r['best_metric'], '.4f')} | {_f(r['sparsity'], '.3f')} | {r['heads_per_layer'] or '–'} | "
            f"{_f(r['train_wall_s'], '.0f')} | `{_rel(r['run_dir'])}` |"
        )
    renamed = [r for r in rows if (r["_meta"] or {}).get("relabelled_from")]
    if renamed:  # variants renamed after a recipe change made their configs those of other names
        lines += [
            "",
            "Relabelled runs (trained under another variant name with the same config; `run.json` "
            "`relabelled_from`): "
            + ", ".join(
                f"{r['variant']}/{r['task_key']}/seed{r['seed']} (was {r['_meta']['relabelled_from']})"
                for r in renamed
            )
            + ".",
        ]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "### Failed runs", ""]
        for r in failed:
            f = r["_failed"] or {}
            tail = "\n".join((f.get("log_tail") or "").splitlines()[-12:])
            lines += [
                f"**{r['variant']}/{r['task_key']}/seed{r['seed']}**: {f.get('reason', '')} "
                f"(exit {f.get('returncode')}); full log `{_rel(r['run_dir'])}/train.log`.",
                "",
                "```",
                tail or "(empty log)",
                "```",
                "",
            ]
    return lines


def render_markdown(
    suite_dir: Path, meta: dict, rows: list[dict], summary: list[dict], plots: list[str]
) -> str:
    """RESULTS.md: tables, plots, definitions, variants, runs and sources."""
    reference = meta.get("reference")
    tasks = list(dict.fromkeys([*(meta.get("tasks") or {}), *(r["task_key"] for r in rows)]))
    order = _variant_order(meta, rows)
    done = [r for r in rows if r["status"] == "done"]
    devices = sorted({str(r["device"]) for r in done if r["device"]})
    versions = next((r["_done"]["versions"] for r in done if (r["_done"] or {}).get("versions")), None)
    bench = meta.get("benchmark") or next(
        (r["_inference"].get("settings") for r in done if r["_inference"]), None
    )
    inf_device = next(
        (
            f"{r['_inference'].get('device_name')} ({r['_inference'].get('dtype')})"
            for r in done
            if r["_inference"]
        ),
        None,
    )
    n_failed = sum(r["status"] == "failed" for r in rows)
    lines = [f"# Ablation results: {meta.get('name') or suite_dir.name}", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    lines += [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `apt-ablate report {_rel(str(suite_dir))}` from "
        f"{len(done)} finished of {len(rows)} runs ({n_failed} failed). Suite file: "
        f"`{meta.get('suite_file', '?')}`; last command: `{meta.get('command', '?')}`.",
        f"Training hardware: {', '.join(devices) or 'unknown'}."
        + (f" Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}." if versions else ""),
        f"Full fine-tuning reference: `{reference}`."
        if reference
        else "No FT reference variant in this suite: % of FT and the ratios to FT are blank; TTA uses each "
        "run's own best metric.",
        "",
        "## Results",
        "",
    ]
    lines += _tables(summary, tasks)
    lines += _effects_section(summary, meta, tasks)
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    lines += _definitions(bench, inf_device)
    lines += _variant_sections(meta, rows, order)
    lines += _runs_section(rows)
    lines += [
        "",
        "## Where the numbers come from",
        "",
        "Each run folder `<variant>/<task>/seed<N>/` holds `config.yaml` (the exact apt-fit config), "
        "`run.json`, `train.log`, `logs/metrics.csv` (CSVLogger), `logs/efficiency.json` (EfficiencyMonitor: "
        "memory, step times, metric history, scoring/search seconds), `logs/pruning.json` (AdaptivePruning "
        "events and achieved sparsity), `done.json` / `failed.json`, and `inference.json` (benchmarks of the "
        "exported and the dense model). `runs.csv` has one row per run with every number above, "
        "`results.csv` one row per variant and task (the tables). Regenerate: "
        f"`apt-ablate report {_rel(str(suite_dir))}`.",
        "",
    ]
    return "\n".join(lines)


def _variant_order(meta: dict, rows: list[dict]) -> list[str]:
    names = [v["name"] for v in meta.get("variants", [])] + [r["variant"] for r in rows]
    return list(dict.fromkeys(names))


def write_report(suite_dir: str | Path) -> Path:
    """Write runs.csv, results.csv, RESULTS.md and the plots into `suite_dir`; return the RESULTS.md path."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise FileNotFoundError(f"suite folder {suite_dir} not found")
    meta = _json(suite_dir / "suite.json") or {}
    rows = collect_runs(suite_dir)
    reference = meta.get("reference")
    if reference is None and any(r["variant"] == "ft" for r in rows):
        reference = meta["reference"] = "ft"
    add_tta(rows, reference)
    order = _variant_order(meta, rows)
    summary = summarize(rows, reference, order)
    write_text_atomic(suite_dir / "runs.csv", _csv_text(rows, RUN_FIELDS))
    write_text_atomic(suite_dir / "results.csv", _csv_text(summary, RESULT_FIELDS))
    tasks = list(dict.fromkeys([*(meta.get("tasks") or {}), *(r["task_key"] for r in rows)]))
    plots = _plots(rows, summary, tasks, order, reference, suite_dir) if rows else []
    out = suite_dir / "RESULTS.md"
    write_text_atomic(out, render_markdown(suite_dir, meta, rows, summary, plots))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m apt_lightning.report SUITE_DIR` (also `apt-ablate report SUITE_DIR`)."""
    parser = argparse.ArgumentParser(prog="apt-ablate report", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite_dir", help="the output folder of an apt-ablate suite")
    args = parser.parse_args(argv)
    if not Path(args.suite_dir).is_dir():
        parser.error(f"suite folder {args.suite_dir} not found")
    print(f"report: {write_report(args.suite_dir)}")


if __name__ == "__main__":
    main()
