"""Block search (docs/method.md section 5): sort blocks by density = score / cost and keep the longest
prefix whose APT parameter count fits the budget, optionally with hardware-friendly widths.

The search knows no architecture: blocks come with the family's unit costs (`ModelShapes.costs`). The
count of a prefix is D' * A', D' its hidden dims and A' the sum of its heads' and neurons' unit costs plus
one key/value head for the first query head of each group in the prefix, so it grows with the prefix and
the longest prefix within the budget is found by binary search."""

from __future__ import annotations

import math
import warnings

import torch

from apt_lightning.pruning.blocks import BlockTensors, block_costs, kept_param_count
from apt_lightning.structure import ModelShapes

_HEAD, _NEURON, _HIDDEN = 0, 1, 2


def _flatten(shapes: ModelShapes, scores: BlockTensors):
    """Flat vectors: density, kind, layer, position and key/value group (a global id; -1 for neurons and
    hidden dims) of every block."""
    costs = block_costs(shapes)
    kinds, layers, pos, groups = [], [], [], []
    offset = 0
    for kind, widths in ((_HEAD, shapes.heads), (_NEURON, shapes.neurons)):
        for layer, n in enumerate(widths):
            kinds.append(torch.full((n,), kind))
            layers.append(torch.full((n,), layer))
            pos.append(torch.arange(n))
            if kind == _HEAD:
                g = torch.tensor(shapes.head_groups(layer), dtype=torch.long).reshape(n)
                groups.append(g + offset)
                offset += int(g.max()) + 1 if n else 0
            else:
                groups.append(torch.full((n,), -1))
    kinds.append(torch.full((shapes.hidden,), _HIDDEN))
    layers.append(torch.full((shapes.hidden,), -1))
    pos.append(torch.arange(shapes.hidden))
    groups.append(torch.full((shapes.hidden,), -1))
    density = scores.flat().double() / costs.flat().double()
    return density, torch.cat(kinds), torch.cat(layers), torch.cat(pos), torch.cat(groups)


def _unit_widths(kinds: torch.Tensor, groups: torch.Tensor, shapes: ModelShapes) -> torch.Tensor:
    """Per block in the given order, what it adds to A' (the count per kept hidden dim): a head its own
    unit cost, plus a key/value head's if it is the first of its group in this order; a neuron its cost."""
    c = shapes.costs
    first = torch.zeros(len(kinds), dtype=torch.bool)
    heads = torch.nonzero(groups >= 0).flatten()
    if len(heads):
        _, inverse = torch.unique(groups[heads], return_inverse=True)
        earliest = torch.full((int(inverse.max()) + 1,), len(kinds), dtype=torch.long)
        earliest = earliest.scatter_reduce(0, inverse, heads, reduce="amin")
        first[earliest] = True
    heads_cost = (kinds == _HEAD) * float(c.head) + first * float(c.kv_head)
    return (heads_cost + (kinds == _NEURON) * float(c.neuron)).double()


def _prefix_counts(kinds: torch.Tensor, groups: torch.Tensor, shapes: ModelShapes) -> torch.Tensor:
    """APT count of every prefix: C_k = D'_k * A'_k."""
    d = torch.cumsum(kinds == _HIDDEN, 0).double()
    return d * torch.cumsum(_unit_widths(kinds, groups, shapes), 0)


def _to_blocks(shapes: ModelShapes, kinds, layers, pos, chosen: torch.Tensor) -> BlockTensors:
    keep = BlockTensors.full(shapes, 0.0)
    for kind, layer, p in zip(
        kinds[chosen].tolist(), layers[chosen].tolist(), pos[chosen].tolist(), strict=True
    ):
        if kind == _HEAD:
            keep.heads[layer][p] = 1.0
        elif kind == _NEURON:
            keep.neurons[layer][p] = 1.0
        else:
            keep.hidden[p] = 1.0
    return keep


