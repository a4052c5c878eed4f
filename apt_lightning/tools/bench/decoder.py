"""apt-bench for causal LMs: prefill throughput and greedy decoding with a KV cache.

`DecodeRunner` times one model at one (batch, prompt length, new tokens) shape, `generation_benchmark` is
one model's warm-up and timed generations, `measure_decoders` lets several models take turns. The rest of
the protocol is the encoder's (`protocol`): warm-up, timed repeats, medians, the models interleaved
round by round, CUDA events on a GPU and `perf_counter` on a CPU, the same working-memory measurement.

What one generation is, and what is timed:
- **prefill**: one forward pass of the `batch x prompt_len` random prompt into an empty KV cache, the
  logits of the last position only (`logits_to_keep=1`, as `generate` asks for), and the greedy first
  token. Timed as one pass; prefill tokens/s = batch * prompt_len / median time.
- **decode**: `new_tokens` forward passes of one token per sequence through the cache (positions
  prompt_len .. prompt_len + new_tokens - 1), each producing the next token greedily (argmax). Timed as
  one span from the first step to the last; decode tokens/s = batch * new_tokens / median span.
- **the loop** is a hand-written one around the model's forward, not `generate`: `generate` adds per-step
  Python (logits processors, stopping criteria, bookkeeping) that measures the library, not the model. The
  tokens equal `generate`'s greedy output (tests/test_bench_decoder.py).
- **the KV cache** (`kv_cache`): ``static`` (default) is transformers' preallocated `StaticCache` of
  prompt_len + new_tokens positions, what ``generate(cache_implementation="static")`` uses: written in
  place, one shape every step. The decode step then reads the whole cache behind a 4D additive mask kept
  on the device (0 up to the current position, the dtype's minimum after it), so a step runs no host
  synchronisation. ``dynamic`` is `generate`'s default `DynamicCache`, which grows by concatenation.
  The cache is reset between generations outside the timed spans.
- **CUDA graphs** (`cuda_graphs`, static cache only): the prefill pass and one decode step are each
  captured once and replayed; a decode step's graph updates the mask, the position and the next token on
  the device, so the decode span is `new_tokens` replays with nothing in between. Eager decoding of a
  small model is bound by Python's kernel-by-kernel dispatch (`decode_host_ms_per_token`: the CPU time to
  issue one step; compare it with `decode_ms_per_token`).
- **memory**: weights plus the peak working memory of the timed generations, the KV cache included
  (`kv_cache_mb` beside it): `protocol.WorkingMemory` over the timed work, plus the cache that was already
  allocated when it began; under graphs the peak while capturing.
- **checks**: `decoded_tokens` counts the tokens the decode loop wrote per sequence (the smallest count
  over the batch) and `cache_length` the positions the cache holds after it (prompt_len + new_tokens).

Pruned LLaMA models work as they are: a layer without attention heads appends an empty cache entry
(`SkippedSelfAttention`), uneven GQA groups cache their kept KV heads; the static cache sizes each layer
from the first keys it stores.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

from apt_lightning.structure import max_positions
from apt_lightning.telemetry import ClockSampler
from apt_lightning.tools.bench.models import is_causal_lm
from apt_lightning.tools.bench.protocol import DTYPES, WorkingMemory, _model_bytes, _ratio

KV_CACHES = ("static", "dynamic")


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.24), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache (0 for None or an empty cache)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _cache_length(cache: Any) -> int:
    """Positions the cache holds: the longest layer (a headless layer of a dynamic cache reports 0)."""
    return max(int(cache.get_seq_length(i)) for i in range(len(cache.layers)))


class DecodeRunner:
    """One causal LM at one (batch, prompt length, new tokens) shape: `warm` runs untimed generations,
    `timed` timed ones (prefill and decode timed apart, the working memory tracked), `result` summarises
    (module docstring). Separate calls let several models take turns (`measure_decoders`). Moves and
    casts `model` in place."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        prompt_len: int,
        new_tokens: int,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        seed: int = 0,
        kv_cache: str = "static",
        cuda_graphs: bool = False,
    ) -> None:
        if min(batch_size, prompt_len, new_tokens) <= 0:
            raise ValueError(
                f"batch_size, prompt_len and new_tokens must be positive, got {batch_size}, {prompt_len} "
                f"and {new_tokens}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"unknown kv_cache {kv_cache!r}; allowed: {', '.join(KV_CACHES)}")
        if not is_causal_lm(model):
            raise ValueError(f"{type(model).__name__} is not a causal LM (a ...ForCausalLM model)")
        length, limit = prompt_len + new_tokens, max_positions(model.config)
        if length > limit:
            raise ValueError(f"prompt_len + new_tokens = {length} exceeds the model's {limit} positions")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if cuda_graphs and not self.cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, got device {str(self.device)!r}")
        if cuda_graphs and kv_cache != "static":
            raise ValueError("cuda_graphs needs kv_cache 'static' (a dynamic cache changes shape every step)")
        self.model = model.to(device=self.device, dtype=DTYPES[dtype]).eval()
        self.batch_size, self.prompt_len, self.new_tokens = batch_size, prompt_len, new_tokens
        self.dtype, self.kv_cache, self.cuda_graphs = dtype, kv_cache, cuda_graphs
        self._cache_key = _cache_kwarg(model)
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(seed)
        dev = self.device
        self.prompt = torch.randint(5 if vocab > 10 else 0, vocab, (batch_size, prompt_len), generator=g).to(
            dev
        )
        self.prompt_positions = torch.arange(prompt_len, device=dev).unsqueeze(0)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)  # the last token produced
        # every token produced: prefill's first, then one per decode step (-1: not written)
        self.generated = torch.full((batch_size, 1 + new_tokens), -1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # the position the next step writes
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        if kv_cache == "static":
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=length)
            self.mask_start = torch.full(
                (batch_size, 1, 1, length), torch.finfo(DTYPES[dtype]).min, dtype=DTYPES[dtype], device=dev
            )
            self.mask_start[..., :prompt_len] = 0.0
            self.mask = self.mask_start.clone()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.prefill_times: list[float] = []
        self.decode_times: list[float] = []  # seconds per decode span (new_tokens steps)
        self.decode_host_times: list[float] = []  # CPU seconds to issue a span's steps
        self.windows: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
        self.weights_mb = _model_bytes(model) / 2**20
        self.kv_cache_mb: float | None = None
        self.activation_mb: float | None = None
        self.memory_kind = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss"
        self.warmup = 0
        self.decoded_tokens: int | None = None
        self.cache_length: int | None = None

    # ------------------------------------------------------------------ the steps
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None):
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_key: self.cache},
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _prefill_step(self) -> None:
        """The prompt into the (empty) cache, causal mask built by the model; the first token."""
        self.token.copy_(self._forward(self.prompt, self.prompt_positions, None))
        self.generated[:, :1].copy_(self.token)

    def _decode_step(self) -> None:
        """One token per sequence through the cache: device tensors only (capturable in a CUDA graph)."""
        if self.mask is not None:
            self.mask.index_fill_(-1, self.pos, 0.0)  # the position written now becomes visible
        self.token.copy_(self._forward(self.token, self.pos.view(1, 1), self.mask))
        self.generated.index_copy_(1, self.pos - (self.prompt_len - 1), self.token)
        self.pos.add_(1)

    def _reset(self) -> None:
        """An empty cache and the decode state of a fresh generation (untimed)."""
        if self.kv_cache == "static":
            self.cache.reset()
            self.mask.copy_(self.mask_start)
        else:
            from transformers import DynamicCache

            self.cache = None  # free the last generation's cache before the next one grows
            self.cache = DynamicCache(config=self.model.config)
        self.pos.fill_(self.prompt_len)
        self.generated.fill_(-1)

    def _prefill(self) -> None:
        if "prefill" in self.graphs:
            self.graphs["prefill"].replay()
        else:
            self._prefill_step()

    def _decode(self) -> None:
        graph = self.graphs.get("decode")
        for _ in range(self.new_tokens):
            if graph is not None:
                graph.replay()
            else:
                self._decode_step()

    def _capture(self) -> None:
        """Capture the prefill pass and one decode step (after warm-up runs on a side stream, which also
        allocate the static cache); the peak allocated while capturing is the working memory."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._reset()
                self._prefill_step()
                self._decode_step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self._reset()
        cache_mb = _cache_bytes(self.cache) / 2**20
        with WorkingMemory(dev) as memory:
            for name, step in (("prefill", self._prefill_step), ("decode", self._decode_step)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                self.graphs[name] = graph
        self.activation_mb = memory.mb + cache_mb

    # ------------------------------------------------------------------ warm-up and timing
    @torch.inference_mode()
    def warm(self, n: int) -> None:
        if self.cuda_graphs and not self.graphs:
            self._capture()
        for _ in range(n):
            self._reset()
            self._prefill()
            self._decode()
        self.warmup += n

    def _span(self, work) -> tuple[float, float, tuple[float, float]]:
        """(device seconds, host seconds to issue, host-clock window) of `work`, the device idle before."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            work()
            host = time.perf_counter() - t0
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, host, (t0, time.perf_counter())
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
        return t1 - t0, t1 - t0, (t0, t1)

    @torch.inference_mode()
    def timed(self, n: int = 1) -> None:
        """`n` generations, each: reset (untimed), prefill (timed), decode (timed as one span)."""
        gc.collect(1)
        if self.cuda_graphs and not self.graphs:
            self._capture()
        resident = _cache_bytes(self.cache) / 2**20  # a cache allocated before the span belongs to it
        with WorkingMemory(self.device) as memory:
            for _ in range(n):
                self._reset()
                seconds, _, window = self._span(self._prefill)
                self.prefill_times.append(seconds)
                self.windows["prefill"].append(window)
                seconds, host, window = self._span(self._decode)
                self.decode_times.append(seconds)
                self.decode_host_times.append(host)
                self.windows["decode"].append(window)
        self.kv_cache_mb = _cache_bytes(self.cache) / 2**20
        self.decoded_tokens = int((self.generated[:, 1:] >= 0).sum(dim=1).min())
        self.cache_length = _cache_length(self.cache)
        if not memory.tracked:
            self.memory_kind = "n/a"
        elif not self.graphs and memory.mb is not None:
            self.activation_mb = max(self.activation_mb or 0.0, memory.mb + resident)

    def tokens(self) -> torch.Tensor:
        """The last generation's tokens, (batch, 1 + new_tokens): prefill's, then one per decode step."""
        return self.generated.clone()

    def result(self) -> dict[str, Any]:
        if not self.prefill_times:
            raise RuntimeError("no timed generations yet")
        prefill = statistics.median(self.prefill_times)
        decode = statistics.median(self.decode_times)
        act = self.activation_mb if self.memory_kind != "n/a" else None
        return {
            "batch_size": self.batch_size,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "dtype": self.dtype,
            "device": str(self.device),
            "kv_cache": self.kv_cache,
            "cuda_graphs": self.cuda_graphs,
            "prefill_tokens_per_s": self.batch_size * self.prompt_len / prefill,
            "prefill_ms": prefill * 1e3,
            "prefill_ms_min": min(self.prefill_times) * 1e3,
            "prefill_ms_all": [t * 1e3 for t in self.prefill_times],
            "decode_tokens_per_s": self.batch_size * self.new_tokens / decode,
            "decode_ms_per_token": decode * 1e3 / self.new_tokens,
            "decode_ms_all": [t * 1e3 for t in self.decode_times],
            "decode_host_ms_per_token": statistics.median(self.decode_host_times) * 1e3 / self.new_tokens,
            "decoded_tokens": self.decoded_tokens,
            "cache_length": self.cache_length,
            "warmup": self.warmup,
            "repeats": len(self.prefill_times),
            "weights_mb": self.weights_mb,
            "kv_cache_mb": self.kv_cache_mb,
            "activation_mb": act,
            "memory_kind": self.memory_kind,
            "peak_mb": None if act is None else self.weights_mb + act,
        }


