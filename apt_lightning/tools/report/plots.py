"""The report's plots, one panel per task: metric against sparsity, against inference speedup, and against
training wall time (every seed, with the TTA threshold)."""

from __future__ import annotations

import statistics
from pathlib import Path

_SCATTERS = (
    ("metric_vs_sparsity.png", "sparsity", "achieved sparsity (counted encoder parameters removed)"),
    (
        "metric_vs_speedup.png",
        "inf_speedup",
        "inference speedup vs the dense model (samples/s ratio; causal LMs: decode tokens/s)",
    ),
)


def write_plots(
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
                if x is None and xkey == "inf_speedup":  # a causal LM: its decode speedup
                    x = s.get("inf_decode_speedup")
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
