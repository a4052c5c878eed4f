"""What moves the bf16 speedup of a pruned roberta-base on a GPU: compiler options and fusions on one prune
(`--study options`), or the head / FFN / hidden mix of 0.6-sparsity structures (`--study structures`).

    python benchmarks/bf16_options.py --study options --out options.json
    python benchmarks/bf16_options.py --study structures --out structures.json

Every model is compiled (TorchInductor) and timed as CUDA-graph replays, batch 128, sequence 128, bf16;
models take turns in blocks of 10 passes, 4 rounds, median per pass. A study's models run in one process,
so its ratios compare with each other, less with `apt-bench` tables (other prunes, and turns too short for
the GPU's clocks to settle at each model's own level: docs/bench.md, "Short blocks biased bf16 speedups").
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from apt_lightning.files import write_text_atomic
from apt_lightning.fusion import fuse_for_inference
from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure import ModelShapes, get_structure, preset_config
from apt_lightning.tools.bench import Runner, model_from_config

# name: (fusions, TorchInductor config patch, torch.compile mode)
OPTIONS = {
    "compile": ((), {}, None),
    "compile + coordinate descent": ((), {"coordinate_descent_tuning": True}, None),
    "compile + freezing": ((), {"freezing": True}, None),
    "compile + fuse qkv": (("qkv",), {}, None),
    "compile + fuse gelu": (("gelu",), {}, None),
    "compile + fuse qkv gelu": (("qkv", "gelu"), {}, None),
    "max-autotune": ((), {}, "max-autotune-no-cudagraphs"),
}

_SEARCH_06_X128_ODD = (  # what the search kept at 0.6, x128, before attention widths were aligned
    [10, 9, 8, 7, 10, 8, 9, 7, 11, 10, 9, 9],
    [1664, 1664, 1536, 1664, 1664, 1664, 1536, 1664, 1664, 1536, 1664, 1536],
    512,
)
# name: (heads per layer, FFN neurons per layer, hidden), all near 0.6 sparsity of roberta-base
STRUCTURES = {
    "search, odd heads": _SEARCH_06_X128_ODD,
    "8 heads": ([8] * 12, [1664, 1792] * 6, 512),
    "4 heads": ([4] * 12, [2176, 2304] * 6, 512),
    "12 heads": ([12] * 12, [1280, 1152] * 6, 512),
    "hidden 384": ([12] * 12, [2176, 2048] * 6, 384),
    "hidden 640": ([7] * 12, [1280] * 12, 640),
}


def _runner(model, fusions=(), mode: str | None = None) -> Runner:
    model = copy.deepcopy(model)
    if fusions:
        fuse_for_inference(model, fusions)
    return Runner(model, 128, 128, "bf16", "cuda", cuda_graphs=True, torch_compile=True, compile_mode=mode)


def _time(runners: list[Runner], rounds: int = 4, block: int = 10) -> list[float]:
    for r in runners:
        r.warm(5)
    for _ in range(rounds):
        for r in runners:
            r.timed(block)
    return [statistics.median(r.times) * 1e3 for r in runners]


def options_study(dense, pruned) -> list[dict]:
    import torch._inductor.config as inductor_config

    rows = []
    for name, (fusions, patch, mode) in OPTIONS.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with inductor_config.patch(patch):
            runners = [_runner(dense, fusions, mode), _runner(pruned, fusions, mode)]
            dense_ms, pruned_ms = _time(runners)
        rows.append(
            {
                "option": name,
                "dense_ms": dense_ms,
                "pruned_ms": pruned_ms,
                "speedup": dense_ms / pruned_ms,
                "build_and_time_s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del runners
        torch.cuda.empty_cache()
    return rows


def structures_study(dense) -> list[dict]:
    full = get_structure(dense).shapes().counted_params()
    rows, runners = [], []
    for name, (heads, neurons, hidden) in STRUCTURES.items():
        model = copy.deepcopy(dense)
        structure = get_structure(model)
        structure.reshape(ModelShapes(heads, neurons, hidden, 64, structure.costs))
        sparsity = 1 - structure.shapes().counted_params() / full
        for fusions in (("qkv", "gelu"), ()):
            rows.append({"structure": name, "fusions": list(fusions), "sparsity": sparsity})
            runners.append(_runner(model, fusions))
    for fusions in (("qkv", "gelu"), ()):
        rows.append({"structure": "dense", "fusions": list(fusions), "sparsity": 0.0})
        runners.append(_runner(dense, fusions))
    times = _time(runners)
    dense_ms = {tuple(r["fusions"]): t for r, t in zip(rows, times, strict=True) if r["structure"] == "dense"}
    for row, ms in zip(rows, times, strict=True):
        row.update(ms=ms, speedup=dense_ms[tuple(row["fusions"])] / ms)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=("options", "structures"), required=True)
    p.add_argument("--out", help="JSON file for the numbers")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    torch.manual_seed(0)
    dense = model_from_config(preset_config("roberta-base"))
    report: dict = {"study": args.study, "device": torch.cuda.get_device_name()}
    if args.study == "options":
        pruned = copy.deepcopy(dense)
        report["pruning"] = prune_to_sparsity(pruned, 0.6, "magnitude", 128)
        report["rows"] = options_study(dense, pruned)
    else:
        report["rows"] = structures_study(dense)
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