def generation_benchmark(
    model: nn.Module,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    kv_cache: str = "static",
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """`repeats` timed generations (prefill, then `new_tokens` greedy decode steps) on a random prompt
    after `warmup` untimed ones (module docstring). Moves and casts `model` in place."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    runner = DecodeRunner(
        model, batch_size, prompt_len, new_tokens, dtype, device, seed, kv_cache, cuda_graphs
    )
    runner.warm(warmup)
    runner.timed(repeats)
    return runner.result()


def measure_decoders(
    models: dict[str, nn.Module],
    batch_sizes: list[int],
    prompt_lens: list[int],
    new_tokens: int,
    dtype: str,
    device: str,
    warmup: int,
    repeats: int,
    interleave: bool = True,
    kv_cache: str = "static",
    cuda_graphs: bool = False,
) -> list[dict]:
    """Time every model (the first is the dense reference) at every batch size and prompt length, with a
    progress bar; `interleave` as in `protocol.measure_all` (one generation per model per round)."""
    from tqdm.auto import tqdm

    cuda = torch.device(device).type == "cuda"
    results: list[dict] = []
    shapes = [(bs, p) for bs in batch_sizes for p in prompt_lens]
    total = len(shapes) * len(models) * repeats
    with tqdm(total=total, desc="apt-bench", unit="generation") as bar, ClockSampler(device) as clocks:
        for bs, prompt_len in shapes:
            runners: dict[str, DecodeRunner] = {}
            for name, model in models.items():
                bar.set_postfix_str(f"batch {bs}, prompt {prompt_len}, {name}")
                runner = runners[name] = DecodeRunner(
                    model,
                    bs,
                    prompt_len,
                    new_tokens,
                    dtype,
                    device,
                    kv_cache=kv_cache,
                    cuda_graphs=cuda_graphs,
                )
                runner.warm(warmup)
                if not interleave:
                    runner.timed(repeats)
                    bar.update(repeats)
                    if cuda:
                        model.to("cpu")
                        runner.graphs.clear()
                        runner.cache = None
                        torch.cuda.empty_cache()
            if interleave:
                for _ in range(repeats):
                    for runner in runners.values():
                        runner.timed(1)
                        bar.update()
            dense = next(iter(runners.values())).result()
            for name, runner in runners.items():
                r = {"model": name, **runner.result()}
                r["prefill_speedup_vs_dense"] = _ratio(
                    r["prefill_tokens_per_s"], dense["prefill_tokens_per_s"]
                )
                r["decode_speedup_vs_dense"] = _ratio(r["decode_tokens_per_s"], dense["decode_tokens_per_s"])
                r["memory_vs_dense"] = _ratio(r["peak_mb"], dense["peak_mb"])
                if clocks.available:
                    r["gpu_clocks"] = {kind: clocks.during(w) for kind, w in runner.windows.items()}
                results.append(r)
            if cuda:
                for model in models.values():
                    model.to("cpu")
                runners.clear()  # their graphs and caches hold device memory
                torch.cuda.empty_cache()
    results.sort(key=lambda r: list(models).index(r["model"]))  # stable: model, then shape
    return results
