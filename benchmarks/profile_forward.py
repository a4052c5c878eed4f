"""Where a forward pass spends its GPU time: eager vs CUDA-graph replay (optionally compiled), dense vs
pruned.

    python benchmarks/profile_forward.py --preset roberta-base --sparsity 0.6 --multiple-of 16 \
        --batch-size 128 --dtype bf16 --out profile.json

For each model and mode it prints the median latency (CUDA events), the host time to issue one pass and the
top kernels by GPU time (torch.profiler), and writes them as JSON. Used to explain docs/bench.md: a pruned
model in eager mode is bound by Python's dispatch, not by its matrix products.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from apt_lightning.files import write_text_atomic
from apt_lightning.fusion import FUSIONS, fuse_for_inference
from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure import preset_config
from apt_lightning.tools.bench import DTYPES, PRESETS, Runner, model_from_config


def _kernels(runner: Runner, passes: int, top: int) -> tuple[list[dict], float]:
    """The `top` kernels by GPU time per pass, and the GPU time of all kernels per pass (ms)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            for _ in range(passes):
                runner.run_once()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "device_time_total", 0.0)
        if e.device_type == torch.autograd.DeviceType.CUDA and gpu_us > 0:
            rows.append(
                {"name": e.key[:90], "calls": e.count // passes, "gpu_ms_per_pass": gpu_us / passes / 1e3}
            )
    rows.sort(key=lambda r: -r["gpu_ms_per_pass"])
    return rows[:top], sum(r["gpu_ms_per_pass"] for r in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="roberta-base")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--multiple-of", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd forwards as well")
    p.add_argument("--fuse", nargs="+", choices=FUSIONS, default=[], help="inference fusions, both models")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, as in apt-bench")
    p.add_argument("--out", help="JSON file for the numbers")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    torch.manual_seed(args.seed)  # the same structure as `apt-bench --preset ... --seed` prunes to
    dense = model_from_config(preset_config(args.preset))
    pruned = copy.deepcopy(dense)
    pruning = prune_to_sparsity(pruned, args.sparsity, "magnitude", args.multiple_of)
    if args.fuse:
        for model in (dense, pruned):
            fuse_for_inference(model, args.fuse)
    report: dict = {
        "args": vars(args),
        "device": torch.cuda.get_device_name(),
        "pruning": pruning,
        "runs": [],
    }
    for name, model in (("dense", dense), (f"pruned {args.sparsity:g}", pruned)):
        # eager modes first: a graph mode switches the model to unpadded attention for good
        modes = [(False, False), (False, True), (True, False), (True, True)]
        modes = [(g, c) for g, c in modes if args.compile or not c]
        for graphs, compiled in modes:
            runner = Runner(
                model,
                args.batch_size,
                args.seq_len,
                args.dtype,
                "cuda",
                seed=0,
                cuda_graphs=graphs,
                torch_compile=compiled,
            )
            runner.warm(5)
            runner.timed(args.repeats)
            result = runner.result()
            t0 = time.perf_counter()
            kernels, kernel_ms = _kernels(runner, 3, args.top)
            run = {
                "model": name,
                "mode": ("cuda graph" if graphs else "eager") + (", compiled" if compiled else ""),
                "latency_ms": result["latency_ms"],
                "host_ms": result["host_ms"],
                "gpu_kernel_ms_per_pass": kernel_ms,
                "top_kernels": kernels,
                "profile_s": time.perf_counter() - t0,
            }
            report["runs"].append(run)
            print(
                f"\n== {name}, {run['mode']}: latency {run['latency_ms']:.2f} ms, "
                f"host {run['host_ms']:.2f} ms, kernels {kernel_ms:.2f} ms per pass "
                f"(median of {len(runner.times)})"
            )
            for k in kernels:
                print(f"  {k['gpu_ms_per_pass']:7.3f} ms  x{k['calls']:<4d} {k['name']}")
            del runner
            torch.cuda.empty_cache()
        model.to("cpu")
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
