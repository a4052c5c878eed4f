"""One-shot pruning without training: a data-free scorer, the block search, hard masks, compaction.

Used to make pruned models of a given sparsity for inference studies (`apt-bench`) and as the first step
of pruning baselines; training-time pruning is `AdaptivePruning`'s schedule of events.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from apt_lightning.pruning.blocks import kept_param_count
from apt_lightning.pruning.scorers import Scorer, build_scorer
from apt_lightning.pruning.search import select_blocks
from apt_lightning.structure import get_structure

DATA_FREE_SCORERS = ("magnitude", "uniform", "random")  # salience needs training batches


def prune_to_sparsity(
    model: nn.Module,
    sparsity: float,
    scorer: Scorer | str = "magnitude",
    multiple_of: int = 1,
    even_kv_groups: bool = False,
) -> dict[str, Any]:
    """Prune `model` in place to `sparsity` of its APT parameter count by the project's block search and
    remove the pruned blocks physically (no masks are left). Scorers must be data-free (magnitude, uniform,
    random, or a custom `Scorer` that does not observe batches); `multiple_of` and `even_kv_groups` as in
    `select_blocks`. Returns the kept widths, the achieved sparsity and the seconds spent scoring,
    searching and compacting."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    scorer = build_scorer(scorer)
    if scorer.observes_batches:
        raise ValueError(f"scorer {scorer.name!r} needs training batches; use one of {DATA_FREE_SCORERS}")
    structure = get_structure(model)
    shapes = structure.shapes()
    full = shapes.full().counted_params()
    budget = int((1.0 - sparsity) * full)
    masks = structure.install_masks()
    try:
        t0 = time.perf_counter()
        scorer.attach(structure)
        scores = scorer.scores(structure)
        t1 = time.perf_counter()
        keep = select_blocks(scores, shapes, budget, multiple_of, even_kv_groups)
        t2 = time.perf_counter()
        with torch.no_grad():
            keep.to_masks(masks)
        structure.compact()
    finally:
        structure.remove_masks()
    t3 = time.perf_counter()
    heads, neurons, hidden = keep.counts()
    kept = kept_param_count(keep, shapes)
    return {
        "target_sparsity": sparsity,
        "achieved_sparsity": 1.0 - kept / full,
        "params_kept": kept,
        "params_full": full,
        "budget": budget,
        "heads_per_layer": heads,
        "neurons_per_layer": neurons,
        "hidden": hidden,
        "scorer": scorer.name,
        "multiple_of": multiple_of,
        "even_kv_groups": even_kv_groups,
        "score_s": t1 - t0,
        "search_s": t2 - t1,
        "compact_s": t3 - t2,
    }