def select_blocks(
    scores: BlockTensors,
    shapes: ModelShapes,
    budget: int,
    multiple_of: int = 1,
    even_kv_groups: bool = False,
) -> BlockTensors:
    """0/1 keep decisions whose APT count is at most `budget` and maximal: the next block in density
    order would exceed it. With `multiple_of` > 1 the hidden size is rounded to the nearest multiple
    and each layer's neuron count and attention width (heads x d_h) down to one (`_head_group`); the
    search then refills the budget around the fixed hidden size, so the count still never exceeds
    `budget`, and spends what rounding down freed on whole aligned groups (`_refill`). So without
    alignment the result is a strict density prefix; with it, a prefix plus a greedy fill that may skip a
    unit that no longer fits for a cheaper, less dense one. With `even_kv_groups` (grouped-query
    attention) each layer then keeps as many query heads in every key/value group it keeps
    (`_even_groups`) and the freed budget goes to FFN neurons; without GQA it changes nothing."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    density, kinds, layers, pos, groups = _flatten(shapes, scores)
    order = torch.sort(density, descending=True, stable=True).indices
    counts = _prefix_counts(kinds[order], groups[order], shapes)
    k = int(torch.searchsorted(counts, torch.tensor(float(budget), dtype=torch.float64), right=True))
    chosen = order[:k]
    even = even_kv_groups and any(n > 1 for layer in shapes.kv_groups for n in layer)
    if multiple_of == 1:
        keep = _to_blocks(shapes, kinds, layers, pos, chosen)
        if even and _even_groups(keep, shapes, density, 1):
            _refill(keep, shapes, density, budget, (1, 1), even=True)
        return keep
    return _aligned(shapes, density, kinds, layers, pos, groups, order, chosen, budget, multiple_of, even)


def _aligned(
    shapes, density, kinds, layers, pos, groups, order, chosen, budget, multiple_of, even
) -> BlockTensors:
    n_hidden = int((kinds[chosen] == _HIDDEN).sum())
    n_hidden = min(shapes.hidden, max(multiple_of, multiple_of * round(n_hidden / multiple_of)))
    hidden_order = order[kinds[order] == _HIDDEN][:n_hidden]
    rest = order[kinds[order] != _HIDDEN]
    a_budget = budget / n_hidden
    width = torch.cumsum(_unit_widths(kinds[rest], groups[rest], shapes), 0)
    k = int(torch.searchsorted(width, torch.tensor(a_budget, dtype=torch.float64), right=True))
    keep = _to_blocks(shapes, kinds, layers, pos, torch.cat([hidden_order, rest[:k]]))
    sizes = (_head_group(shapes, multiple_of), multiple_of)
    for _, mask, layer_density, size in _layer_masks(keep, density, sizes):
        excess = int(mask.sum()) % size
        if excess:
            kept = torch.nonzero(mask).flatten()
            mask[kept[torch.argsort(layer_density[kept], stable=True)[:excess]]] = 0.0
    if even:
        _even_groups(keep, shapes, density, sizes[0])
    _refill(keep, shapes, density, budget, sizes, even=even)
    return keep


def _layer_masks(keep: BlockTensors, density: torch.Tensor, sizes: tuple[int, int]):
    """(kind, mask, densities of its blocks, group size) for every layer's heads (kind 0), then every
    layer's neurons (kind 1): the flat density vector holds heads first, then neurons (`_flatten`)."""
    offset = 0
    for kind, (masks, size) in enumerate(zip((keep.heads, keep.neurons), sizes, strict=True)):
        for mask in masks:
            yield kind, mask, density[offset : offset + mask.numel()], size
            offset += mask.numel()


def _head_group(shapes: ModelShapes, multiple_of: int) -> int:
    """Fewest heads whose width is a multiple of `multiple_of`: 1 while d_h is one (x8, x64 with d_h 64),
    2 for x128 with d_h 64, so that every matrix dimension of an aligned prune is a multiple (on its own
    a small effect on an H200: docs/bench.md). 1 (heads unaligned, with a warning) where that group does
    not divide every layer's full head count: otherwise a layer could never keep all of its heads."""
    group = multiple_of // math.gcd(multiple_of, shapes.head_dim)
    if group > 1 and any(n % group for n in shapes.full_heads):
        warnings.warn(
            f"multiple_of {multiple_of} would keep heads (d_h {shapes.head_dim}) in groups of {group}, which "
            f"do not divide the layers' head counts {sorted(set(shapes.full_heads))}; attention widths are "
            "left unaligned",
            stacklevel=3,
        )
        return 1
    return group


def free_units(mask: torch.Tensor, score: torch.Tensor, size: int) -> list[torch.Tensor]:
    """One layer's pruned blocks (mask 0), best score first (ties: the earlier block), in whole units of
    `size`; a remainder smaller than a unit is left out. What an aligned refill may add back."""
    free = torch.nonzero(mask == 0).flatten()
    free = free[torch.argsort(score[free], descending=True, stable=True)]
    return [free[start : start + size] for start in range(0, len(free) - size + 1, size)]


