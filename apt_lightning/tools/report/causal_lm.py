"""The report's causal-LM parts: generation speed against the dense model, and zero-shot accuracy (the
average over tasks against the LoRA reference, then per task against chance), with their definitions.
Classifier suites have neither (no ``zero_shot.json``, no generation numbers), so nothing here renders."""

from __future__ import annotations

import statistics
from pathlib import Path

from apt_lightning.tools.report.summary import ratio
from apt_lightning.tools.suite.layout import DENSE_DIR, read_json

BACKBONE_GLOB = "zero_shot_*.json"  # the suite phase's cache of the untuned backbone's scores (_dense/)
PAPER_SHARE = 86.4  # % of the LoRA-tuned dense LLaMA-7B's average zero-shot accuracy APT keeps (the paper)


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, spec)}{suffix}"


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _mean_sd(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "–"
    spread = f" ± {100 * sd:.2f}" if sd is not None else ""
    return f"{100 * mean:.2f}{spread} (n={n})"


def zero_shot_reference(meta: dict, rows: list[dict]) -> str | None:
    """The variant whose average zero-shot accuracy is 100%: the suite's `evaluation.reference` (null:
    none), else a variant named lora."""
    evaluation = meta.get("evaluation") or {}
    if "reference" in evaluation:
        return evaluation["reference"]
    return "lora" if any(r["variant"] == "lora" for r in rows) else None


def is_causal_task(rows: list[dict]) -> bool:
    """Whether the summary rows of one task are a causal LM's (generation numbers or zero-shot scores)."""
    return any(s.get("inf_kind") == "causal-lm" or s.get("zs_n") for s in rows)


def generation_table(rows: list[dict]) -> list[str]:
    """The exported causal LMs timed generating against the dense model (one row per variant)."""
    lines = [
        "Inference of the exported model (adapters merged, pruned blocks removed) generating, against the "
        "dense model:",
        "",
        "| variant | params / dense | prefill tok/s | prefill speedup | decode tok/s | decode speedup "
        "| peak mem (MB) | mem / dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        cells = [
            s["variant"],
            _f(s["inf_params_ratio"], ".2f"),
            _f(s.get("inf_prefill_tokens_per_s"), ".0f"),
            _f(s.get("inf_prefill_speedup"), ".2f", "x"),
            _f(s.get("inf_decode_tokens_per_s"), ".0f"),
            _f(s.get("inf_decode_speedup"), ".2f", "x"),
            _f(s["inf_peak_mb"], ".0f"),
            _f(s["inf_memory_ratio"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def backbone_scores(suite_dir: Path) -> list[dict]:
    """The untuned backbones' zero-shot results the suite cached (`tools.suite.evaluation`)."""
    return [r for r in (read_json(p) for p in sorted((suite_dir / DENSE_DIR).glob(BACKBONE_GLOB))) if r]


def _task_means(results: list[dict], task: str, key: str) -> float | None:
    values = [((r.get("tasks") or {}).get(task) or {}).get(key) for r in results]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def zero_shot_section(
    summary: list[dict], rows: list[dict], tasks: list[str], reference: str | None, suite_dir: Path
) -> list[str]:
    """`## Zero-shot accuracy`: per suite task, the variants' averages (mean ± std over seeds, % of the
    reference), eval loss and perplexity, then accuracy per zero-shot task against chance."""
    scored = [t for t in tasks if any(s["task_key"] == t and s.get("zs_n") for s in summary)]
    if not scored:
        return []
    ref = reference or "the reference"
    backbones = backbone_scores(suite_dir)
    lines = ["## Zero-shot accuracy", ""]
    for task in scored:
        group = [s for s in summary if s["task_key"] == task and s.get("zs_n")]
        label = group[0]["task_label"]
        lines += [
            f"### {label}",
            "",
            f"Average over the zero-shot tasks, mean ± std over seeds; % of {ref} = the variant's mean / "
            f"`{ref}`'s (the bar from the paper's LLaMA-7B result: APT keeps {PAPER_SHARE}% of the "
            "LoRA-tuned dense model's average).",
            "",
            f"| variant | avg acc (%) | % of {ref} | avg acc_norm (%) | % of {ref} (norm) "
            "| above chance (pts) | eval loss | perplexity | sparsity |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in group:
            above = None if s["zs_chance"] is None else 100 * (s["zs_acc_mean"] - s["zs_chance"])
            cells = [
                s["variant"],
                _mean_sd(s["zs_acc_mean"], s["zs_acc_std"], s["zs_n"]),
                _f(s["zs_pct_of_ref"], ".1f"),
                _mean_sd(s["zs_acc_norm_mean"], s["zs_acc_norm_std"], s["zs_n"]),
                _f(s["zs_norm_pct_of_ref"], ".1f"),
                _f(above, "+.1f"),
                _f(s["metric_mean"], ".4f") if s.get("mode") == "min" else "–",
                _f(s.get("perplexity_mean"), ".2f"),
                _f(s["sparsity"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        ref_row = next((s for s in group if s["variant"] == reference), None)
        for b in backbones:
            avg = b.get("average") or {}
            share = None if ref_row is None else ratio(avg.get("acc"), ref_row["zs_acc_mean"])
            norm_share = None if ref_row is None else ratio(avg.get("acc_norm"), ref_row["zs_acc_norm_mean"])
            chance = avg.get("chance")
            cells = [
                f"`{b.get('backbone')}` (untuned)",
                _f(_pct(avg.get("acc")), ".2f"),
                _f(_pct(share), ".1f"),
                _f(_pct(avg.get("acc_norm")), ".2f"),
                _f(_pct(norm_share), ".1f"),
                _f(None if chance is None or avg.get("acc") is None else 100 * (avg["acc"] - chance), "+.1f"),
                "–",
                "–",
                "0.00",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *_per_task(rows, task, [s["variant"] for s in group], backbones)]
    return lines


def _per_task(rows: list[dict], task: str, order: list[str], backbones: list[dict]) -> list[str]:
    """acc and acc_norm per zero-shot task (%, mean over seeds, ± the items' standard error), the chance
    level and the number of items; acc's distance from chance in points."""
    runs = [r for r in rows if r["task_key"] == task and r["status"] == "done" and r["_zero_shot"]]
    names = list(dict.fromkeys(n for r in runs for n in r["_zero_shot"].get("tasks") or {}))
    if not names:
        return []
    groups: dict[str, list[dict]] = {v: [r["_zero_shot"] for r in runs if r["variant"] == v] for v in order}
    for b in backbones:
        groups[f"`{b.get('backbone')}` (untuned)"] = [b]
    every = [z for results in groups.values() for z in results]
    lines = []
    titles = {"acc": "acc (%) ± standard error over items (points above chance)", "acc_norm": "acc_norm (%)"}
    for key, title in titles.items():
        lines += [
            f"Per task, {title}:",
            "",
            "| variant | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
            "| chance | "
            + " | ".join(_f(_pct(_task_means(every, n, "chance")), ".1f") for n in names)
            + " |",
            "| n (items) | " + " | ".join(_f(_task_means(every, n, "n"), ".0f") for n in names) + " |",
        ]
        for variant, results in groups.items():
            cells = []
            for n in names:
                value, err = _task_means(results, n, key), _task_means(results, n, f"{key}_stderr")
                chance = _task_means(results, n, "chance")
                cell = _f(_pct(value), ".1f") + (f" ±{100 * err:.1f}" if err is not None else "")
                if key == "acc" and value is not None and chance is not None:
                    cell += f" ({100 * (value - chance):+.1f})"
                cells.append(cell)
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def definitions(bench: dict | None, evaluation: dict | None, reference: str | None) -> list[str]:
    """The causal-LM bullets of "What the numbers are"."""
    shape = (
        f"batch {bench.get('batch_size')}, a random prompt of {bench.get('prompt_len')} tokens, then "
        f"{bench.get('new_tokens')} greedy decode steps through a {bench.get('kv_cache')} KV cache"
        + (
            ", the prefill pass and one decode step each replayed as a CUDA graph"
            if bench.get("cuda_graphs")
            else ""
        )
        if bench
        else "the suite's generation settings"
    )
    limit = (evaluation or {}).get("limit")
    return [
        "- **eval loss** (causal LMs): the best (lowest) validation loss at the final structure, the "
        "next-token cross-entropy averaged over every response token of the held-out set; **perplexity** = "
        "exp(that eval loss). TTA for this lower-is-better metric: the time until the eval loss first got "
        "down to the FT run's best loss / 0.97 (at most 3.1% above it).",
        "- **generation** (causal LMs): the exported model timed by `apt_lightning.tools.bench."
        f"generation_benchmark` at {shape}, against the unpruned architecture measured the same way. "
        "Prefill tok/s = prompt tokens of a batch / median time of the prompt's forward pass; decode tok/s "
        "= generated tokens / median time of the decode loop; peak mem = weights + KV cache + activations.",
        "- **zero-shot** (causal LMs): `apt-eval` on the exported model: each choice of a multiple-choice "
        "item scored by its summed log-likelihood after the prompt; **acc** picks the largest, **acc_norm** "
        "the largest per character of the choice (lm-eval-harness's definitions); chance = the mean of "
        "1 / number of choices; ± = the standard error of the mean over items; the average is unweighted "
        "over tasks"
        + (f", on the first {limit} items of each task" if limit else "")
        + f". **% of {reference or 'the reference'}**: the average acc as a share of that variant's.",
    ]
