"""The overlay language: how a variant changes one base recipe (an ``apt-fit`` config).

Overlay files (``configs/ablations/<variant>.yaml``)::

    description: one line for RESULTS.md
    paper: {source: Table 4, sst2: 92.9}           # the paper's score for this variant (report only)
    remove_callbacks: [SelfDistillation]           # by class name (the last part of class_path)
    add_callbacks:                                 # appended, full {class_path, init_args} entries
      - {class_path: lightning.pytorch.callbacks.LearningRateMonitor}
    callback_args:                                 # init_args set on every callback of that class
      AdaptivePruning: {target_sparsity: 0.2}
    callback_defaults:                             # like callback_args, only where the base sets nothing
      AdaptiveTuning: {start_step: ${AdaptivePruning.start_step}}
    set:                                           # dotted keys into the config; null is a value
      model.init_args.adapters: null

Order: remove, add, callback_args, callback_defaults, set. Removing or configuring a callback the base
lacks is an error. A string value that is exactly ``${Class.arg}`` becomes that argument of the base's
callback as the run's overrides (`compose`) set it, or its class default when nothing sets it; exactly
``${seed}`` becomes the run's seed.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.tools.suite.spec import SuiteError

_OVERLAY_KEYS = {
    "description",
    "paper",
    "remove_callbacks",
    "add_callbacks",
    "callback_args",
    "callback_defaults",
    "set",
}

_REF = re.compile(r"^\$\{([A-Za-z_][\w]*)(?:\.([A-Za-z_]\w*))?\}$")


# ---------------------------------------------------------------------- files
def load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SuiteError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{what} {path} is not valid YAML: {err}") from err


# ---------------------------------------------------------------------- config editing
def set_dotted(config: dict, key: str, value: Any) -> int:
    """Set ``a.b.c`` in a nested config, creating mappings on the way; return how many places were set.

    In a list, an integer part is an index and any other part a class name: ``trainer.callbacks.
    AdaptivePruning.init_args.start_step`` sets that argument of every AdaptivePruning entry (none: 0).
    """
    return _set_parts(config, key.split("."), value, key)


def _set_parts(node: Any, parts: list[str], value: Any, key: str) -> int:
    part, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if part.lstrip("-").isdigit():
            targets = [int(part)]
            if not -len(node) <= targets[0] < len(node):
                raise SuiteError(f"cannot set {key!r}: index {part} is outside a list of {len(node)}")
        else:
            targets = [i for i, item in enumerate(node) if class_name(item) == part]
        if not rest:
            for i in targets:
                node[i] = copy.deepcopy(value)
            return len(targets)
        return sum(_set_parts(node[i], rest, value, key) for i in targets)
    if not isinstance(node, dict):
        raise SuiteError(f"cannot set {key!r}: {part!r} is inside a {type(node).__name__}, not a mapping")
    if not rest:
        node[part] = copy.deepcopy(value)
        return 1
    if not isinstance(node.get(part), dict | list):
        node[part] = [] if part == "callbacks" else {}
    return _set_parts(node[part], rest, value, key)


def class_keys(key: str) -> list[str]:
    """Class names a dotted key addresses inside lists (``trainer.callbacks.AdaptivePruning...``)."""
    parts = key.split(".")
    return [p for prev, p in zip(parts, parts[1:], strict=False) if prev == "callbacks" and not p.isdigit()]


def get_dotted(config: dict, key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return default
    return node


def class_name(entry: Any) -> str:
    path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry)
    return path.rsplit(".", 1)[-1]


def callback_list(config: dict) -> list:
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    cbs = trainer.get("callbacks")
    if cbs is None:
        cbs = []
    elif isinstance(cbs, dict):
        cbs = [cbs]
    trainer["callbacks"] = cbs
    return cbs


def class_default(class_path: str, arg: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SuiteError(f"cannot import {class_path} to read the default of {arg!r}: {err}") from err
    param = inspect.signature(cls).parameters.get(arg)
    if param is None or param.default is inspect.Parameter.empty:
        raise SuiteError(f"{class_path} has no argument {arg!r} with a default")
    return param.default


def resolve_refs(value: Any, base: dict, seed: int | None, where: str) -> Any:
    if isinstance(value, dict):
        return {k: resolve_refs(v, base, seed, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, base, seed, where) for v in value]
    if not isinstance(value, str) or not value.startswith("${"):
        return value
    match = _REF.match(value)
    if match is None:
        raise SuiteError(f"{where}: bad reference {value!r}; use ${{seed}} or ${{CallbackClass.arg}}")
    name, arg = match.groups()
    if arg is None:
        if name != "seed":
            raise SuiteError(f"{where}: unknown reference {value!r}; use ${{seed}} or ${{CallbackClass.arg}}")
        return 0 if seed is None else seed
    entries = [cb for cb in callback_list(copy.deepcopy(base)) if class_name(cb) == name]
    if not entries:
        raise SuiteError(f"{where}: {value} refers to callback {name}, which the base config does not have")
    args = entries[0].get("init_args") or {}
    return args[arg] if arg in args else class_default(entries[0]["class_path"], arg)


def load_overlay(path: Path) -> dict:
    """Read and check an overlay file (see the module docstring); an empty file is the identity."""
    data = load_yaml(path, "overlay") or {}
    if not isinstance(data, dict):
        raise SuiteError(f"overlay {path} must be a mapping")
    unknown = set(data) - _OVERLAY_KEYS
    if unknown:
        raise SuiteError(f"overlay {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_OVERLAY_KEYS)}")
    for key in ("callback_args", "callback_defaults", "set"):
        if not isinstance(data.get(key) or {}, dict):
            raise SuiteError(f"overlay {path}: {key} must be a mapping")
    for key in ("remove_callbacks", "add_callbacks"):
        if not isinstance(data.get(key) or [], list):
            raise SuiteError(f"overlay {path}: {key} must be a list")
    for entry in data.get("add_callbacks") or []:
        if not isinstance(entry, dict) or "class_path" not in entry:
            raise SuiteError(f"overlay {path}: add_callbacks entries need a class_path, got {entry!r}")
    paper = data.get("paper") or {}
    from apt_lightning.data.tasks import GLUE_TASKS

    bad = {
        k: v
        for k, v in (paper.items() if isinstance(paper, dict) else [])
        if (k == "source" and not isinstance(v, str))
        or (k != "source" and (k not in GLUE_TASKS or isinstance(v, bool) or not isinstance(v, int | float)))
    }
    if not isinstance(paper, dict) or bad:
        raise SuiteError(
            f"overlay {path}: paper must map GLUE task names ({', '.join(GLUE_TASKS)}) to the paper's "
            f"scores (numbers) plus an optional source (text), got {bad or paper!r}"
        )
    return data


def apply_overlay(
    base: dict, overlay: dict, seed: int | None = None, where: str = "overlay", refs: dict | None = None
) -> dict:
    """Return a copy of `base` (an apt-fit config) changed by `overlay`; `base` is not modified.

    ``${Class.arg}`` references read `refs` (default: `base`), e.g. the base with the run's overrides.
    """
    refs = base if refs is None else refs
    config = copy.deepcopy(base)
    cbs = callback_list(config)
    for name in overlay.get("remove_callbacks") or []:
        if not any(class_name(cb) == name for cb in cbs):
            have = [class_name(cb) for cb in cbs]
            raise SuiteError(f"{where}: remove_callbacks names {name}, but the base has only {have}")
        cbs[:] = [cb for cb in cbs if class_name(cb) != name]
    cbs.extend(copy.deepcopy(overlay.get("add_callbacks") or []))
    for key, only_missing in (("callback_args", False), ("callback_defaults", True)):
        for name, args in (overlay.get(key) or {}).items():
            targets = [cb for cb in cbs if class_name(cb) == name]
            if not targets:
                raise SuiteError(
                    f"{where}: {key} names {name}, which is not among the callbacks "
                    f"{[class_name(cb) for cb in cbs]}"
                )
            for cb in targets:
                init = cb.setdefault("init_args", {}) or {}
                cb["init_args"] = init
                for arg, value in (args or {}).items():
                    if only_missing and init.get(arg) is not None:
                        continue
                    init[arg] = resolve_refs(value, refs, seed, f"{where}: {key}.{name}.{arg}")
    for key, value in (overlay.get("set") or {}).items():
        set_dotted(config, key, resolve_refs(value, refs, seed, f"{where}: set.{key}"))
    return config
