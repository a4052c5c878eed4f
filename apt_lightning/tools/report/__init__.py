"""The ablation report of a suite folder: `runs.csv`, `results.csv`, `RESULTS.md` and plots.

`collect` reads the run folders, `summary` computes the numbers, `markdown` and `plots` render them,
`write` puts them together (`write_report`, ``apt-ablate report``).
"""

from apt_lightning.tools.report.collect import collect_runs, read_run
from apt_lightning.tools.report.summary import add_tta, effects, paper_scores, summarize
from apt_lightning.tools.report.write import main, write_report

__all__ = [
    "add_tta",
    "collect_runs",
    "effects",
    "main",
    "paper_scores",
    "read_run",
    "summarize",
    "write_report",
]
