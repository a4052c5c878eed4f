"""A finished run's pruned model rebuilt from its recorded structure (`apt-ablate bench --from-structure`).

The run's architecture (the backbone and task in its ``config.yaml``, built as `APTModule` builds it with
``pretrained=False``: random weights, no adapters) is cut to the final structure in ``logs/pruning.json``
by `apt_lightning.pruning.prune_to_structure`, which checks the counted parameters against the event's
``params_kept``; a run that never pruned is the dense architecture. Timing depends only on the shapes (the
decode loop runs a fixed number of greedy steps), so this stands in for the export when the checkpoints
are gone; it says nothing about accuracy.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.tools.suite.layout import CONFIG, LOG_DIR, PRUNING

STRUCTURE_SOURCE = f"structure:{LOG_DIR}/{PRUNING}"  # inference.json's "source": shapes from the log
DENSE_SOURCE = "structure:dense"  # a run without pruning: the dense architecture, random weights
PEER_CALLBACKS = ("TorchPruningPeer",)  # pruning callbacks outside the `pruning` group
_NOT_SHAPES = {"adapters", "pretrained", "optimizer", "lr_scheduler"}  # set here, or no part of the shapes


def _pruner(config: dict) -> str | None:
    """What prunes in a run's config: the `pruning` group or a peer callback; None when nothing does."""
    if config.get("pruning") is not None:
        return "the pruning group"
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        name = str(callback.get("class_path", "")) if isinstance(callback, dict) else ""
        if name.rsplit(".", 1)[-1] in PEER_CALLBACKS:
            return name
    return None


def structure_model(run_dir: Path) -> tuple[Any, dict, str]:
    """(model, hparams, source) of a finished run: its architecture with random weights at its recorded
    final widths, float32 in eval mode as `load_pruned` returns an export; the module arguments the dense
    reference is built from; and ``STRUCTURE_SOURCE`` or ``DENSE_SOURCE``."""
    import torch

    from apt_lightning.data.tasks import get_task
    from apt_lightning.module import APTModule
    from apt_lightning.pruning import last_pruning_event, prune_to_structure

    path = run_dir / CONFIG
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from err
    init = ((config or {}).get("model") or {}).get("init_args") or {}
    if "backbone" not in init:
        raise ValueError(f"{path} names no model.init_args.backbone: the architecture is unknown")
    params = inspect.signature(APTModule).parameters
    hparams = {k: v for k, v in init.items() if k in params and k not in _NOT_SHAPES}
    task = get_task(hparams.get("task", params["task"].default))
    hparams["task"] = task.to_config()  # as a checkpoint's hyperparameters hold it (the dense cache key)
    build = dict(hparams)
    if task.objective == "causal_lm":  # an export loads with transformers' default attention, not the run's
        build.pop("attn_implementation", None)
    model = APTModule(**build, adapters=None, pretrained=False).student
    log = run_dir / LOG_DIR / PRUNING
    event = last_pruning_event(log) if log.is_file() else None
    if event is not None:
        prune_to_structure(model, log)  # errors name the file
        source = STRUCTURE_SOURCE
    elif not log.is_file() and (pruner := _pruner(config)) is not None:
        raise ValueError(
            f"{run_dir}: the run prunes ({pruner}) but has no {LOG_DIR}/{PRUNING} to rebuild from"
        )
    else:
        source = DENSE_SOURCE
    return model.to(torch.float32).eval(), hparams, source
