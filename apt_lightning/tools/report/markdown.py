"""RESULTS.md (readable on its own: tables, effects, plots, definitions, variants, runs, sources) and the
CSV text of runs.csv / results.csv."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import yaml

from apt_lightning.tools.report import causal_lm
from apt_lightning.tools.report.summary import (
    FULL_METHOD,
    TTA_FRACTION,
    effects,
    paper_scores,
    selection_agreement,
)
from apt_lightning.tools.suite.layout import CONFIG, TRAIN_LOG


# ---------------------------------------------------------------------- writing
def csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def _f(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, spec)}{suffix}"


def _scale(monitor: str) -> float:
    """Accuracy and F1 are reported in %, other metrics in their own units."""
    return 100.0 if monitor.endswith(("accuracy", "f1")) else 1.0


def _digits(s: dict) -> int:
    """Decimals of a metric cell: a loss or an unscaled metric differs in the third decimal."""
    return 4 if s.get("mode") == "min" or _scale(s["monitor"]) == 1.0 else 2


def _metric_cell(s: dict) -> str:
    if s["metric_mean"] is None:
        return "–"
    scale, digits = _scale(s["monitor"]), _digits(s)
    spread = f" ± {s['metric_std'] * scale:.{digits}f}" if s["metric_std"] is not None else ""
    return f"{s['metric_mean'] * scale:.{digits}f}{spread} (n={s['n']})"


def _pct_of_ft_cell(pct: float | None, se: float | None) -> str:
    if pct is None or se is None:
        return _f(pct, ".1f")
    return f"{pct:.1f} ± " + (f"{se:.1f}" if se >= 0.05 else "<0.1")  # not "± 0.0": that reads as no spread


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _tables(summary: list[dict], tasks: list[str]) -> list[str]:
    lines: list[str] = []
    for task in tasks:
        rows = [s for s in summary if s["task_key"] == task]
        if not rows:
            continue
        metric = rows[0]["monitor"].removeprefix("val/")
        unit = " (%)" if _scale(metric) == 100.0 else ""
        lower = rows[0].get("mode") == "min"
        if lower:
            unit = " (lower is better)"
        lines += [
            f"### {rows[0]['task_label']}",
            "",
            "Task metric and training efficiency:",
            "",
            f"| variant | best dev {metric}{unit}, mean ± std | {'as % of FT' if lower else '% of FT'} "
            "± s.e. | "
            "sparsity | TTA (s) | TTA / FT | "
            "reached | peak train mem (MB) | mem / FT | median step (ms) | score+search (s) | of step time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in rows:
            cells = [
                s["variant"],
                _metric_cell(s),
                _pct_of_ft_cell(s["pct_of_ft"], s["pct_of_ft_se"]),
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
        lines += _test_table(rows)
        if causal_lm.is_causal_task(rows):
            lines += ["", *causal_lm.generation_table(rows), *_structure_note(rows)]
            continue
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
        lines += ["", *_structure_note(rows)]
    return lines


def _structure_note(rows: list[dict]) -> list[str]:
    """A footnote naming the variants whose inference numbers were timed from recorded structures."""
    marked = [s for s in rows if "structure:" in (s.get("inf_source") or "")]
    if not marked:
        return []
    names = ", ".join(
        s["variant"] + (" (some of its runs)" if "export" in s["inf_source"] else "") for s in marked
    )
    return [
        f"Timed from recorded structures (`apt-ablate bench --from-structure`): {names}. There the timed "
        "model is the run's architecture with random weights at the final widths in its "
        "`logs/pruning.json` (parameter count checked against the log), not its trained export: the same "
        "shapes, so the same timing (docs/bench.md).",
        "",
    ]


def _test_table(rows: list[dict]) -> list[str]:
    """The test metric (official dev set) of the checkpoints selected on the carved validation split, for
    the variants whose runs have one."""
    tested = [s for s in rows if s.get("test_n")]
    if not tested:
        return []
    metric = tested[0]["monitor"].removeprefix("val/")
    scale, digits = _scale(metric), f".{_digits(tested[0])}f"
    lines = [
        "",
        "Test: the official dev set, scoring the checkpoint each run selected on the validation split carved "
        "from its training data (only points at the final structure count); val - test: the runs' best "
        "validation value minus their test value, averaged over the runs with both:",
        "",
        f"| variant | test {metric}, mean ± std | % of FT ± s.e. | val - test |",
        "|---|---:|---:|---:|",
    ]
    for s in tested:
        cell = _metric_cell(
            {**s, "metric_mean": s["test_mean"], "metric_std": s["test_std"], "n": s["test_n"]}
        )
        gap = None if s["val_minus_test"] is None else s["val_minus_test"] * scale
        pct = _pct_of_ft_cell(s["test_pct_of_ft"], s["test_pct_of_ft_se"])
        lines.append(f"| {s['variant']} | {cell} | {pct} | {_f(gap, digits)} |")
    rho, n = selection_agreement(tested)
    if rho is not None:
        lines += [
            "",
            f"Selection against test: the validation means rank these {n} variants with a rank correlation "
            f"(Spearman) of {rho:.2f} to the test means (1: the same order).",
        ]
    return lines


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _effects_section(summary: list[dict], meta: dict, tasks: list[str]) -> list[str]:
    rows = effects(summary, meta)
    if not rows:
        return []
    _, source = paper_scores(meta)
    if not any(r["paper_effect"] is not None for r in rows):  # e.g. a causal-LM suite: no paper ablations
        source = None
    lines = [
        f"## Effects against full APT{f' and in the paper ({source})' if source else ''}",
        "",
        f"Effect = the variant's mean metric minus full APT's (`{FULL_METHOD}`) on the same task: in points "
        "(100 x the difference) for accuracies (causal LMs: their average zero-shot accuracy, where both "
        "have one), in the metric's own units for a loss (lower is better: a positive effect is worse). "
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
            "| variant | effect here | clear | paper's effect (pts) | verdict |",
            "|---|---:|---|---:|---|",
        ]
        for r in task_rows:
            clear = (
                "n/a" if r["clear"] is None else f"{'yes' if r['clear'] else 'no'} (noise {r['noise']:.2f})"
            )
            lines.append(
                f"| {r['variant']} | {r['effect']:+.2f} {r['unit']} | {clear} | "
                f"{_f(r['paper_effect'], '+.1f')} | {r['verdict']} |"
            )
        lines.append("")
    return lines


def _variant_settings(meta: dict) -> dict[str, dict]:
    """Each variant's own `set` in the suite: recorded in suite.json, or (records written before it was)
    read from the suite text suite.json keeps, for the variants of the invocation that wrote that text
    only (a variant kept from an earlier one may have run with other settings)."""
    settings = {v["name"]: v["set"] for v in meta.get("variants", []) if "set" in v}
    latest = {run.split("/")[0] for run in meta.get("runs", [])}
    suite = yaml.safe_load(meta.get("suite_text") or "") or {}
    for v in suite.get("variants") or []:
        name = str(v.get("name")) if isinstance(v, dict) else None
        if name in latest and name not in settings:
            settings[name] = v.get("set") or {}
    return settings


def _variant_sections(meta: dict, rows: list[dict], order: list[str]) -> list[str]:
    variants = {v["name"]: v for v in meta.get("variants", [])}
    settings = _variant_settings(meta)
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
        if settings.get(name):
            lines += [
                "This variant's `set` in the suite (applied over the overlay; a command-line `--set` "
                "overrides it; each run's config.yaml below is what it ran):",
                "",
                "```yaml",
                yaml.safe_dump(settings[name], sort_keys=False).strip(),
                "```",
                "",
            ]
        lines += [f"Rerun all its runs: `apt-ablate run {suite_file} --variants {name} --force`.", ""]
        example = next((r for r in runs if r["status"] == "done"), runs[0] if runs else None)
        if example:
            command = (
                example["_meta"].get("fit_command") or f"apt-fit fit --config {example['run_dir']}/{CONFIG}"
            )
            lines += ["One run by hand (its exact config):", "", "```", command, "```", ""]
    return lines


def _definitions(
    bench: dict | None, inf_device: str | None, classifier: bool = True, causal: list[str] | None = None
) -> list[str]:
    """The bullets of "What the numbers are": the classifier inference bullet when the suite has
    classifiers, the `causal` (causal-LM) bullets when it has causal LMs."""
    at = f" at batch {bench.get('batch_size')}, sequence {bench.get('seq_len')}" if bench else ""
    on = f" on {inf_device}" if inf_device else ""
    lines = [
        "## What the numbers are",
        "",
        "- **best dev metric**: the best validation value of the task's primary metric over the run's "
        "validation checks at the final structure (after the last pruning step; every check for runs "
        "without pruning: docs/method.md section 9), so a wider model seen mid-pruning never counts; the "
        "Runs table says which checks counted (**best over**); mean ± sample standard deviation over "
        "seeds (n = finished seeds). Accuracy and F1 in %.",
        "- **% of FT**: mean metric / mean metric of the FT reference on the same task; **± s.e.**: its "
        "standard error from both sides' seed spreads (first-order delta method, treating the two sides' "
        "seeds as independent; blank for the reference itself and below two seeds on either side). With 2-3 "
        "seeds it is a rough guide: a target within about two s.e. of the value is not resolved by these "
        "seeds.",
        "- **test** (runs whose validation split is carved from the training data): the official dev set's "
        "metric of the checkpoint with the best validation value among those at the final structure; then "
        "*best dev* above is the best value on the carved split. **val - test**: a run's best validation "
        "value minus its test value, averaged over the variant's runs with both (positive: the metric reads "
        "higher on the carved split; it includes the optimism of picking the best of several validations); "
        "**selection against test**: Spearman's rank correlation of the variants' mean validation values "
        "with their mean test values over the same runs (does the carved split order the variants as the dev "
        "set does?).",
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
        *(causal or []),
        "- Runs trained in parallel share one device: training times and memory compare within the suite, "
        "not with a run alone on a device. Inference is measured after all training, one model at a time.",
        "",
    ]
    if not classifier:
        lines.pop(lines.index(next(line for line in lines if line.startswith("- **inference**"))))
    return lines


def _runs_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | status | best metric | best over (validations) | final metric | test metric | sparsity | "
        "heads kept per layer | FFN neurons kept per layer | hidden kept | train wall (s) | folder |",
        "|---|---|---:|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}/{r['task_key']}/seed{r['seed']} | {r['status']} | "
            f"{_f(r['best_metric'], '.4f')} | {r['best_over'] or '–'} | {_f(r['final_metric'], '.4f')} | "
            f"{_f(r.get('test_metric'), '.4f')} | "
            f"{_f(r['sparsity'], '.3f')} | {r['heads_per_layer'] or '–'} | {r['neurons_per_layer'] or '–'} | "
            f"{r['hidden'] or '–'} | {_f(r['train_wall_s'], '.0f')} | `{_rel(r['run_dir'])}` |"
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
                f"(exit {f.get('returncode')}); full log `{_rel(r['run_dir'])}/{TRAIN_LOG}`.",
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
    order = variant_order(meta, rows)
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
    zs_reference = meta.get("zero_shot_reference")
    lines += _tables(summary, tasks)
    lines += causal_lm.zero_shot_section(summary, rows, tasks, zs_reference, suite_dir)
    lines += _effects_section(summary, meta, tasks)
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    by_task = [[s for s in summary if s["task_key"] == t] for t in tasks]
    causal = [causal_lm.is_causal_task(group) for group in by_task if group]
    lines += _definitions(
        bench,
        inf_device,
        classifier=not causal or not all(causal),
        causal=causal_lm.definitions(bench, meta.get("evaluation"), zs_reference) if any(causal) else None,
    )
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


def variant_order(meta: dict, rows: list[dict]) -> list[str]:
    names = [v["name"] for v in meta.get("variants", [])] + [r["variant"] for r in rows]
    return list(dict.fromkeys(names))
