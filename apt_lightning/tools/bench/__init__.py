"""`apt-bench`: inference throughput, latency and peak memory of a pruned model against its dense form.

`protocol` measures encoders (`Runner`, `benchmark`, `measure_all`), `decoder` causal LMs generating
(`DecodeRunner`, `generation_benchmark`, `measure_decoders`), `models` builds what is measured, `reporting`
writes the table, `telemetry` samples GPU clocks, `cli` is the command line.
"""

from apt_lightning.tools.bench.cli import build_parser, main, run_cli
from apt_lightning.tools.bench.decoder import (
    KV_CACHES,
    DecodeRunner,
    generation_benchmark,
    measure_decoders,
)
from apt_lightning.tools.bench.models import PRESETS, is_causal_lm, model_from_config, unpadded_attention
from apt_lightning.tools.bench.protocol import DTYPES, Runner, WorkingMemory, benchmark, measure_all
from apt_lightning.tools.bench.reporting import generation_table, markdown_table

__all__ = [
    "DTYPES",
    "KV_CACHES",
    "PRESETS",
    "DecodeRunner",
    "Runner",
    "WorkingMemory",
    "benchmark",
    "build_parser",
    "generation_benchmark",
    "generation_table",
    "is_causal_lm",
    "main",
    "markdown_table",
    "measure_all",
    "measure_decoders",
    "model_from_config",
    "run_cli",
    "unpadded_attention",
]
