"""Plots written next to a run (matplotlib, no display needed); every file is written atomically."""

from __future__ import annotations

import os
from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_atomic(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_kept_per_layer(record: dict, shapes, path: str | Path) -> None:
    """Bars of kept heads and FFN neurons per layer against the original widths."""
    plt = _figure()
    layers = list(range(len(record["heads_per_layer"])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, kept, full, what in (
        (axes[0], record["heads_per_layer"], shapes.full_heads, "heads"),
        (axes[1], record["neurons_per_layer"], shapes.full_neurons, "FFN neurons"),
    ):
        ax.bar(layers, full, color="#dddddd", label="original")
        ax.bar(layers, kept, color="#3b6ea8", label="kept")
        ax.set_xlabel("layer")
        ax.set_title(f"{what} kept per layer")
    axes[0].legend()
    fig.suptitle(
        f"sparsity {record['achieved_sparsity']:.3f}; hidden {record['hidden_kept']}/{shapes.full_hidden}"
    )
    save_atomic(fig, path)
    plt.close(fig)


def plot_heatmap(
    values,
    rows: list[str],
    columns: list[str],
    path: str | Path,
    title: str,
    colors=None,
    color_label: str = "",
    xlabel: str = "event",
    ylabel: str = "",
    limits: tuple[float, float] | None = None,
) -> Path:
    """A heatmap of `values` (one list per row), each cell annotated with its value when the grid is small.

    `colors` (same shape) colours the cells instead of `values`, e.g. the fraction kept of each layer while
    the annotation shows the count kept; `color_label` names the colour bar; `limits` fixes the colour range
    (default: the data's). Returns `path`."""
    import numpy as np

    plt = _figure()
    shown = np.asarray(values, dtype=float)
    tint = shown if colors is None else np.asarray(colors, dtype=float)
    height = min(12.0, 1.6 + 0.32 * len(rows))
    width = min(16.0, 3.0 + 0.55 * len(columns))
    fig, ax = plt.subplots(figsize=(width, height))
    low, high = limits if limits is not None else (np.nanmin(tint), np.nanmax(tint))
    image = ax.imshow(tint, aspect="auto", cmap="viridis", interpolation="nearest", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, label=color_label)
    ax.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 6 else 0, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=8 if len(rows) > 16 else 10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if shown.size and shown.size <= 400:
        middle = (low + high) / 2
        for (r, c), value in np.ndenumerate(shown):
            text = f"{value:.0f}" if float(value).is_integer() else f"{value:.2g}"
            color = "black" if tint[r, c] > middle else "white"
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(fig, path)
    plt.close(fig)
    return path
