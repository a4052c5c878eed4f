"""Pruning a model to a recorded final structure: the kept counts of a run's pruning log.

Every pruning event in ``pruning.json`` (written by `AdaptivePruning` and the Torch-Pruning peer) records the
widths its decisions kept: ``heads_per_layer``, ``neurons_per_layer``, ``hidden_kept``, for grouped-query
attention ``kv_groups_per_layer`` (query heads kept in each key/value group the model had at that event; an
empty list: no attention left in that layer), and ``params_kept``. `prune_to_structure` cuts a model of the
run's architecture to exactly those counts through the family's own mask -> compaction path
(`PrunableStructure.reshape`, the one `load_pruned` uses), keeping the first blocks of each kind: which
blocks are kept changes the values, never the shapes. The result has the parameter shapes of the run's
export and the weights the model had, which is all a timing needs (`apt-ablate bench --from-structure`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from apt_lightning.structure import ModelShapes, get_structure


class StructureError(ValueError):
    """A recorded structure that is unreadable or does not fit the model: the message names the key, the
    layer and the value."""


def last_pruning_event(path: str | Path) -> dict | None:
    """The last event of a ``pruning.json`` (the run's final structure); None when it records no events."""
    path = Path(path)
    try:
        log = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pruning log {path} not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StructureError(f"{path} cannot be read as a pruning log: {err}") from err
    events = log.get("events") if isinstance(log, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise StructureError(f"{path} has no list of events: not a pruning.json written by apt-fit")
    return events[-1] if events else None


def prune_to_structure(model: nn.Module, structure: Mapping[str, Any] | str | Path) -> ModelShapes:
    """Prune `model` in place to a recorded structure and compact it; returns its shapes.

    `structure`: one event of a ``pruning.json`` (a mapping) or the path of a ``pruning.json`` (its last
    event). Only the counts are taken; the first heads (of each key/value group), neurons and hidden dims are
    kept. Raises `StructureError` before touching the model when the structure does not fit it (another
    number of layers, more kept than the model has, key/value groups on a model without grouped-query
    attention or missing on one with it), and after pruning when the model's counted parameters
    (`ModelShapes.counted_params`) differ from the event's ``params_kept``.
    """
    if isinstance(structure, Mapping):
        event, where = dict(structure), f"pruning event {structure.get('event', '?')}"
    else:
        event = last_pruning_event(structure)
        if event is None:
            raise StructureError(f"{structure} records no pruning events: the run was never pruned")
        where = f"{structure} (event {event.get('event', '?')})"
    family = get_structure(model)
    target = _target_shapes(event, family.shapes(), type(model).__name__, where)
    family.reshape(target)
    shapes = family.shapes()
    recorded = event.get("params_kept")
    if recorded is not None and shapes.counted_params() != recorded:
        raise StructureError(
            f"{where}: the pruned {type(model).__name__} counts {shapes.counted_params()} parameters, the "
            f"event recorded params_kept {recorded}: the structure was recorded on another architecture"
        )
    return shapes


def _target_shapes(event: dict, current: ModelShapes, model_name: str, where: str) -> ModelShapes:
    """The recorded counts as `ModelShapes` of the model (its head size, costs and full widths), checked."""
    if "heads_per_layer" not in event and "event" in event:
        raise StructureError(
            f"{where} has no heads_per_layer: its mask window never finished, so the run ended without a "
            "final structure"
        )
    layers = current.num_layers
    heads = _per_layer(event, "heads_per_layer", current.heads, "heads", where, model_name)
    neurons = _per_layer(event, "neurons_per_layer", current.neurons, "neurons", where, model_name)
    hidden = event.get("hidden_kept")
    if type(hidden) is not int or not 1 <= hidden <= current.hidden:
        raise StructureError(
            f"{where}: hidden_kept must be an integer in [1, {current.hidden}] (the {model_name}'s hidden "
            f"size), got {hidden!r}"
        )
    groups = event.get("kv_groups_per_layer") or []
    if groups and not current.kv_groups:
        raise StructureError(
            f"{where}: kv_groups_per_layer given, but the {model_name} has no grouped-query attention (each "
            "head has its own keys and values)"
        )
    if current.kv_groups:
        if not groups:
            raise StructureError(
                f"{where} has no kv_groups_per_layer, but the {model_name} has grouped-query attention: its "
                "shapes depend on how many query heads each key/value group keeps"
            )
        if not isinstance(groups, list) or len(groups) != layers:
            raise StructureError(
                f"{where}: kv_groups_per_layer must list {layers} layers (one list per layer), got {groups!r}"
            )
        for i, (want, have) in enumerate(zip(groups, current.kv_groups, strict=True)):
            if not isinstance(want, list) or not all(type(n) is int and n >= 0 for n in want):
                raise StructureError(
                    f"{where}: kv_groups_per_layer[{i}] must be a list of non-negative integers, got {want!r}"
                )
            if len(want) > len(have):
                raise StructureError(
                    f"{where}: kv_groups_per_layer[{i}] = {want} has {len(want)} key/value groups, layer {i} "
                    f"of the {model_name} has {len(have)}"
                )
            over = [g for g, n in enumerate(want) if n > have[g]]
            if over:
                raise StructureError(
                    f"{where}: kv_groups_per_layer[{i}] = {want} keeps more query heads in group {over[0]} "
                    f"than the {model_name} has there ({have[over[0]]})"
                )
            if sum(want) != heads[i]:
                raise StructureError(
                    f"{where}: kv_groups_per_layer[{i}] = {want} adds up to {sum(want)} query heads, "
                    f"heads_per_layer[{i}] is {heads[i]}"
                )
    return ModelShapes(
        heads,
        neurons,
        hidden,
        current.head_dim,
        current.costs,
        [list(g) for g in groups],
        full_heads=list(current.full_heads),
        full_neurons=list(current.full_neurons),
        full_hidden=current.full_hidden,
        full_kv_groups=[list(g) for g in current.full_kv_groups],
    )


def _per_layer(event: dict, key: str, have: list[int], what: str, where: str, model_name: str) -> list[int]:
    value = event.get(key)
    if not isinstance(value, list) or not all(type(n) is int and n >= 0 for n in value):
        raise StructureError(f"{where}: {key} must be a list of non-negative integers, got {value!r}")
    if len(value) != len(have):
        raise StructureError(f"{where}: {key} lists {len(value)} layers, the {model_name} has {len(have)}")
    for i, (n, limit) in enumerate(zip(value, have, strict=True)):
        if n > limit:
            raise StructureError(
                f"{where}: {key}[{i}] = {n} exceeds the {limit} {what} of layer {i} of the {model_name}"
            )
    return list(value)
