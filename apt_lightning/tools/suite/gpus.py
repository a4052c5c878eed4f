"""Which GPUs the training processes of a suite are spread over (CUDA_VISIBLE_DEVICES values), and the
device and dtype its benchmark and evaluation blocks resolve `auto` to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from apt_lightning.tools.suite.spec import SuiteError


def visible_gpus() -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries of this process, or None when the variable is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]


def select_gpus(value: Any, path: Path) -> list[str] | None:
    """The GPUs that training processes are spread over (CUDA_VISIBLE_DEVICES values), or None.
    `auto`: every GPU visible to the runner."""
    if value is None:
        return None
    visible = visible_gpus()
    if value == "auto":
        if visible is None:
            import torch

            visible = [str(i) for i in range(torch.cuda.device_count())]
        return visible or None  # no GPU here: nothing to spread (a plan or dry run still works)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and not all(isinstance(v, str) and v.isdigit() for v in value)
    ):
        raise SuiteError(
            f"suite {path}: gpus must be auto, a GPU index or a list of GPU indices (>= 0), got {value!r}"
        )
    if visible is None:
        return [str(v) for v in value]
    # indices count the GPUs this process may use, as torch does: map them to what the children may use
    out_of_range = [int(v) for v in value if int(v) >= len(visible)]
    if out_of_range:
        raise SuiteError(
            f"suite {path}: gpus {out_of_range} out of range: "
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} leaves {len(visible)} GPU(s), "
            f"indices 0..{len(visible) - 1}"
        )
    return [visible[int(v)] for v in value]


def least_loaded(gpus: list[str], busy: list[str | None]) -> str:
    """The GPU with the fewest running processes (the first of equals)."""
    return min(gpus, key=lambda g: busy.count(g))


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def device_and_dtype(options: dict) -> tuple[str, str]:
    """(device, dtype) of a suite's `benchmark` or `evaluation` block: device `auto` is CUDA where one is
    visible, else the CPU; dtype `auto` is bf16 on CUDA, fp32 on the CPU; dtype names as apt-bench's
    (bf16, fp16, fp32)."""
    import torch

    device = str(options["device"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(options["dtype"])
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return device, _DTYPE_ALIASES.get(dtype, dtype)
