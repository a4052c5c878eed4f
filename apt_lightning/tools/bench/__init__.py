"""`apt-bench`: inference throughput, latency and peak memory of a pruned encoder against its dense form.

`protocol` measures (`Runner`, `benchmark`, `measure_all`), `models` builds what is measured, `reporting`
writes the table, `telemetry` samples GPU clocks, `cli` is the command line.
"""

from apt_lightning.tools.bench.cli import build_parser, main, run_cli
from apt_lightning.tools.bench.models import PRESETS, model_from_config, unpadded_attention
from apt_lightning.tools.bench.protocol import DTYPES, Runner, benchmark, measure_all
from apt_lightning.tools.bench.reporting import markdown_table

__all__ = [
    "DTYPES",
    "PRESETS",
    "Runner",
    "benchmark",
    "build_parser",
    "main",
    "markdown_table",
    "measure_all",
    "model_from_config",
    "run_cli",
    "unpadded_attention",
]
