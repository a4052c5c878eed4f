"""The override language: how a variant changes one base recipe (an ``apt-fit`` config).

There is one set of keys, apt-fit's own: a config file's keys, ``--key.sub`` on the command line. The APT
callbacks are apt-fit's groups ``pruning``, ``tuning`` and ``distillation`` (`apt_lightning.cli.
CALLBACK_GROUPS`), written flat (``pruning: {target_sparsity: 0.5}``) or as ``{class_path, init_args}``;
a group that is null or left out is off.

Overlay files (``configs/ablations/<variant>.yaml``) are partial apt-fit configs merged onto the base,
plus two keys for the report::

    description: one line for RESULTS.md
    paper: {source: Table 4, sst2: 92.9}           # the paper's score for this variant (report only)
    pruning: {target_sparsity: 0.2}                # merged into the base's pruning group
    distillation: null                             # switched off
    tuning: {start_step: "${pruning.start_step}"}  # a reference (below)
    model: {init_args: {adapters: null}}           # any apt-fit key

Merging: a mapping onto a mapping merges key by key, except that a different ``class_path`` replaces the
whole mapping; anything else (null, a list, a scalar) replaces. Suite ``set`` keys are the same keys
dotted (``pruning.start_step: 2``, ``model.init_args.adapters: null``) and replace the value at that key;
a key inside a group the variant switched off is skipped, one inside a group nobody switched on is an
error, as is an argument the group's class does not take. In a list, an integer part is an index and
any other part a class name (``trainer.callbacks.EfficiencyMonitor.init_args.x``: every such entry).

A string value that is exactly ``${seed}`` becomes the run's seed; exactly ``${a.b}`` becomes that
dotted key of the base as the run's overrides (`compose`) set it, for a group argument its class default
when nothing sets it (``${pruning.start_step}``). Composed configs hold every group as ``{class_path,
init_args}``; a base that lists an APT callback in ``trainer.callbacks`` has it moved into its group.
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

_META_KEYS = {"description", "paper"}
_CONFIG_KEYS = {"seed_everything", "trainer", "model", "data", "checkpoint_every_n_steps", "ckpt_path"}
_OLD_KEYS = {"remove_callbacks", "add_callbacks", "callback_args", "callback_defaults", "set"}
_REF = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def groups() -> dict[str, str]:
    """apt-fit's callback groups: {key: class path of its default class}."""
    from apt_lightning.cli import CALLBACK_GROUPS

    def path(cls: type) -> str:  # the package's export (apt_lightning.callbacks.X) where there is one
        package = cls.__module__.rpartition(".")[0]
        if package and getattr(importlib.import_module(package), cls.__name__, None) is cls:
            return f"{package}.{cls.__name__}"
        return f"{cls.__module__}.{cls.__qualname__}"

    return {key: path(cls) for key, cls in CALLBACK_GROUPS.items()}


def _group_of_class(name: str) -> str | None:
    return next((key for key, path in groups().items() if path.rsplit(".", 1)[-1] == name), None)


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
    EfficiencyMonitor.init_args.reference`` sets that argument of every EfficiencyMonitor entry (none: 0).
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
    """Class names a dotted key addresses inside lists (``trainer.callbacks.EfficiencyMonitor...``)."""
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
    """`trainer.callbacks` of `config` as a list (created if missing): the callbacks besides the groups."""
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
    param = _parameters(class_path, f"read the default of {arg!r}").get(arg)
    if param is None or param.default is inspect.Parameter.empty:
        raise SuiteError(f"{class_path} has no argument {arg!r} with a default")
    return param.default


def _parameters(class_path: str, why: str) -> dict[str, inspect.Parameter]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SuiteError(f"cannot import {class_path} to {why}: {err}") from err
    return dict(inspect.signature(cls).parameters)


# ---------------------------------------------------------------------- groups
def canonical_group(key: str, value: Any, where: str, default_class: str | None = None) -> dict | None:
    """A group's value as ``{class_path, init_args}`` (None: off); its argument names are checked. Arguments
    without a class_path belong to `default_class` (the group's class in the config they are merged onto),
    else to the group's standard class."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"class_path": value}
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: `{key}` must be a mapping of arguments or null, got {value!r}")
    args = {k: v for k, v in value.items() if k not in ("class_path", "init_args")}
    args.update(value.get("init_args") or {})
    class_path = value.get("class_path") or default_class or groups()[key]
    params = _parameters(class_path, f"check `{key}`")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise SuiteError(
                f"{where}: `{key}` ({class_path.rsplit('.', 1)[-1]}) has no argument(s) {unknown}; "
                f"it takes {sorted(params)}"
            )
    return {"class_path": class_path, "init_args": args}


def canonical_config(config: dict, where: str) -> dict:
    """A copy of `config` with every group as ``{class_path, init_args}`` or None, and APT callbacks
    listed in ``trainer.callbacks`` moved into their groups."""
    config = copy.deepcopy(config)
    listed = (config.get("trainer") or {}).get("callbacks")
    if isinstance(listed, list | dict):
        cbs = callback_list(config)
        for entry in list(cbs):
            key = _group_of_class(class_name(entry))
            if key is not None and config.get(key) is None:
                config[key] = entry
                cbs.remove(entry)
    for key in groups():
        config[key] = canonical_group(key, config.get(key), where)
    return config


def merge(base: Any, over: Any) -> Any:
    """`over` merged onto `base` (module docstring); neither is modified."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    if "class_path" in over and base.get("class_path") not in (None, over["class_path"]):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
    return out


