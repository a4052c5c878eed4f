"""apt-bench's Markdown table of a report (the JSON `run_cli` returns)."""

from __future__ import annotations


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    env = report["env"]
    if env.get("model_kind") == "causal-lm":
        return generation_table(report)
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


def generation_table(report: dict) -> str:
    """The table of a causal LM's report: prefill and decode throughput, memory, against dense."""
    env = report["env"]
    lines = [
        f"apt-bench (generation): {env['device_name']}, {env['dtype']}, {env['kv_cache']} KV cache, "
        f"{env['new_tokens']} greedy decode steps after the prompt, {env['warmup']} warm-up + "
        f"{env['repeats']} timed generations ({env['order']}, median"
        + (", CUDA graphs)" if env.get("cuda_graphs") else ")"),
        "",
        "| model | params (M) | batch | prompt | prefill tok/s | prefill speedup | decode tok/s "
        "| decode speedup | ms/token | host ms/token | peak MB | KV cache MB | memory vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        params = report["models"][r["model"]]["params"] / 1e6
        lines.append(
            f"| {r['model']} | {params:.1f} | {r['batch_size']} | {r['prompt_len']} | "
            f"{r['prefill_tokens_per_s']:.0f} | {_fmt(r['prefill_speedup_vs_dense'], '.2f')}x | "
            f"{r['decode_tokens_per_s']:.1f} | {_fmt(r['decode_speedup_vs_dense'], '.2f')}x | "
            f"{r['decode_ms_per_token']:.2f} | {r['decode_host_ms_per_token']:.2f} | "
            f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r['kv_cache_mb'], '.1f')} | "
            f"{_fmt(r['memory_vs_dense'], '.2f')} |"
        )
    clocks = [_clock_note(r, ("prefill", "decode")) for r in report["results"] if r.get("gpu_clocks")]
    if clocks:
        lines += ["", "Median SM clock / power (prefill; decode): " + "; ".join(clocks)]
    return "\n".join(lines) + "\n"


def _clock_note(r: dict, kinds: tuple[str, str] = ("single", "blocks")) -> str:
    def one(c: dict | None) -> str:
        return "n/a" if c is None else f"{c['sm_clock_mhz']:.0f} MHz {c['power_w']:.0f} W"

    c = r["gpu_clocks"]
    shape = f"batch {r['batch_size']}" + (f", prompt {r['prompt_len']}" if "prompt_len" in r else "")
    return f"{r['model']} ({shape}): {one(c.get(kinds[0]))}; {one(c.get(kinds[1]))}"