def _groups_even(mask: torch.Tensor, group_of: torch.Tensor) -> bool:
    """Whether every key/value group with a kept query head keeps as many as the others."""
    counts = torch.bincount(group_of[mask > 0])
    return len(set(counts[counts > 0].tolist())) <= 1


def _even_groups(keep: BlockTensors, shapes: ModelShapes, density: torch.Tensor, head_unit: int) -> bool:
    """In place, per layer: keep m query heads in each of k key/value groups, so the export runs plain
    grouped-query attention (a layer whose groups keep unequal counts gathers keys and values per query
    head at every step, which costs decode speed: docs/method.md). A layer's count never grows: among the
    (k, m) with k x m a multiple of `head_unit` whose query and key/value heads cost at most what the layer
    kept, the choice whose heads add up to the most density (each group's m densest heads among those kept
    or still scored, the k groups whose m add up densest), then the fewest groups. A head scored 0 (pruned
    before) never comes back; a layer where no (k, m) fits stays as it was. Returns whether a layer
    changed."""
    c, changed = shapes.costs, False
    for layer, (kind, mask, layer_density, _) in enumerate(_layer_masks(keep, density, (1, 1))):
        if kind != _HEAD:
            break
        group_of = torch.tensor(shapes.head_groups(layer), dtype=torch.long)
        if _groups_even(mask, group_of):
            continue
        cost = int(mask.sum()) * c.head + len(group_of[mask > 0].unique()) * c.kv_head
        usable = (mask > 0) | (layer_density > 0)
        members = [torch.nonzero((group_of == g) & usable).flatten() for g in group_of.unique().tolist()]
        members = [g[torch.argsort(layer_density[g], descending=True, stable=True)] for g in members]
        best: tuple[tuple[float, int], list[torch.Tensor]] | None = None
        for m in range(1, max(len(g) for g in members) + 1):
            top = sorted(
                (g[:m] for g in members if len(g) >= m), key=lambda t: -float(layer_density[t].sum())
            )
            fits = [n for n in range(1, len(top) + 1) if (n * m) % head_unit == 0]
            fits = [n for n in fits if n * (m * c.head + c.kv_head) <= cost]
            if fits:
                k = max(fits)
                key = (float(sum(layer_density[t].sum() for t in top[:k])), -k)
                if best is None or key > best[0]:
                    best = (key, top[:k])
        if best is None:
            warnings.warn(
                f"even_kv_groups: layer {layer} keeps its uneven key/value groups: no even choice of heads "
                f"costs at most what it kept (head unit {head_unit})",
                stacklevel=4,
            )
            continue
        mask.zero_()
        for heads in best[1]:
            mask[heads] = 1.0
        changed = True
    return changed


def _refill(
    keep: BlockTensors,
    shapes: ModelShapes,
    density,
    budget: int,
    sizes: tuple[int, int],
    even: bool = False,
) -> None:
    """Add aligned units to `keep` in place, densest first, while the count stays within `budget`: the
    `sizes[0]` densest pruned heads of a layer, or its `sizes[1]` densest pruned neurons (then the next
    group); with `even`, a head unit only where the layer's key/value groups stay even. Without this,
    rounding each layer down leaves up to one group per layer of the budget unspent. A neuron unit costs
    exactly D' x its neurons' cost; a head unit is checked with the exact count (reviving a key/value
    head pays for it)."""
    units: list[tuple[float, int, int, torch.Tensor, list[int]]] = []  # density, kind, index, mask, blocks
    # a head mask's index is its layer: `_layer_masks` yields every layer's heads first
    for index, (kind, mask, layer_density, size) in enumerate(_layer_masks(keep, density, sizes)):
        for group in free_units(mask, layer_density, size):
            units.append((float(layer_density[group].mean()), kind, index, mask, group.tolist()))
    d = int(keep.hidden.sum())
    count = kept_param_count(keep, shapes)
    for _, kind, index, mask, group in sorted(units, key=lambda u: -u[0]):
        if kind != _HEAD:
            step = d * shapes.costs.neuron * len(group)
            if count + step <= budget:
                mask[group] = 1.0
                count += step
            continue
        if count + d * shapes.costs.head * len(group) > budget:
            continue
        mask[group] = 1.0
        new = kept_param_count(keep, shapes)
        if new > budget or (even and not _groups_even(mask, torch.tensor(shapes.head_groups(index)))):
            mask[group] = 0.0
        else:
            count = new