def apply_set(config: dict, key: str, value: Any, base: dict, where: str) -> None:
    """Set one dotted key of a suite's ``set`` in `config` (canonical), the module docstring's rules;
    `base` (canonical) tells a group the variant switched off from one nobody switched on."""
    head, *rest = key.split(".")
    if head in groups():
        if not rest:
            config[head] = canonical_group(head, value, f"{where}: {key}")
            return
        if config.get(head) is None:
            if base.get(head) is not None:
                return  # the variant switched the group off: suite-wide settings skip it
            raise SuiteError(
                f"{where}: {key!r} sets an argument of `{head}`, which is off in the base config and in this "
                f"variant; set `{head}: {{...}}` to switch it on"
            )
        if rest[0] not in ("class_path", "init_args"):
            rest = ["init_args", *rest]
        if rest[0] == "init_args" and len(rest) > 1:
            canonical_group(head, {**config[head], "init_args": {rest[1]: None}}, f"{where}: {key}")
        set_dotted(config[head], ".".join(rest), value)
        return
    known = {class_name(cb) for cb in callback_list(copy.deepcopy(base)) + callback_list(config)}
    for name in class_keys(key):
        group = _group_of_class(name)
        if group is not None:
            raise SuiteError(f"{where}: {key!r}: {name} is apt-fit's `{group}` group; write `{group}.<arg>`")
        if name not in known:
            raise SuiteError(
                f"{where}: {key!r} addresses callback {name}, which neither the base config nor "
                f"this variant has (callbacks: {sorted(known)})"
            )
    set_dotted(config, key, value)


# ---------------------------------------------------------------------- references
def resolve_refs(value: Any, refs: dict, seed: int | None, where: str) -> Any:
    """`value` with ``${seed}`` and ``${a.b}`` references replaced (`refs`: a canonical config)."""
    if isinstance(value, dict):
        return {k: resolve_refs(v, refs, seed, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, refs, seed, where) for v in value]
    if not isinstance(value, str) or not value.startswith("${"):
        return value
    match = _REF.match(value)
    if match is None:
        raise SuiteError(f"{where}: bad reference {value!r}; use ${{seed}} or ${{key.arg}}")
    path = match.group(1)
    if path == "seed":
        return 0 if seed is None else seed
    head, _, arg = path.partition(".")
    missing = object()
    if head in groups() and arg:
        group = refs.get(head)
        if group is None:
            raise SuiteError(f"{where}: {value} refers to `{head}`, which is off in the base config")
        inner = arg if arg.split(".")[0] in ("class_path", "init_args") else f"init_args.{arg}"
        found = get_dotted(group, inner, missing)
        if found is missing and "." not in arg:
            return class_default(group["class_path"], arg)
        if found is missing:
            raise SuiteError(f"{where}: {value}: `{head}` sets no {arg!r}")
        return found
    found = get_dotted(refs, path, missing)
    if found is missing:
        group = _group_of_class(head)
        hint = f"; {head} is apt-fit's group: ${{{group}.{arg}}}" if group else ""
        raise SuiteError(f"{where}: {value} refers to {path!r}, which the base config does not set{hint}")
    return found


# ---------------------------------------------------------------------- overlays
def load_overlay(path: Path) -> dict:
    """Read and check an overlay file (see the module docstring); an empty file is the identity."""
    data = load_yaml(path, "overlay") or {}
    if not isinstance(data, dict):
        raise SuiteError(f"overlay {path} must be a mapping")
    check_overlay(data, f"overlay {path}")
    return data


def check_overlay(data: dict, where: str) -> None:
    """Raise SuiteError for keys apt-fit does not have, old-syntax keys, unknown group arguments and a
    malformed `paper`."""
    old = sorted(set(data) & _OLD_KEYS)
    if old:
        raise SuiteError(
            f"{where}: {old} is the old overlay syntax; an overlay is now a partial apt-fit config, "
            "e.g. `pruning: {target_sparsity: 0.5}`, `distillation: null`, "
            "`model: {init_args: {adapters: null}}`"
        )
    allowed = _META_KEYS | _CONFIG_KEYS | set(groups())
    unknown = set(data) - allowed
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in groups():
        if key in data:
            canonical_group(key, data[key], where)
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
            f"{where}: paper must map GLUE task names ({', '.join(GLUE_TASKS)}) to the paper's "
            f"scores (numbers) plus an optional source (text), got {bad or paper!r}"
        )


def apply_overlay(
    base: dict, overlay: dict, seed: int | None = None, where: str = "overlay", refs: dict | None = None
) -> dict:
    """Return `base` (an apt-fit config) merged with `overlay`, groups canonical; `base` is not modified.

    References read `refs` (default: `base`), e.g. the base with the run's overrides.
    """
    check_overlay(overlay, where)
    config = canonical_config(base, where)
    refs = canonical_config(base if refs is None else refs, where)  # not `config`: it changes below
    for key, value in overlay.items():
        if key in _META_KEYS:
            continue
        value = resolve_refs(value, refs, seed, f"{where}: {key}")
        if key in groups():
            current = (config.get(key) or {}).get("class_path")
            value = canonical_group(key, value, where, default_class=current)
        config[key] = merge(config[key], value) if key in config else copy.deepcopy(value)
    return config
