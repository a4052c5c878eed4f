"""`apt-bench`: inference throughput, latency and peak memory of a pruned encoder against its dense form.

The pruned model comes from an exported folder (`--model-dir`), a training checkpoint (`--checkpoint`,
adapters merged and pruned blocks removed), or an architecture pruned here to a target sparsity by the
project's own block search (`--backbone`, `--preset`, `--config-json` with `--sparsity`): budget
`(1 - S)` of the full APT count, scores from a data-free scorer, `select_blocks`, hard masks, compaction.
The dense reference is the same architecture, uncompacted. Inputs are random token ids of `--seq-len`
with a full attention mask, run under `torch.inference_mode`.

How it measures (docs/method.md section 9):
- time: after `warmup` untimed passes per model, each of `repeats` passes is timed on its own, with CUDA
  events on a GPU and `time.perf_counter` on a CPU, the device idle before it; latency is the median.
  Throughput (samples/s) is batch / median time per pass of blocks of passes run back to back (one span
  per block, the device never waiting for the host: what a server sustains): `--block N` passes, or
  `--block-seconds S` (the CUDA default, 0.25 s: sized per model from its single-pass time), or, with
  `--block 0` (the CPU default), of the single passes. Blocks must last long enough for a GPU's clocks to
  settle: at its power limit an H200 runs a dense bf16 encoder at lower clocks than its pruned form, and
  short blocks inherit the clocks the previous model left (docs/bench.md). On CUDA the SM clock and power
  are sampled throughout (`telemetry.ClockSampler`, NVML) and their medians reported per model.
  By default the models take turns (`--order interleaved`: one single pass per model, then one block per
  model, each round), so background load and slow drift hit dense and pruned alike and the speedups stay
  fair; `sequential` runs each model's passes back to back (on CUDA without a synchronisation between them).
- CUDA graphs (`--cuda-graphs`): each model's forward is captured once, at its first pass, and every
  later pass replays it, so the time is the GPU's work alone, not Python's kernel-by-kernel dispatch (which
  bounds small or pruned models at moderate batch sizes: compare `host_ms`, the CPU time to issue one pass
  (an eager forward, or a graph launch), with the latency). Under graphs the model runs its attention
  through an unpadded variant of its own implementation (`unpadded_attention`, left in place afterwards):
  the benchmark's inputs have no padding, and eager mode drops their all-ones mask too, but only after
  checking it on the host, which capture forbids (older transformers then build the full mask, and SDPA
  falls back to its slow math kernel). Every model's graph keeps its own memory pool until its batch size
  is done, so under graphs the models' working memories add up on the device (eager needs the largest).
- torch.compile (`--compile`): each model's forward is compiled by TorchInductor (static shapes, default
  mode), which fuses the per-token, memory-bound work (bias + GELU, residual add + LayerNorm, softmax
  scaling) into generated kernels; the matrix products stay cuBLAS calls. Compilation happens in the
  untimed warm-up; with `--cuda-graphs` the compiled forward is what gets captured.
- fusions (`--fuse qkv gelu`): `fusion.fuse_for_inference` on every model, the dense reference included,
  after pruning and before timing (one Q/K/V product per layer; GELU in the FFN product's epilogue).
- memory: the model's weights (parameter + buffer bytes) plus the peak working memory of the timed passes:
  on CUDA `max_memory_allocated` minus the allocation just before them (other resident models excluded;
  under graphs, the same over the capture: the peak allocated while capturing, which the replays reuse);
  on a CPU the growth of the peak resident set (Linux `VmHWM`, reset through `/proc/self/clear_refs`,
  minus `VmRSS` after `malloc_trim`). CPU numbers are approximate (allocator caches, oneDNN scratch
  buffers) and 'n/a' where the kernel offers no resettable peak.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_lightning.callbacks.efficiency import current_rss_mb, peak_rss_mb, reset_peak_rss
from apt_lightning.files import write_text_atomic
from apt_lightning.fusion import FUSIONS, fuse_for_inference
from apt_lightning.pruning import DATA_FREE_SCORERS as SCORERS
from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure import get_structure, preset_config, preset_names
from apt_lightning.telemetry import ClockSampler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
_CPU_DEFAULTS = (2, 5, 0, 0.0)  # warmup, repeats, block passes, block seconds
# blocks of ~0.25 s: long enough for a GPU's clocks to settle at the level each model sustains (docs/bench.md)
_CUDA_DEFAULTS = (10, 30, 0, 0.25)
_MIN_BLOCK = 10


# ---------------------------------------------------------------------- models
PRESETS = tuple(preset_names())


def config_from_json(path: str | Path, num_labels: int = 2):
    """A transformers config from a config.json file (or a folder holding one); needs `model_type`."""
    from transformers import AutoConfig

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; it must be a transformers config.json")
    if "num_labels" not in data and "id2label" not in data:
        data["num_labels"] = num_labels
    return AutoConfig.for_model(model_type, **data)


def model_from_config(config, attn: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()


def dense_like(model: nn.Module, attn: str = "sdpa") -> nn.Module:
    """The same architecture at full width, random weights: the reference a pruned model is timed against."""
    return model_from_config(copy.deepcopy(model.config), attn)


# ---------------------------------------------------------------------- measuring
def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an RSS baseline is not inflated by earlier runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_seq_len(config) -> int:
    """Longest input the position embeddings allow (RoBERTa-like models offset positions by pad + 1)."""
    limit = int(getattr(config, "max_position_embeddings", 1 << 30))
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(config.pad_token_id or 0) + 1
    return limit


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def unpadded_attention(model: nn.Module) -> str:
    """Switch `model` to an unpadded variant of its attention implementation (the same attention function,
    a mask function that returns None) and return the variant's name. Only for inputs without padding."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    impl = model.config._attn_implementation
    if impl.startswith("unpadded_"):
        return impl
    if impl not in AttentionInterface._global_mapping:  # "eager" lives in each model's own module
        raise ValueError(
            f"attention implementation {impl!r} cannot be captured in a CUDA graph here; "
            f"use one of {sorted(AttentionInterface._global_mapping)} (e.g. sdpa)"
        )
    name = f"unpadded_{impl}"
    AttentionInterface.register(name, AttentionInterface._global_mapping[impl])
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    model.set_attn_implementation(name)
    return name


