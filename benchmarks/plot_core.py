"""Dev-accuracy curves of the core H200 runs (docs/results/core/*/metrics.csv) -> curves.png there.

Usage: python benchmarks/plot_core.py [docs/results/core]
"""

import argparse
import csv
from pathlib import Path

from apt_lightning.plots import _figure, save_atomic

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument(
    "root", nargs="?", default="docs/results/core", help="folder of run folders with metrics.csv"
)
root = Path(parser.parse_args().root)
plt = _figure()
fig, ax = plt.subplots(figsize=(7, 4))
for run in sorted(p for p in root.iterdir() if (p / "metrics.csv").exists()):
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/accuracy")]
    ax.plot([int(r["step"]) for r in rows], [float(r["val/accuracy"]) for r in rows], label=run.name)
ax.set_xlabel("optimizer step")
ax.set_ylabel("SST-2 dev accuracy")
ax.set_ylim(0.75, 0.92)
ax.grid(alpha=0.3)
ax.legend()
ax.set_title("MiniLM-L6, full SST-2, 3 epochs (H200)")
save_atomic(fig, root / "curves.png")
