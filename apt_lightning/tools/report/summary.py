"""The numbers of a report: TTA of every run, one results.csv row per variant and task (mean, spread and
ratios against the FT reference; for causal LMs the zero-shot accuracy against the LoRA reference and the
generation speed against dense), and each ablation's effect against full APT beside the paper's.

TTA and the best metric are the library's (`apt_lightning.callbacks.efficiency.time_to_accuracy`, through
`apt_lightning.tools.suite.layout.best_metric`), so a run's numbers here are those its EfficiencyMonitor
computes, for a higher-is-better metric (accuracy: `mode` max) and a lower-is-better one (eval loss:
`mode` min) alike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from apt_lightning.callbacks.efficiency import time_to_accuracy, tta_target

TTA_FRACTION = 0.97
FULL_METHOD = "apt"  # the variant each ablation's effect is measured against

RESULT_FIELDS = [
    "variant",
    "task_key",
    "task",
    "task_label",
    "monitor",
    "mode",
    "n",
    "n_failed",
    "seeds",
    "metric_mean",
    "metric_std",
    "metric_min",
    "metric_max",
    "pct_of_ft",
    "pct_of_ft_se",
    "test_n",
    "test_mean",
    "test_std",
    "test_pct_of_ft",
    "test_pct_of_ft_se",
    "val_minus_test",
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
    "inf_kind",
    "inf_source",
    "inf_prefill_tokens_per_s",
    "inf_prefill_speedup",
    "inf_decode_tokens_per_s",
    "inf_decode_speedup",
    "perplexity_mean",
    "zs_n",
    "zs_acc_mean",
    "zs_acc_std",
    "zs_acc_norm_mean",
    "zs_acc_norm_std",
    "zs_chance",
    "zs_pct_of_ref",
    "zs_norm_pct_of_ref",
]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_se(
    mean: float | None, std: float | None, n: int, ref_mean: float | None, ref_std: float | None, ref_n: int
) -> float | None:
    """Standard error of mean / ref_mean, two means over independent seeds (first-order delta method):
    how far a "% of FT" can move with the seeds of either side. None below two seeds on either side or
    for a zero reference."""
    if None in (mean, std, ref_mean, ref_std) or n < 2 or ref_n < 2 or not ref_mean:
        return None
    r = mean / ref_mean
    return math.sqrt(std**2 / n + r**2 * ref_std**2 / ref_n) / abs(ref_mean)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def tta_source(reference: str, mode: str) -> str:
    """How a TTA threshold was set: `fraction` of the reference (max), or the reference / `fraction` (min)."""
    if mode == "min":
        return f"{reference} / {TTA_FRACTION:g}"
    return f"{TTA_FRACTION:.0%} of {reference}"


def add_tta(rows: list[dict], reference: str | None) -> None:
    """TTA of every run: time to reach 97% of the FT run's best metric of the same task and seed (the FT
    mean of the task when that seed has no FT run); without an FT variant, 97% of the run's own best. For a
    lower-is-better metric (`mode` min, eval loss) "reaching" is getting down to the reference / 0.97
    (`tta_target`): at most 3.1% above it."""
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
        mode = r.get("mode") or "max"
        ref = ft.get((r["task_key"], str(r["seed"])))
        source = tta_source(f"FT seed {r['seed']}", mode)
        if ref is None and r["task_key"] in ft_mean:
            ref, source = ft_mean[r["task_key"]], tta_source("FT mean", mode)
        if ref is None:
            ref, source = r["best_metric"], tta_source("own best", mode)
        if ref is None:
            continue
        r["tta_threshold"] = tta_target(ref, TTA_FRACTION, mode)
        timed = [{"wall_s": wall, "metric": value} for wall, _, value in r["_history"] if wall is not None]
        r["tta_s"] = time_to_accuracy(timed, ref, TTA_FRACTION, mode)
        r["tta_source"] = source + ("" if r["tta_s"] is not None else " (not reached)")


def summarize(
    rows: list[dict],
    reference: str | None,
    order: list[str] | None = None,
    zero_shot_reference: str | None = None,
) -> list[dict]:
    """results.csv rows: one per variant and task, finished runs only; ratios against the FT variant, and
    the average zero-shot accuracies against `zero_shot_reference`'s (the dense LoRA model: % of LoRA)."""
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
        tests = [r["test_metric"] for r in done if r.get("test_metric") is not None]
        # (best validation, test) of the runs that have both: a run without a validation at the final
        # structure tests its final model, which its validation did not choose
        selection = [
            (r["best_metric"], r["test_metric"])
            for r in done
            if r["best_metric"] is not None and r.get("test_metric") is not None
        ]
        ttas = [r["tta_s"] for r in done if r["tta_s"] is not None]
        steps = [r["median_step_s"] for r in done if r["median_step_s"] is not None]
        overhead = [
            (r["score_s"] or 0.0) + (r["search_s"] or 0.0)
            for r in done
            if r["score_s"] is not None or r["search_s"] is not None
        ]
        zs = [r["zs_acc"] for r in done if r.get("zs_acc") is not None]
        zs_norm = [r["zs_acc_norm"] for r in done if r.get("zs_acc_norm") is not None]
        # export, or structure:... where `apt-ablate bench --from-structure` timed random weights
        sources = sorted({r["inf_source"] for r in done if r.get("inf_source")})
        out.append(
            {
                "variant": variant,
                "task_key": task,
                "task": runs[0]["task"],
                "task_label": runs[0]["task_label"],
                "monitor": runs[0]["monitor"],
                "mode": runs[0].get("mode") or "max",
                "n": len(metrics),
                "n_failed": sum(r["status"] == "failed" for r in runs),
                "seeds": " ".join(str(r["seed"]) for r in done),
                "metric_mean": _mean(metrics),
                "metric_std": _std(metrics),
                "metric_min": min(metrics) if metrics else None,
                "metric_max": max(metrics) if metrics else None,
                "test_n": len(tests),
                "test_mean": _mean(tests),
                "test_std": _std(tests),
                "val_minus_test": _mean(val - test for val, test in selection),
                "selection_pairs": selection,
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
                "inf_kind": next((r["inf_kind"] for r in done if r.get("inf_kind")), None),
                "inf_source": ", ".join(sources) or None,
                "inf_prefill_tokens_per_s": _mean(r.get("inf_prefill_tokens_per_s") for r in done),
                "inf_prefill_speedup": _mean(r.get("inf_prefill_speedup") for r in done),
                "inf_decode_tokens_per_s": _mean(r.get("inf_decode_tokens_per_s") for r in done),
                "inf_decode_speedup": _mean(r.get("inf_decode_speedup") for r in done),
                "perplexity_mean": _mean(r.get("perplexity") for r in done),
                "zs_n": len(zs),
                "zs_acc_mean": _mean(zs),
                "zs_acc_std": _std(zs),
                "zs_acc_norm_mean": _mean(zs_norm),
                "zs_acc_norm_std": _std(zs_norm),
                "zs_chance": _mean(r.get("zs_chance") for r in done),
            }
        )
    ft = {s["task_key"]: s for s in out if s["variant"] == reference}
    lora = {s["task_key"]: s for s in out if s["variant"] == zero_shot_reference}
    for s in out:
        zs_ref = lora.get(s["task_key"], {})
        for key, pct in (("zs_acc_mean", "zs_pct_of_ref"), ("zs_acc_norm_mean", "zs_norm_pct_of_ref")):
            value = ratio(s[key], zs_ref.get(key))
            s[pct] = None if value is None else 100 * value
        ref = ft.get(s["task_key"], {})
        for key, mean, std, n in (
            ("pct_of_ft", "metric_mean", "metric_std", "n"),
            ("test_pct_of_ft", "test_mean", "test_std", "test_n"),
        ):
            pct = ratio(s[mean], ref.get(mean))
            s[key] = None if pct is None else 100 * pct
            # the reference's own ratio is 1 by definition: no spread
            se = ratio_se(s[mean], s[std], s[n], ref.get(mean), ref.get(std), ref.get(n, 0))
            se = None if s is ref else se
            s[f"{key}_se"] = None if se is None else 100 * se
        s["tta_vs_ft"] = ratio(s["tta_s"], ref.get("tta_s"))
        s["memory_vs_ft"] = ratio(s["peak_memory_mb"], ref.get("peak_memory_mb"))
        s["step_vs_ft"] = ratio(s["median_step_ms"], ref.get("median_step_ms"))
    return out


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    spans: dict[float, list[int]] = {}
    for rank, value in enumerate(sorted(values), start=1):
        spans.setdefault(value, []).append(rank)
    return [statistics.fmean(spans[value]) for value in values]


