"""Zero-shot evaluation of a causal LM on the local multiple-choice sets."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from apt_lightning.evaluation.metrics import TaskResult, ZeroShotResults
from apt_lightning.evaluation.scoring import loglikelihoods
from apt_lightning.evaluation.tasks import TASKS, default_data_root, resolve_task_names


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str] = "all",
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] | None = _log_to_stderr,
) -> ZeroShotResults:
    """Score every choice of every item by its summed log-likelihood and report acc / acc_norm per task.

    `tasks`: "all", a comma-separated string or a list of names from `TASK_NAMES`; `data_root`: the folder
    of the local sets (default `default_data_root()`); `limit`: the first N items of each task; `device`:
    where to run (default: where the model is; the model is moved there). Every task's files are read before
    anything runs, so a missing file fails at once. `log` gets one line per task (None: quiet)."""
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"zero-shot scoring needs a causal LM with a vocabulary head (a *ForCausalLM model); got "
            f"{type(model).__name__}"
        )
    names = resolve_task_names(tasks)
    root = default_data_root() if data_root is None else Path(data_root)
    items = {name: TASKS[name].load(root, limit) for name in names}
    if device is not None:
        model.to(device)
    model.eval()
    results = {}
    for name, task_items in items.items():
        started = time.perf_counter()
        requests = [r for item in task_items for r in item.requests()]
        scores = iter(loglikelihoods(model, tokenizer, requests, batch_size=batch_size))
        per_item = [[next(scores) for _ in range(item.num_choices)] for item in task_items]
        results[name] = TaskResult.from_scores(task_items, per_item)
        if log is not None:
            r = results[name]
            log(
                f"{name}: n={r.n} acc={r.acc:.4f} acc_norm={r.acc_norm:.4f} chance={r.chance:.4f} "
                f"({len(requests)} requests, {time.perf_counter() - started:.1f} s)"
            )
    return ZeroShotResults(model=model_name or type(model).__name__, tasks=results, limit=limit)
