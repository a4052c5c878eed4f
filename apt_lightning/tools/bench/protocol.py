"""apt-bench's measurement protocol: `Runner` times one model at one input shape, `benchmark` is one
model's warm-up and timed passes, `measure_all` lets several models take turns.

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

import ctypes
import gc
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from apt_lightning.structure import max_positions
from apt_lightning.telemetry import ClockSampler, current_rss_mb, peak_rss_mb, reset_peak_rss
from apt_lightning.tools.bench.models import unpadded_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MIN_BLOCK = 10


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an RSS baseline is not inflated by earlier runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class WorkingMemory:
    """The peak memory a span of work needs beyond what was allocated when it began (module docstring):
    on CUDA `max_memory_allocated` minus the allocation at the start, both after a synchronisation; on a
    CPU the growth of the peak resident set (`tracked` False, `mb` None where the kernel offers no
    resettable peak)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mb: float | None = None
        self.tracked = True
        self._base: float | None = None

    def __enter__(self) -> WorkingMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = current_rss_mb()
            self.tracked = self._base is not None and reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.tracked:
            self.mb = max(0.0, peak_rss_mb() - self._base)


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
        if seq_len > max_positions(model.config):
            raise ValueError(f"seq_len {seq_len} exceeds the model's {max_positions(model.config)} positions")
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
        # host-clock spans of the timed work, to match with clock samples (ClockSampler.during)
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
        with WorkingMemory(dev) as memory:
            if self.cuda:
                events = [
                    (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    for _ in range(n)
                ]
                t_start = time.perf_counter()
                for start, end in events:
                    start.record()
                    t0 = time.perf_counter()
                    self.run_once()
                    self.host_times.append(time.perf_counter() - t0)
                    end.record()
            else:
                for _ in range(n):
                    t0 = time.perf_counter()
                    self.run_once()
                    self.times.append(time.perf_counter() - t0)
        if self.cuda:
            self.windows["single"].append((t_start, time.perf_counter()))
            self.times += [start.elapsed_time(end) / 1e3 for start, end in events]
        if not memory.tracked:
            self.memory_kind = "n/a"
        # graph replays allocate nothing: the capture measured the working memory
        elif self.graph is None and memory.mb is not None:
            self.activation_mb = max(self.activation_mb or 0.0, memory.mb)

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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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