def rank_correlation(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation of paired values; None for fewer than 3 pairs or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"rank_correlation: {len(xs)} x values against {len(ys)} y values")
    if len(xs) < 3 or len(set(xs)) == 1 or len(set(ys)) == 1:
        return None
    return statistics.correlation(_ranks(xs), _ranks(ys))


def selection_agreement(rows: list[dict]) -> tuple[float | None, int]:
    """How well a task's selection metric ranks its variants as the test set does: the rank correlation of
    the variants' mean best validation value with their mean test value (over the runs with both), and how
    many variants it spans."""
    pairs = [s["selection_pairs"] for s in rows if s.get("selection_pairs")]
    vals = [statistics.fmean(v for v, _ in p) for p in pairs]
    tests = [statistics.fmean(t for _, t in p) for p in pairs]
    return rank_correlation(vals, tests), len(pairs)


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
    deviation of APT's seeds counts as no clear effect; with one APT seed there is no spread to judge by.
    Where both have zero-shot accuracies (causal LMs) the effect is on the average zero-shot accuracy;
    a lower-is-better metric without them (a loss) is compared in its own units, not points."""
    paper, _ = paper_scores(meta)
    base = {s["task_key"]: s for s in summary if s["variant"] == FULL_METHOD}
    out = []
    for s in summary:
        full = base.get(s["task_key"])
        if s["variant"] in (FULL_METHOD, meta.get("reference")) or not full:
            continue
        if s.get("zs_acc_mean") is not None and full.get("zs_acc_mean") is not None:
            metric, mean, full_mean, full_std, scale = (
                "zero-shot average acc",
                s["zs_acc_mean"],
                full["zs_acc_mean"],
                full["zs_acc_std"],
                100.0,
            )
        else:
            metric, mean, full_mean, full_std = (
                s["monitor"],
                s["metric_mean"],
                full["metric_mean"],
                full["metric_std"],
            )
            scale = 1.0 if s.get("mode") == "min" else 100.0
        if mean is None or full_mean is None:
            continue
        delta = (mean - full_mean) * scale
        noise = 2 * full_std * scale if full_std is not None else None
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
                "metric": metric,
                "unit": "pts" if scale == 100.0 else metric,
                "effect": delta,
                "noise": noise,
                "clear": clear,
                "paper_effect": paper_delta,
                "verdict": verdict,
            }
        )
    return out