def _allow_recompiles(limit: int = 256) -> None:
    """Every model and input shape recompiles the same `forward` code, and past Dynamo's limit (8) it would
    silently run eager while the report says compiled: raise the limit and make hitting it an error."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.fail_on_recompile_limit_hit = True


class Runner:
    """One model at one input shape: `warm` runs untimed passes, `timed` timed ones (tracking the peak
    working memory over them), `result` summarises. Separate calls let several models take turns
    (`measure_all`), so on a shared machine each sees the same background load. `cuda_graphs`: time
    replays of one forward captured at the first pass (module docstring). Moves and casts `model` in place
    and, with `cuda_graphs`, switches it to unpadded attention (`unpadded_attention`). `compile_mode`: the
    `torch.compile` mode with `torch_compile` (None: the default mode)."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        seq_len: int,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        seed: int = 0,
        cuda_graphs: bool = False,
        torch_compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if seq_len > max_seq_len(model.config):
            raise ValueError(f"seq_len {seq_len} exceeds the model's {max_seq_len(model.config)} positions")
        self.model, self.batch_size, self.seq_len, self.dtype = model, batch_size, seq_len, dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if cuda_graphs and not self.cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, got device {str(self.device)!r}")
        model.to(device=self.device, dtype=DTYPES[dtype]).eval()
        vocab = int(model.config.vocab_size)
        low = 5 if vocab > 10 else 0  # stay clear of special ids (RoBERTa's padding id shifts positions)
        g = torch.Generator().manual_seed(seed)
        self.inputs = {
            "input_ids": torch.randint(low, vocab, (batch_size, seq_len), generator=g).to(self.device),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=self.device),
        }
        if cuda_graphs:
            del self.inputs["attention_mask"]
            unpadded_attention(model)
        self.cuda_graphs, self.torch_compile = cuda_graphs, torch_compile
        if torch_compile:
            _allow_recompiles()
        # static shapes: one input shape per runner, so dynamic-shape kernels would only cost speed
        self.forward = torch.compile(model, dynamic=False, mode=compile_mode) if torch_compile else model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_output: Any = None
        self.host_times: list[float] = []
        self.weights_mb = _model_bytes(model) / 2**20
        self.times: list[float] = []
        self.block_times: list[float] = []  # seconds per pass, one entry per back-to-back block
        self.block_size = 0
        # host-clock spans of the timed work, to match with clock samples (telemetry.ClockSampler.during)
        self.windows: dict[str, list[tuple[float, float]]] = {"single": [], "blocks": []}
        self.warmup = 0
        self.activation_mb: float | None = None
        self.memory_kind = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss"

    @torch.inference_mode()
    def warm(self, n: int) -> None:
        for _ in range(n):
            self.run_once()
        self.warmup += n

    def run_once(self) -> None:
        """One untimed pass: an eager forward, or a replay of the captured graph (captured on first use)."""
        if self.cuda_graphs and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.forward(**self.inputs)

    def release(self) -> None:
        """Drop the captured graph and its output, so that its memory pool can be freed."""
        self.graph = self.static_output = None

    def _capture(self) -> None:
        """Capture one forward into a CUDA graph; the peak allocated while capturing is the working memory."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # capture needs warmed-up kernels (cuBLAS handles, autotuning)
            for _ in range(3):
                self.forward(**self.inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.forward(**self.inputs)
        torch.cuda.synchronize(dev)
        self.activation_mb = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        self.graph = graph

    def _prepare(self) -> None:
        """Compile and capture outside the timed passes: one extra untimed pass if none ran yet."""
        if self.torch_compile and not (self.warmup or self.times or self.block_times):
            self.warm(1)
        if self.cuda_graphs and self.graph is None:
            self._capture()

    @torch.inference_mode()
    def timed(self, n: int = 1) -> None:
        dev = self.device
        gc.collect(1)  # recent garbage only: a full collection costs ~0.2 s with transformers loaded
        self._prepare()
        if self.cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)
            ]
            t_start = time.perf_counter()
            for start, end in events:
                start.record()
                t0 = time.perf_counter()
                self.run_once()
                self.host_times.append(time.perf_counter() - t0)
                end.record()
            torch.cuda.synchronize(dev)
            self.windows["single"].append((t_start, time.perf_counter()))
            self.times += [start.elapsed_time(end) / 1e3 for start, end in events]
            # replays allocate nothing: the capture measured the working memory
            peak: float | None = None if self.graph else (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        else:
            _malloc_trim()
            base = current_rss_mb()
            tracked = base is not None and reset_peak_rss()
            for _ in range(n):
                t0 = time.perf_counter()
                self.run_once()
                self.times.append(time.perf_counter() - t0)
            peak = max(0.0, peak_rss_mb() - base) if tracked else None
            if not tracked:
                self.memory_kind = "n/a"
        if peak is not None and self.memory_kind != "n/a":
            self.activation_mb = max(self.activation_mb or 0.0, peak)

    @torch.inference_mode()
    def timed_block(self, k: int) -> None:
        """`k` passes back to back timed as one span (sustained throughput); records the span / k. `result`
        also needs single passes (`timed`): latency and memory come from those."""
        if k < 1:
            raise ValueError(f"a block needs k >= 1 passes, got {k}")
        self._prepare()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            t_start = time.perf_counter()
            start.record()
            for _ in range(k):
                self.run_once()
            end.record()
            torch.cuda.synchronize(self.device)
            self.windows["blocks"].append((t_start, time.perf_counter()))
            span = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(k):
                self.run_once()
            span = time.perf_counter() - t0
        self.block_times.append(span / k)
        self.block_size = k

    def passes_for(self, seconds: float) -> int:
        """Passes that fill about `seconds` at the median single-pass time so far (at least 10)."""
        if not self.times:
            raise RuntimeError("no timed passes yet: time single passes before sizing a block")
        return max(_MIN_BLOCK, math.ceil(seconds / statistics.median(self.times)))

    def result(self) -> dict[str, Any]:
        if not self.times:
            raise RuntimeError("no timed passes yet")
        median = statistics.median(self.times)
        per_pass = statistics.median(self.block_times) if self.block_times else median
        act = self.activation_mb if self.memory_kind != "n/a" else None
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "device": str(self.device),
            "samples_per_s": self.batch_size / per_pass,
            "throughput_from": f"blocks of {self.block_size} passes" if self.block_times else "single passes",
            "block_ms_per_pass_all": [t * 1e3 for t in self.block_times],
            "latency_ms": median * 1e3,
            "latency_ms_min": min(self.times) * 1e3,
            "latency_ms_all": [t * 1e3 for t in self.times],
            "host_ms": statistics.median(self.host_times) * 1e3 if self.host_times else None,
            "cuda_graphs": self.cuda_graphs,
            "torch_compile": self.torch_compile,
            "warmup": self.warmup,
            "repeats": len(self.times),
            "weights_mb": self.weights_mb,
            "activation_mb": act,
            "memory_kind": self.memory_kind,
            "peak_mb": None if act is None else self.weights_mb + act,
        }


def benchmark(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    cuda_graphs: bool = False,
    torch_compile: bool = False,
) -> dict[str, Any]:
    """Time `repeats` back-to-back forward passes on random token ids after `warmup` untimed ones (module
    docstring). Moves and casts `model` in place (like `model.to`); `cuda_graphs` also switches it to
    unpadded attention; `torch_compile` times the TorchInductor-compiled forward."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    runner = Runner(model, batch_size, seq_len, dtype, device, seed, cuda_graphs, torch_compile)
    runner.warm(warmup)
    runner.timed(repeats)
    return runner.result()


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and widths of a (possibly compacted) model."""
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    try:
        s = get_structure(model).shapes()
    except ValueError:
        return info
    kept, full = s.counted_params(), s.full().counted_params()
    info.update(
        {
            "apt_params": kept,
            "apt_params_full": full,
            "sparsity": 1.0 - kept / full,
            "heads_per_layer": s.heads,
            "neurons_per_layer": s.neurons,
            "hidden": s.hidden,
        }
    )
    return info


# ---------------------------------------------------------------------- reporting
def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def markdown_table(report: dict) -> str:
    env = report["env"]
    lines = [
        f"apt-bench: {env['device_name']}, {env['dtype']}, seq {env['seq_len']}, "
        f"{env['warmup']} warm-up + {env['repeats']} timed passes"
        + (f" + {env['repeats']} blocks of {env['block']}" if env.get("block") else "")
        + (f" + {env['repeats']} blocks of ~{env['block_seconds']:g} s" if env.get("block_seconds") else "")
        + f" ({env['order']}, median"
        + (", torch.compile" if env.get("torch_compile") else "")
        + (f", fused {'+'.join(env['fusions'])}" if env.get("fusions") else "")
        + (", CUDA graphs)" if env.get("cuda_graphs") else ")"),
        "",
        "| model | params (M) | batch | samples/s | speedup vs dense | latency ms | latency speedup "
        "| peak MB | memory vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        params = report["models"][r["model"]]["params"] / 1e6
        lines.append(
            f"| {r['model']} | {params:.1f} | {r['batch_size']} | {r['samples_per_s']:.1f} | "
            f"{_fmt(r['speedup_vs_dense'], '.2f')}x | {r['latency_ms']:.2f} | "
            f"{_fmt(r['latency_speedup_vs_dense'], '.2f')}x | {_fmt(r['peak_mb'], '.0f')} | "
            f"{_fmt(r['memory_vs_dense'], '.2f')} |"
        )
    clocks = [_clock_note(r) for r in report["results"] if r.get("gpu_clocks")]
    if clocks:
        lines += ["", "Median SM clock / power (single passes; blocks): " + "; ".join(clocks)]
    return "\n".join(lines) + "\n"


def _clock_note(r: dict) -> str:
    def one(c: dict | None) -> str:
        return "n/a" if c is None else f"{c['sm_clock_mhz']:.0f} MHz {c['power_w']:.0f} W"

    c = r["gpu_clocks"]
    return f"{r['model']} (batch {r['batch_size']}): {one(c['single'])}; {one(c['blocks'])}"


def measure_all(
    models: dict[str, nn.Module],
    batch_sizes: list[int],
    seq_len: int,
    dtype: str,
    device: str,
    warmup: int,
    repeats: int,
    interleave: bool = True,
    cuda_graphs: bool = False,
    torch_compile: bool = False,
    block: int = 0,
    block_seconds: float = 0.0,
) -> list[dict]:
    """Benchmark every model (the first is the dense reference) at every batch size, with a progress bar.
    `interleave`: per batch size, every model runs one timed pass per round, for `repeats` rounds, so load
    from other processes hits all models alike; otherwise each model's passes run back to back. `block`
    > 0: each round also times a block of that many back-to-back passes per model (throughput);
    `block_seconds` > 0 instead: as many passes as fill that time (`Runner.passes_for`, sized once per
    model at its first block)."""
    from tqdm.auto import tqdm

    if block and block_seconds:
        raise ValueError(f"give block ({block} passes) or block_seconds ({block_seconds}), not both")
    cuda = torch.device(device).type == "cuda"
    results: list[dict] = []
    blocks = bool(block or block_seconds)

    def time_block(runner: Runner) -> None:  # a time-sized block keeps the size of the model's first one
        runner.timed_block(block or runner.block_size or runner.passes_for(block_seconds))

    total = len(batch_sizes) * len(models) * repeats  # turns: a model's single pass and its block
    with tqdm(total=total, desc="apt-bench", unit="turn") as bar, ClockSampler(device) as clocks:
        for bs in batch_sizes:
            runners: dict[str, Runner] = {}
            for name, model in models.items():
                bar.set_postfix_str(f"batch {bs}, {name}")
                runner = runners[name] = Runner(
                    model, bs, seq_len, dtype, device, cuda_graphs=cuda_graphs, torch_compile=torch_compile
                )
                runner.warm(warmup)
                if not interleave:
                    runner.timed(repeats)
                    for _ in range(repeats if blocks else 0):
                        time_block(runner)
                    bar.update(repeats)
                    if cuda:
                        model.to("cpu")  # free the device for the next model
                        runner.release()  # and its graph's memory pool
                        torch.cuda.empty_cache()
            if interleave:
                for _ in range(repeats):
                    for runner in runners.values():
                        runner.timed(1)
                    for runner in runners.values():
                        if blocks:
                            time_block(runner)
                        bar.update()
            dense = next(iter(runners.values())).result()
            for name, runner in runners.items():
                r = {"model": name, **runner.result()}
                r["speedup_vs_dense"] = _ratio(r["samples_per_s"], dense["samples_per_s"])
                r["latency_speedup_vs_dense"] = _ratio(dense["latency_ms"], r["latency_ms"])
                r["memory_vs_dense"] = _ratio(r["peak_mb"], dense["peak_mb"])
                if clocks.available:  # medians while the single passes and the blocks ran
                    r["gpu_clocks"] = {kind: clocks.during(w) for kind, w in runner.windows.items()}
                results.append(r)
            if cuda:
                for model in models.values():
                    model.to("cpu")
                runners.clear()  # their graphs hold memory pools
                torch.cuda.empty_cache()
    results.sort(key=lambda r: list(models).index(r["model"]))  # stable: model, then batch size
    return results


# ---------------------------------------------------------------------- command line
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (> 0), got {value}")
    return value


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) (the fraction removed), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apt-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model (choose one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="folder written by apt-export / export_pruned")
    src.add_argument("--checkpoint", help="Lightning checkpoint of apt-fit (merged and compacted here)")
    src.add_argument("--backbone", help="hub id, local folder or 'minilm-l6', pruned here to --sparsity")
    src.add_argument("--preset", choices=PRESETS, help="built-in config (random weights), pruned here")
    src.add_argument("--config-json", help="a transformers config.json (random weights), pruned here")
    prune = p.add_argument_group("pruning (with --backbone / --preset / --config-json)")
    prune.add_argument("--sparsity", type=_sparsity, nargs="+", help="fractions of the APT count to remove")
    prune.add_argument("--scorer", choices=SCORERS, default="magnitude", help="data-free block scorer")
    prune.add_argument("--multiple-of", type=_positive_int, default=1, help="round kept widths to a multiple")
    prune.add_argument(
        "--random-weights", action="store_true", help="--backbone: its architecture with random weights"
    )
    prune.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (the search's choices depend on them)"
    )
    m = p.add_argument_group("measurement")
    m.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[128])
    m.add_argument("--seq-len", type=_positive_int, default=128)
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 need CUDA")
    m.add_argument("--device", choices=DEVICES, default="auto")
    m.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed passes (default {_CPU_DEFAULTS[0]} on CPU, {_CUDA_DEFAULTS[0]} on CUDA)",
    )
    m.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help=f"timed passes (default {_CPU_DEFAULTS[1]} on CPU, {_CUDA_DEFAULTS[1]} on CUDA)",
    )
    sized = m.add_mutually_exclusive_group()
    sized.add_argument(
        "--block",
        type=int,
        default=None,
        help="passes per back-to-back block timed for throughput, one block per model and round; 0: "
        "throughput from the single passes (the CPU default)",
    )
    sized.add_argument(
        "--block-seconds",
        type=float,
        default=None,
        help="size each model's blocks to about this many seconds instead (the CUDA default: "
        f"{_CUDA_DEFAULTS[3]}, so the clocks settle at each model's own level; at least {_MIN_BLOCK} passes)",
    )
    m.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: models take turns pass by pass (fair under background load); "
        "sequential: each model's timed passes back to back",
    )
    m.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    m.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time replays of a captured CUDA graph per model (GPU work without Python dispatch)",
    )
    m.add_argument(
        "--compile",
        action="store_true",
        help="time each model's TorchInductor-compiled forward (fused per-token work; compiled in warm-up)",
    )
    m.add_argument(
        "--fuse",
        nargs="+",
        choices=FUSIONS,
        default=[],
        help="inference fusions applied to every model, dense included (BERT-like encoders): qkv = one "
        "Q/K/V matrix product per layer; gelu = GELU in the FFN product's cuBLASLt epilogue (tanh "
        "approximation on CUDA)",
    )
    m.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="write results as JSON here, and a Markdown table next to it (.md)")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Everything that can be wrong with the arguments, before any model is built. Returns the device."""
    prunes_here = args.backbone or args.preset or args.config_json
    if prunes_here and not args.sparsity:
        parser.error("--sparsity is required with --backbone, --preset or --config-json (e.g. 0.6)")
    if not prunes_here and (args.sparsity or args.random_weights or args.multiple_of != 1):
        parser.error(
            "--sparsity / --multiple-of / --random-weights apply to --backbone, --preset or "
            "--config-json; a --model-dir or --checkpoint model is already pruned"
        )
    if args.random_weights and not args.backbone:
        parser.error("--random-weights goes with --backbone (--preset and --config-json are random already)")
    paths = (
        ("--model-dir", args.model_dir, "dir"),
        ("--checkpoint", args.checkpoint, "file"),
        ("--config-json", args.config_json, "any"),
    )
    for flag, path, want in paths:
        if path is None:
            continue
        p = Path(path)
        ok = p.is_dir() if want == "dir" else p.is_file() if want == "file" else p.exists()
        if not ok:
            parser.error(f"{flag} {path}: {'folder' if want == 'dir' else 'file'} not found")
    if args.out and Path(args.out).suffix == ".md":
        parser.error(f"--out {args.out}: give the JSON path; the Markdown table is written next to it as .md")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.block is not None and args.block < 0:
        parser.error(f"--block must be >= 0 (0: no blocks), got {args.block}")
    if args.block_seconds is not None and not args.block_seconds > 0:
        parser.error(f"--block-seconds must be > 0, got {args.block_seconds}")
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        parser.error(
            "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    device = args.device if args.device != "auto" else ("cuda" if has_cuda else "cpu")
    if args.cuda_graphs and device != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device; the chosen device is {device}")
    if args.cuda_graphs and args.attn == "eager":
        parser.error("--cuda-graphs needs --attn sdpa (eager attention builds its mask on the host)")
    if args.dtype != "fp32" and device == "cpu":
        why = "this machine has no CUDA device" if not has_cuda else "the chosen device is the CPU"
        parser.error(f"--dtype {args.dtype} needs a CUDA device ({why}); allowed on CPU: fp32")
    return device


def _load_models(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The dense reference first, then the pruned model(s); plus pruning records per pruned model."""
    from apt_lightning.backbone import BackboneNotFoundError, resolve_backbone

    records: dict[str, dict] = {}
    torch.manual_seed(args.seed)  # random weights (presets, --random-weights), hence the pruned structure
    if args.model_dir or args.checkpoint:
        if args.model_dir:
            from apt_lightning.export import load_pruned

            pruned, name = load_pruned(args.model_dir), Path(args.model_dir).name
        else:
            from apt_lightning.export import compact_for_inference, module_from_checkpoint

            pruned, name = (
                compact_for_inference(module_from_checkpoint(args.checkpoint).student),
                Path(args.checkpoint).stem,
            )
        pruned.set_attn_implementation(args.attn)
        return {"dense": dense_like(pruned, args.attn), name: pruned.eval()}, records
    if args.backbone:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        try:
            path = resolve_backbone(args.backbone)
        except BackboneNotFoundError as err:
            hint = (
                f"; for its shapes offline use --preset {args.backbone}" if args.backbone in PRESETS else ""
            )
            parser.error(f"{err}{hint}")
        if args.random_weights:
            dense = model_from_config(AutoConfig.from_pretrained(path, num_labels=2), args.attn)
        else:
            dense = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=2, attn_implementation=args.attn, dtype=torch.float32
            ).eval()
    else:
        config = preset_config(args.preset) if args.preset else config_from_json(args.config_json)
        dense = model_from_config(config, args.attn)
    models = {"dense": dense}
    for s in args.sparsity:
        model = copy.deepcopy(dense)
        record = prune_to_sparsity(model, s, args.scorer, args.multiple_of)
        name = f"pruned {s:g}" + (f" (x{args.multiple_of})" if args.multiple_of > 1 else "")
        models[name], records[name] = model.eval(), record
    return models, records


def run_cli(argv: list[str] | None = None) -> dict:
    """`apt-bench` as a function: parse `argv`, measure, print, write; returns the report (the JSON)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _check_args(parser, args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(parser, args, device, argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, the ablation report)


def _main(
    parser: argparse.ArgumentParser, args: argparse.Namespace, device: str, argv: list[str] | None
) -> dict:
    warmup_d, repeats_d, block_d, seconds_d = _CUDA_DEFAULTS if device == "cuda" else _CPU_DEFAULTS
    warmup = warmup_d if args.warmup is None else args.warmup
    repeats = repeats_d if args.repeats is None else args.repeats
    if args.block is None and args.block_seconds is None:
        block, block_seconds = block_d, seconds_d
    else:
        block, block_seconds = args.block or 0, args.block_seconds or 0.0
    models, records = _load_models(parser, args)
    limit = min(max_seq_len(m.config) for m in models.values())
    if args.seq_len > limit:
        parser.error(f"--seq-len {args.seq_len} exceeds the model's {limit} position embeddings")
    infos = {name: {**describe(model), "pruning": records.get(name)} for name, model in models.items()}
    if args.fuse:  # after describe: the fused modules no longer have the layout the structure reads
        try:
            for model in models.values():
                fuse_for_inference(model, args.fuse)
        except ValueError as err:
            parser.error(f"--fuse {' '.join(args.fuse)}: {err}")
    results = measure_all(
        models,
        args.batch_sizes,
        args.seq_len,
        args.dtype,
        device,
        warmup,
        repeats,
        interleave=args.order == "interleaved",
        cuda_graphs=args.cuda_graphs,
        torch_compile=args.compile,
        block=block,
        block_seconds=block_seconds,
    )
    import transformers

    name = (
        torch.cuda.get_device_name(device)
        if device == "cuda"
        else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    report = {
        "tool": "apt-bench",
        "command": "apt-bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "env": {
            "device": device,
            "device_name": name,
            "dtype": args.dtype,
            "seq_len": args.seq_len,
            "warmup": warmup,
            "repeats": repeats,
            "block": block,
            "block_seconds": block_seconds,
            "order": args.order,
            "attn": args.attn,
            "cuda_graphs": args.cuda_graphs,
            "torch_compile": args.compile,
            "fusions": args.fuse,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "source": {
            k: getattr(args, k)
            for k in (
                "model_dir",
                "checkpoint",
                "backbone",
                "preset",
                "config_json",
                "scorer",
                "multiple_of",
                "random_weights",
                "seed",
            )
        },
        "models": infos,
        "results": results,
    }
    table = markdown_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, json.dumps(report, indent=1))
        write_text_atomic(out.with_suffix(".md"), table)
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: a returned value would become the exit status)."""
    run_cli(argv)


if __name__ == "__main__":
    main()
