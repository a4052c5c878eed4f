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
