"""Scoring + search overhead of adaptive pruning per training step, relative to a plain LoRA step.

Reads the `efficiency.json` of an APT run and of a LoRA run (written by `EfficiencyMonitor`), prints the
numbers and writes them as JSON next to the APT file (`pruning_overhead.json`).

Usage: python benchmarks/pruning_overhead.py APT_EFFICIENCY_JSON LORA_EFFICIENCY_JSON
e.g.   python benchmarks/pruning_overhead.py docs/results/core/apt_no_distillation/efficiency.json \\
           docs/results/core/lora/efficiency.json
"""

import json
import os
import sys
from pathlib import Path


def overhead(apt: dict, lora: dict) -> dict:
    cost = apt["pruning_overhead"]
    spent = cost["score_s"] + cost["search_s"]
    per_step = spent / apt["steps"]
    return {
        "score_s": cost["score_s"],
        "search_s": cost["search_s"],
        "steps": apt["steps"],
        "per_step_ms": 1000 * per_step,
        "lora_median_step_ms": 1000 * lora["median_step_s"],
        "relative_to_lora_step": per_step / lora["median_step_s"],
        "fraction_of_own_step_time": cost["per_step_fraction"],
    }


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    apt_path, lora_path = map(Path, sys.argv[1:])
    result = overhead(json.loads(apt_path.read_text()), json.loads(lora_path.read_text()))
    result.update(apt=str(apt_path), lora=str(lora_path))
    r = result
    print(
        f"scoring {r['score_s']:.2f} s + search {r['search_s']:.2f} s over {r['steps']} steps = "
        f"{r['per_step_ms']:.2f} ms per step = {r['relative_to_lora_step']:.1%} of a LoRA step "
        f"({r['lora_median_step_ms']:.1f} ms); {r['fraction_of_own_step_time']:.1%} of the APT run's "
        "own step time"
    )
    out = apt_path.with_name("pruning_overhead.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
