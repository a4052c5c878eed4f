"""`apt-ablate`: run an ablation suite (variants x seeds x tasks of `apt-fit` runs), benchmark, report.

Usage::

    apt-ablate run configs/suites/smoke_cpu.yaml [--data-root DIR] [--output DIR] [--parallel N]
               [--variants apt ft] [--tasks sst2] [--seeds 0 1] [--set trainer.max_steps=50]
               [--force] [--strict] [--no-bench] [--dry-run]
    apt-ablate bench SUITE [...]     # inference benchmarks of finished runs only
    apt-ablate plan SUITE [...]      # list the runs and their status, run nothing
    apt-ablate report SUITE_DIR      # results.csv, runs.csv, RESULTS.md and plots (apt_lightning.report)
    apt-ablate relabel SUITE OLD:NEW [...]   # finished runs to the variant whose config they have
                                             # (after a recipe change; apt_lightning.relabel)

Overlay files (``configs/ablations/<variant>.yaml``) change ONE base recipe (an ``apt-fit`` config)::

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
callback as the run's overrides (below) set it, or its class default when nothing sets it; exactly
``${seed}`` becomes the run's seed.

Suite files (``configs/suites/*.yaml``; config paths are relative to the suite file, data and output
paths to the working directory)::

    name: smoke_cpu                       # W&B group and default output folder runs/ablations/<name>
    description: what this suite is for
    base: ../minilm_sst2_apt.yaml         # the recipe every overlay changes
    overlay_dir: ../ablations             # default: configs/ablations next to the suites folder
    output_dir: runs/ablations/smoke_cpu
    data_root: ../shared/data/glue        # substituted into "{data_root}" in task data_dir (--data-root)
    reference: ft                         # the FT variant: % of FT, TTA and memory ratios
    seeds: [0]                            # default seeds of every variant
    parallel: 1                           # concurrent training processes (they share one GPU)
    gpus: null                            # [0, 1] or auto (all visible): spread the processes over GPUs
    timeout_s: null                       # per-run wall-clock limit
    strict: false                         # exit 1 when any run failed
    keep_checkpoints: true                # keep <run>/final.ckpt after benchmarking
    args: ["--trainer.accelerator=cpu"]   # extra apt-fit arguments, appended to every run
    set: {trainer.max_steps: 12}          # dotted overrides for every run
    variants:                             # a name (overlay <name>.yaml) or a mapping:
      - apt
      - {name: ft, seeds: [0, 1, 2], tasks: [sst2], overlay: ft, base: ../other.yaml, set: {...}}
    tasks:                                # GLUE task names, or labels with `task:`
      sst2: {data_dir: "{data_root}/sst2", set: {data.init_args.train_limit: 256}}
      mnli9k: {task: mnli, label: MNLI-9k subset, data_dir: "{data_root}/mnli_subset"}
    efficiency: {init_args: {}}           # EfficiencyMonitor options, or false
    benchmark: {batch_size: 128, seq_len: 128, dtype: auto, device: auto, warmup: 10, repeats: 30,
                rounds: 3, cuda_graphs: false}   # or false; auto: bf16 on CUDA, fp32 on the CPU
    wandb: {project: apt-ablations, offline: true}   # or false (default); group = suite name

Overrides apply in the order overlay, suite ``set``, task, variant ``set``, ``--set``; then the runner sets
the seed, the loggers (CSV into ``<run>/logs``, W&B if enabled), the EfficiencyMonitor (its TTA reference is
the FT run's best metric of the same task and seed when that run finished first) and turns the default
checkpointing off (it saves ``<run>/final.ckpt`` itself). In every ``set``, a list is indexed by position or
by class name: ``trainer.callbacks.AdaptivePruning.init_args.start_step: 2`` sets every AdaptivePruning
(a variant that removed it is skipped; a name neither the base nor the variant has is an error).

Each run lives in ``<output_dir>/<variant>/<task>/seed<N>/``: ``config.yaml`` (exactly what apt-fit
got), ``run.json`` (what the run is, how to rerun it), ``train.log``, ``logs/`` (metrics.csv,
pruning.json, efficiency.json), ``final.ckpt``, then ``done.json`` (written atomically when training
succeeded: finished runs are skipped next time) or ``failed.json`` (exit code and log tail; retried next
time), and ``inference.json`` (the exported model against the dense one, measured after all training so
no run shares the device with a benchmark).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.files import write_json_atomic, write_text_atomic

DONE, FAILED, INFERENCE, BENCH_FAILED = "done.json", "failed.json", "inference.json", "inference_failed.json"
RUN_META, CONFIG = "run.json", "config.yaml"
LOG_DIR, TRAIN_LOG, FINAL_CKPT, SUITE_META = "logs", "train.log", "final.ckpt", "suite.json"
EFFICIENCY_CLASS = "apt_lightning.callbacks.efficiency.EfficiencyMonitor"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
BENCH_DEFAULTS = {
    "batch_size": 128,
    "seq_len": 128,
    "dtype": "auto",
    "device": "auto",
    "warmup": 10,
    "repeats": 30,
    "rounds": 3,
    "cuda_graphs": False,
}

_OVERLAY_KEYS = {
    "description",
    "paper",
    "remove_callbacks",
    "add_callbacks",
    "callback_args",
    "callback_defaults",
    "set",
}
_SUITE_KEYS = {
    "name",
    "description",
    "base",
    "overlay_dir",
    "output_dir",
    "data_root",
    "reference",
    "seeds",
    "parallel",
    "gpus",
    "timeout_s",
    "strict",
    "keep_checkpoints",
    "args",
    "set",
    "variants",
    "tasks",
    "efficiency",
    "benchmark",
    "wandb",
}
_VARIANT_KEYS = {"name", "overlay", "base", "seeds", "tasks", "set", "description"}
_TASK_KEYS = {"task", "label", "data_dir", "set"}
_REF = re.compile(r"^\$\{([A-Za-z_][\w]*)(?:\.([A-Za-z_]\w*))?\}$")


class SuiteError(ValueError):
    """A suite, overlay or base config that cannot be run; raised before any run starts."""


# ---------------------------------------------------------------------- files
def _load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SuiteError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{what} {path} is not valid YAML: {err}") from err


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


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
            targets = [i for i, item in enumerate(node) if _class_name(item) == part]
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


def _class_keys(key: str) -> list[str]:
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


def _class_name(entry: Any) -> str:
    path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry)
    return path.rsplit(".", 1)[-1]


def _callbacks(config: dict) -> list:
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    cbs = trainer.get("callbacks")
    if cbs is None:
        cbs = []
    elif isinstance(cbs, dict):
        cbs = [cbs]
    trainer["callbacks"] = cbs
    return cbs


def _class_default(class_path: str, arg: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SuiteError(f"cannot import {class_path} to read the default of {arg!r}: {err}") from err
    param = inspect.signature(cls).parameters.get(arg)
    if param is None or param.default is inspect.Parameter.empty:
        raise SuiteError(f"{class_path} has no argument {arg!r} with a default")
    return param.default


def _resolve_refs(value: Any, base: dict, seed: int | None, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_refs(v, base, seed, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, base, seed, where) for v in value]
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
    entries = [cb for cb in _callbacks(copy.deepcopy(base)) if _class_name(cb) == name]
    if not entries:
        raise SuiteError(f"{where}: {value} refers to callback {name}, which the base config does not have")
    args = entries[0].get("init_args") or {}
    return args[arg] if arg in args else _class_default(entries[0]["class_path"], arg)


def load_overlay(path: Path) -> dict:
    """Read and check an overlay file (see the module docstring); an empty file is the identity."""
    data = _load_yaml(path, "overlay") or {}
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
    cbs = _callbacks(config)
    for name in overlay.get("remove_callbacks") or []:
        if not any(_class_name(cb) == name for cb in cbs):
            have = [_class_name(cb) for cb in cbs]
            raise SuiteError(f"{where}: remove_callbacks names {name}, but the base has only {have}")
        cbs[:] = [cb for cb in cbs if _class_name(cb) != name]
    cbs.extend(copy.deepcopy(overlay.get("add_callbacks") or []))
    for key, only_missing in (("callback_args", False), ("callback_defaults", True)):
        for name, args in (overlay.get(key) or {}).items():
            targets = [cb for cb in cbs if _class_name(cb) == name]
            if not targets:
                raise SuiteError(
                    f"{where}: {key} names {name}, which is not among the callbacks "
                    f"{[_class_name(cb) for cb in cbs]}"
                )
            for cb in targets:
                init = cb.setdefault("init_args", {}) or {}
                cb["init_args"] = init
                for arg, value in (args or {}).items():
                    if only_missing and init.get(arg) is not None:
                        continue
                    init[arg] = _resolve_refs(value, refs, seed, f"{where}: {key}.{name}.{arg}")
    for key, value in (overlay.get("set") or {}).items():
        set_dotted(config, key, _resolve_refs(value, refs, seed, f"{where}: set.{key}"))
    return config


# ---------------------------------------------------------------------- the suite
@dataclass
class TaskSpec:
    key: str  # folder name and label in tables
    task: str  # GLUE task name
    label: str
    data_dir: str | None
    set: dict


@dataclass
class VariantSpec:
    name: str
    overlay_path: Path | None
    base_path: Path
    seeds: list[int]
    tasks: list[str]
    set: dict
    description: str


@dataclass
class RunSpec:
    variant: VariantSpec
    task: TaskSpec
    seed: int
    run_dir: Path
    config: dict  # the merged config (the EfficiencyMonitor's TTA reference is filled in at launch)

    @property
    def run_id(self) -> str:
        return f"{self.variant.name}/{self.task.key}/seed{self.seed}"


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    output_dir: Path
    data_root: str | None
    reference: str | None
    parallel: int
    gpus: list[str] | None
    timeout_s: float | None
    strict: bool
    keep_checkpoints: bool
    args: list[str]
    set: dict
    variants: list[VariantSpec]
    tasks: dict[str, TaskSpec]
    efficiency: dict | None
    benchmark: dict | None
    wandb: dict | None
    cli_set: dict = field(default_factory=dict)


def _as_seeds(value: Any, where: str) -> list[int]:
    if value is None:
        raise SuiteError(f"{where}: no seeds given; add `seeds: [0]` (a list of integers)")
    seeds = value if isinstance(value, list) else [value]
    if not seeds:
        raise SuiteError(f"{where}: zero seeds; give at least one (e.g. `seeds: [0]`)")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SuiteError(f"{where}: seeds must be integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: repeated seeds in {seeds}")
    return list(seeds)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SuiteError(f"--set expects KEY=VALUE (YAML value), got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def load_suite(
    path: str | Path,
    data_root: str | None = None,
    output_dir: str | None = None,
    parallel: int | None = None,
    gpus: str | int | list[int | str] | None = None,
    variants: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    cli_set: dict | None = None,
) -> Suite:
    """Read a suite file and check everything that can be checked without training (raises SuiteError).

    The keyword arguments are the command line's overrides; `variants`, `tasks`, `seeds` select a subset.
    """
    from apt_lightning.data.tasks import GLUE_TASKS

    path = Path(path)
    raw = _load_yaml(path, "suite file")
    if not isinstance(raw, dict):
        raise SuiteError(f"suite file {path} must be a mapping")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise SuiteError(f"suite {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SUITE_KEYS)}")
    here = path.resolve().parent
    name = str(raw.get("name") or path.stem)
    if "base" not in raw:
        raise SuiteError(f"suite {path}: `base` (the apt-fit recipe the overlays change) is required")
    base_path = (here / raw["base"]).resolve()
    if not base_path.is_file():
        raise SuiteError(f"suite {path}: base config {base_path} not found")
    overlay_dir = here.parent / "ablations"
    if raw.get("overlay_dir"):
        overlay_dir = (here / raw["overlay_dir"]).resolve()
    default_seeds = raw.get("seeds")

    # tasks
    task_raw = _mapping(raw.get("tasks"), f"suite {path}: tasks")
    if not task_raw:
        raise SuiteError(
            f'suite {path}: no tasks; add e.g. `tasks: {{sst2: {{data_dir: "{{data_root}}/sst2"}}}}`'
        )
    root = data_root if data_root is not None else raw.get("data_root")
    task_specs: dict[str, TaskSpec] = {}
    for key, spec in task_raw.items():
        spec = _mapping(spec, f"suite {path}: tasks.{key}")
        bad = set(spec) - _TASK_KEYS
        if bad:
            raise SuiteError(
                f"suite {path}: tasks.{key}: unknown keys {sorted(bad)}; allowed: {sorted(_TASK_KEYS)}"
            )
        glue = str(spec.get("task", key))
        if glue not in GLUE_TASKS:
            raise SuiteError(
                f"suite {path}: unknown task {glue!r} (tasks.{key}); known: {sorted(GLUE_TASKS)}"
            )
        data_dir = spec.get("data_dir")
        if data_dir is not None:
            data_dir = str(data_dir)
            if "{data_root}" in data_dir:
                if root is None:
                    raise SuiteError(
                        f"suite {path}: tasks.{key}.data_dir uses {{data_root}} but no "
                        "data_root is set (suite `data_root:` or --data-root)"
                    )
                data_dir = data_dir.replace("{data_root}", str(root).rstrip("/"))
            if not Path(os.path.expandvars(data_dir)).expanduser().is_dir():
                raise SuiteError(
                    f"suite {path}: tasks.{key}.data_dir {data_dir} is not a folder "
                    "(relative paths are from the working directory; see --data-root)"
                )
        task_specs[key] = TaskSpec(
            key, glue, str(spec.get("label", key)), data_dir, _mapping(spec.get("set"), f"tasks.{key}.set")
        )
    if tasks:
        missing = [t for t in tasks if t not in task_specs]
        if missing:
            raise SuiteError(f"--tasks {missing}: not in the suite's tasks {sorted(task_specs)}")
        task_specs = {k: v for k, v in task_specs.items() if k in tasks}

    # variants
    var_raw = raw.get("variants")
    if not isinstance(var_raw, list) or not var_raw:
        raise SuiteError(f"suite {path}: `variants` must be a non-empty list of names or mappings")
    specs: list[VariantSpec] = []
    available = sorted(p.stem for p in overlay_dir.glob("*.yaml")) if overlay_dir.is_dir() else []
    for entry in var_raw:
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "name" not in entry:
            raise SuiteError(
                f"suite {path}: a variant must be a name or a mapping with `name`, got {entry!r}"
            )
        bad = set(entry) - _VARIANT_KEYS
        if bad:
            raise SuiteError(
                f"suite {path}: variant {entry['name']}: unknown keys {sorted(bad)}; "
                f"allowed: {sorted(_VARIANT_KEYS)}"
            )
        vname = str(entry["name"])
        if any(v.name == vname for v in specs):
            raise SuiteError(f"suite {path}: variant {vname!r} is listed twice")
        overlay = entry.get("overlay", vname)
        overlay_path = None
        if overlay is not None:
            overlay_path = overlay_dir / f"{overlay}.yaml"
            if not overlay_path.is_file():
                raise SuiteError(
                    f"suite {path}: unknown variant {overlay!r}: no overlay {overlay_path}; "
                    f"available in {overlay_dir}: {available}"
                )
        vbase = (here / entry["base"]).resolve() if entry.get("base") else base_path
        if not vbase.is_file():
            raise SuiteError(f"suite {path}: variant {vname}: base config {vbase} not found")
        vseeds = _as_seeds(entry.get("seeds", default_seeds), f"suite {path}: variant {vname}")
        vtasks = entry.get("tasks") or list(task_raw)
        bad_tasks = [t for t in vtasks if t not in task_raw]
        if bad_tasks:
            raise SuiteError(
                f"suite {path}: variant {vname}: unknown task(s) {bad_tasks}; "
                f"the suite's tasks are {sorted(task_raw)}"
            )
        desc = entry.get("description")
        if desc is None and overlay_path is not None:
            desc = (load_overlay(overlay_path).get("description") or "").strip()
        specs.append(
            VariantSpec(
                vname,
                overlay_path,
                vbase,
                vseeds,
                [t for t in vtasks if t in task_specs],
                _mapping(entry.get("set"), f"variant {vname}: set"),
                desc or "",
            )
        )
    reference = raw.get("reference")
    if reference is not None and not any(v.name == reference for v in specs):
        raise SuiteError(f"suite {path}: reference {reference!r} is not one of the variants")
    if variants:
        missing = [v for v in variants if not any(s.name == v for s in specs)]
        if missing:
            raise SuiteError(f"--variants {missing}: not in the suite's variants {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in variants]
    if seeds is not None:
        seeds = _as_seeds(seeds, "--seeds")
        for spec in specs:
            spec.seeds = [s for s in spec.seeds if s in seeds]

    if not any(spec.seeds and spec.tasks for spec in specs):
        raise SuiteError(f"suite {path}: the selection (--variants / --tasks / --seeds) leaves no runs")
    par = parallel if parallel is not None else raw.get("parallel", 1)
    if not isinstance(par, int) or par < 1:
        raise SuiteError(f"suite {path}: parallel must be an integer >= 1, got {par!r}")
    gpu_ids = _gpu_ids(gpus if gpus is not None else raw.get("gpus"), path)
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SuiteError(f"suite {path}: args must be a list of strings (apt-fit arguments)")
    bench = raw.get("benchmark", {})
    bench = None if bench is False else {**BENCH_DEFAULTS, **_mapping(bench, "benchmark")}
    if bench is not None and set(bench) - set(BENCH_DEFAULTS):
        raise SuiteError(f"suite {path}: benchmark: unknown keys {sorted(set(bench) - set(BENCH_DEFAULTS))}")
    if bench is not None and not isinstance(bench["cuda_graphs"], bool):
        raise SuiteError(
            f"suite {path}: benchmark: cuda_graphs must be true or false, got {bench['cuda_graphs']!r}"
        )
    if bench is not None and bench["cuda_graphs"] and bench["device"] == "cpu":
        raise SuiteError(f"suite {path}: benchmark: cuda_graphs needs device cuda or auto, got device cpu")
    eff = raw.get("efficiency", {})
    wandb = raw.get("wandb", False)
    out = Path(output_dir or raw.get("output_dir") or f"runs/ablations/{name}")
    suite = Suite(
        path=path,
        name=name,
        description=str(raw.get("description") or "").strip(),
        output_dir=out,
        data_root=None if root is None else str(root),
        reference=reference,
        parallel=par,
        gpus=gpu_ids,
        timeout_s=raw.get("timeout_s"),
        strict=bool(raw.get("strict", False)),
        keep_checkpoints=bool(raw.get("keep_checkpoints", True)),
        args=list(args),
        set=_mapping(raw.get("set"), "set"),
        variants=specs,
        tasks=task_specs,
        efficiency=None if eff is False else _mapping(eff, "efficiency"),
        benchmark=bench,
        wandb=None if not wandb else ({} if wandb is True else _mapping(wandb, "wandb")),
        cli_set=dict(cli_set or {}),
    )
    plan(suite)  # compose every run's config now: overlay errors surface before anything runs
    return suite


def _visible_gpus() -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries of this process, or None when the variable is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]


def _gpu_ids(value: Any, path: Path) -> list[str] | None:
    """The GPUs that training processes are spread over (CUDA_VISIBLE_DEVICES values), or None.
    `auto`: every GPU visible to the runner."""
    if value is None:
        return None
    visible = _visible_gpus()
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


# ---------------------------------------------------------------------- composing runs
def primary_monitor(task: str) -> str:
    from apt_lightning.data.tasks import get_task

    return f"val/{get_task(task).primary_metric}"


def compose_config(suite: Suite, variant: VariantSpec, task: TaskSpec, seed: int, run_dir: Path) -> dict:
    """The complete apt-fit config of one run (see the module docstring for the order of overrides)."""
    base = _load_yaml(variant.base_path, "base config")
    if not isinstance(base, dict):
        raise SuiteError(f"base config {variant.base_path} must be a mapping")
    where = f"variant {variant.name}"
    sets = [*suite.set.items(), ("model.init_args.task", task.task)]
    if task.data_dir is not None:
        sets.append(("data.init_args.data_dir", task.data_dir))
    sets += [*task.set.items(), *variant.set.items(), *suite.cli_set.items()]
    sets = [(key, _resolve_refs(value, base, seed, f"{where}: {key}")) for key, value in sets]
    config = base
    if variant.overlay_path is not None:
        effective = copy.deepcopy(base)  # the base as this run changes it: what ${Class.arg} refers to
        for key, value in sets:
            set_dotted(effective, key, value)
        config = apply_overlay(
            base,
            load_overlay(variant.overlay_path),
            seed,
            f"{where} ({variant.overlay_path.name})",
            refs=effective,
        )
    for key, value in sets:
        _check_class_key(base, config, key, where)
        set_dotted(config, key, value)
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    loggers: list[dict] = [
        {"class_path": CSV_LOGGER, "init_args": {"save_dir": str(run_dir), "name": LOG_DIR, "version": ""}}
    ]
    if suite.wandb is not None:
        wb = {"project": "apt-ablations", "offline": True, **suite.wandb}
        wb.update(
            {
                "group": suite.wandb.get("group", suite.name),
                "name": f"{variant.name}-{task.key}-s{seed}",
                "job_type": variant.name,
                "save_dir": str(run_dir),
                "tags": [variant.name, task.key, f"seed{seed}"],
            }
        )
        loggers.append({"class_path": WANDB_LOGGER, "init_args": wb})
    trainer["logger"] = loggers
    cbs = _callbacks(config)
    if not any(_class_name(cb) == "ModelCheckpoint" for cb in cbs):
        trainer["enable_checkpointing"] = False
    if suite.efficiency is not None and not any(_class_name(cb) == "EfficiencyMonitor" for cb in cbs):
        monitor = _efficiency_entry(suite.efficiency, primary_monitor(task.task))
        if monitor is not None:
            cbs.append(monitor)
    return config


def _check_class_key(base: dict, config: dict, key: str, where: str) -> None:
    """A key addressing a callback by class name must name one of the base's or the run's callbacks (a typo
    check); one the variant removed is skipped quietly (suite-wide settings meet every variant)."""
    known = {_class_name(cb) for cb in _callbacks(copy.deepcopy(base)) + _callbacks(config)}
    for name in _class_keys(key):
        if name not in known:
            raise SuiteError(
                f"{where}: {key!r} addresses callback {name}, which neither the base config nor "
                f"this variant has (callbacks: {sorted(known)})"
            )


def _efficiency_entry(options: dict, monitor: str) -> dict | None:
    """The EfficiencyMonitor callback entry, or None when that class is not importable (a seam for tests)."""
    class_path = options.get("class_path", EFFICIENCY_CLASS)
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    init = dict(options.get("init_args") or {})
    if "monitor" in inspect.signature(cls).parameters:
        init.setdefault("monitor", monitor)
    return {"class_path": class_path, "init_args": init}


def set_tta_reference(config: dict, value: float | None) -> bool:
    """Give the EfficiencyMonitor of `config` the FT metric to time against; False if none was set."""
    if value is None:
        return False
    for cb in _callbacks(config):
        if _class_name(cb) == "EfficiencyMonitor":
            module, _, name = cb["class_path"].rpartition(".")
            try:
                params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            except (ImportError, AttributeError):
                return False
            init = cb.setdefault("init_args", {}) or {}
            cb["init_args"] = init
            arg = next((a for a in ("reference", "tta_reference") if a in params), None)
            if arg is None or init.get(arg) is not None or init.get("reference_file") is not None:
                return False
            init[arg] = value
            return True
    return False


def run_dir_for(suite: Suite, variant: str, task: str, seed: int) -> Path:
    return suite.output_dir / variant / task / f"seed{seed}"


def plan(suite: Suite) -> list[RunSpec]:
    """Every run of the suite with its merged config, reference runs first, then seed by seed."""
    runs = []
    seeds = sorted({s for v in suite.variants for s in v.seeds})
    order = sorted(suite.variants, key=lambda v: v.name != suite.reference)
    for seed in seeds:
        for variant in order:
            if seed not in variant.seeds:
                continue
            for key in variant.tasks:
                task = suite.tasks[key]
                run_dir = run_dir_for(suite, variant.name, key, seed)
                config = compose_config(suite, variant, task, seed, run_dir)
                runs.append(RunSpec(variant, task, seed, run_dir, config))
    runs.sort(key=lambda r: r.variant.name != suite.reference)  # stable: references first
    return runs


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rerun_command(suite: Suite, run: RunSpec) -> str:
    return (
        f"apt-ablate run {suite.path} --variants {run.variant.name} --tasks {run.task.key} "
        f"--seeds {run.seed} --force"
    )


def fit_argv(run: RunSpec, extra: list[str]) -> list[str]:
    return ["fit", "--config", str(run.run_dir / CONFIG), "--seed_everything", str(run.seed), *extra]


# ---------------------------------------------------------------------- status
def run_status(run_dir: Path) -> str:
    """done | failed | running | pending (running = a live worker wrote run.json and nothing else yet)."""
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    meta = _read_json(run_dir / RUN_META)
    if meta and meta.get("pid") and _is_worker(int(meta["pid"]), run_dir):
        return "running"
    return "pending"


def _is_worker(pid: int, run_dir: Path) -> bool:
    """Whether `pid` is alive and (where /proc tells) a training process of this run folder."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            return str(run_dir) in cmdline.read_text().replace("\0", " ")
        except OSError:
            return False
    return True


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a worker's process group (the worker and its DataLoader processes)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _reference_metric(suite: Suite, run: RunSpec) -> float | None:
    """The FT run's best dev metric for the same task and seed, if that run has finished."""
    if suite.reference is None or run.variant.name == suite.reference:
        return None
    done = _read_json(run_dir_for(suite, suite.reference, run.task.key, run.seed) / DONE)
    value = done.get("best_metric") if done else None
    return float(value) if value is not None else None


# ---------------------------------------------------------------------- training phase
def _prepare(suite: Suite, run: RunSpec) -> list[str]:
    """Clear a previous attempt, write config.yaml and run.json; return the worker's command."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (DONE, FAILED, INFERENCE, BENCH_FAILED, FINAL_CKPT, TRAIN_LOG):
        (run.run_dir / stale).unlink(missing_ok=True)
    logs = run.run_dir / LOG_DIR
    if logs.is_dir():
        import shutil

        shutil.rmtree(logs)
    config = copy.deepcopy(run.config)
    reference = _reference_metric(suite, run)
    has_ref = set_tta_reference(config, reference)
    write_text_atomic(run.run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
    argv = fit_argv(run, suite.args)
    meta = {
        "suite": suite.name,
        "suite_file": str(suite.path),
        "variant": run.variant.name,
        "task": run.task.task,
        "task_key": run.task.key,
        "task_label": run.task.label,
        "seed": run.seed,
        "description": run.variant.description,
        "overlay": str(run.variant.overlay_path or ""),
        "base": str(run.variant.base_path),
        "monitor": primary_monitor(run.task.task),
        "backbone": get_dotted(config, "model.init_args.backbone", "minilm-l6"),
        "reference_variant": suite.reference,
        "tta_reference": reference if has_ref else None,
        "config_digest": config_digest(run.config),
        "fit_command": "apt-fit " + shlex.join(argv),
        "rerun": rerun_command(suite, run),
        "started": time.time(),
    }
    write_json_atomic(run.run_dir / RUN_META, meta)
    return worker_command(run.run_dir, suite.args)


def worker_command(run_dir: Path, extra: list[str]) -> list[str]:
    """The command of one training process (a seam: tests replace it with a fake worker)."""
    return [sys.executable, "-m", "apt_lightning.ablate", "_train", str(run_dir), *extra]


def _finish_failed(run: RunSpec, rc: int | None, reason: str) -> None:
    write_json_atomic(
        run.run_dir / FAILED,
        {
            "returncode": rc,
            "reason": reason,
            "finished": time.time(),
            "log_tail": _tail(run.run_dir / TRAIN_LOG),
        },
    )


def train_runs(
    suite: Suite, runs: list[RunSpec], force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Train every run that is not done (all with `force`), `suite.parallel` processes at a time.

    Returns {"done": [...], "failed": [...], "skipped": [...]} of run ids. One failing run never stops the
    others: its failed.json holds the exit code and the log tail.
    """
    result: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    todo = []
    for run in runs:
        status = run_status(run.run_dir)
        if status == "done" and not force:
            done = _read_json(run.run_dir / DONE) or {}
            if done.get("config_digest") not in (None, config_digest(run.config)):
                log(f"[skip] {run.run_id}: finished with a different config (use --force to rerun it)")
            result["skipped"].append(run.run_id)
        elif status == "running":
            log(f"[skip] {run.run_id}: another process is training it")
            result["skipped"].append(run.run_id)
        else:
            todo.append(run)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if suite.parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // suite.parallel))
    active: dict[subprocess.Popen, tuple[RunSpec, float, Any, str | None]] = {}
    total, started = len(todo), 0
    try:
        while todo or active:
            while todo and len(active) < suite.parallel:
                # a run whose FT reference is still training waits if something else can start instead
                pick = next((r for r in todo if not _waits_for_reference(suite, r, active)), todo[0])
                todo.remove(pick)
                cmd = _prepare(suite, pick)
                handle = (pick.run_dir / TRAIN_LOG).open("w")
                run_env = env
                if suite.gpus:
                    gpu = _least_loaded(suite.gpus, [g for _, _, _, g in active.values()])
                    run_env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
                proc = subprocess.Popen(
                    cmd, stdout=handle, stderr=subprocess.STDOUT, env=run_env, start_new_session=True
                )
                meta = _read_json(pick.run_dir / RUN_META) or {}
                write_json_atomic(pick.run_dir / RUN_META, {**meta, "pid": proc.pid})
                active[proc] = (pick, time.time(), handle, run_env.get("CUDA_VISIBLE_DEVICES"))
                started += 1
                on_gpu = f" on GPU {run_env['CUDA_VISIBLE_DEVICES']}" if suite.gpus else ""
                log(f"[start {started}/{total}] {pick.run_id} (pid {proc.pid}){on_gpu} -> {pick.run_dir}")
            time.sleep(0.2)
            for proc in list(active):
                run, t0, handle, _ = active[proc]
                rc = proc.poll()
                if rc is None and suite.timeout_s and time.time() - t0 > suite.timeout_s:
                    _stop(proc, signal.SIGKILL)
                    rc = proc.wait()
                    _finish_failed(run, rc, f"timeout after {suite.timeout_s} s")
                if rc is None:
                    continue
                handle.close()
                del active[proc]
                if rc == 0 and (run.run_dir / DONE).is_file():
                    result["done"].append(run.run_id)
                    log(f"[done] {run.run_id} in {time.time() - t0:.0f} s")
                else:
                    if not (run.run_dir / FAILED).is_file():
                        _finish_failed(run, rc, "training process failed")
                    result["failed"].append(run.run_id)
                    log(
                        f"[FAILED] {run.run_id} (exit {rc}); log: {run.run_dir / TRAIN_LOG}\n"
                        + _indent(_tail(run.run_dir / TRAIN_LOG, 15))
                    )
    except BaseException:
        for proc, (run, _, handle, _) in active.items():
            _stop(proc)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _stop(proc, signal.SIGKILL)
                proc.wait()
            handle.close()
            _finish_failed(run, proc.returncode, "interrupted")
        raise
    return result


def _waits_for_reference(suite: Suite, run: RunSpec, active: dict) -> bool:
    if suite.reference is None or run.variant.name == suite.reference:
        return False
    ref_dir = run_dir_for(suite, suite.reference, run.task.key, run.seed)
    return any(r.run_dir == ref_dir for r, _, _, _ in active.values())


def _least_loaded(gpus: list[str], busy: list[str | None]) -> str:
    """The GPU with the fewest running processes (the first of equals)."""
    return min(gpus, key=lambda g: busy.count(g))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _train_worker(run_dir: Path, extra: list[str]) -> int:
    """The body of one training process: apt-fit on config.yaml, final checkpoint, done.json."""
    meta = _read_json(run_dir / RUN_META) or {}
    t0 = time.time()
    from apt_lightning.cli import run_cli as fit

    sys.argv = sys.argv[:1]  # LightningCLI warns when it gets both args and a command line
    seed = str(meta.get("seed", 0))
    cli = fit(["fit", "--config", str(run_dir / CONFIG), "--seed_everything", seed, *extra])
    trainer = cli.trainer
    if trainer.interrupted or trainer.state.status.value != "finished":
        print(f"apt-ablate: training did not finish (status {trainer.state.status.value})", file=sys.stderr)
        return 1
    trainer.save_checkpoint(run_dir / FINAL_CKPT, weights_only=True)  # the final model, not a resume point
    log_dir = Path(trainer.log_dir or run_dir / LOG_DIR)
    best, final = _best_from_logs(log_dir, meta.get("monitor", "val/accuracy"))
    import torch

    write_json_atomic(
        run_dir / DONE,
        {
            "finished": time.time(),
            "wall_s": time.time() - t0,
            "global_step": trainer.global_step,
            "best_metric": best,
            "final_metric": final,
            "monitor": meta.get("monitor"),
            "log_dir": str(log_dir),
            "checkpoint": str(run_dir / FINAL_CKPT),
            "config_digest": meta.get("config_digest"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": _versions(),
        },
    )
    return 0


def _best_from_logs(log_dir: Path, monitor: str) -> tuple[float | None, float | None]:
    eff = _read_json(log_dir / "efficiency.json")
    values = []
    if (log_dir / "metrics.csv").is_file():
        import csv

        with (log_dir / "metrics.csv").open() as f:
            values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor) not in (None, "")]
    best = eff.get("best_metric") if eff else None
    if best is None and values:
        best = max(values)
    return best, values[-1] if values else None


def _versions() -> dict:
    import lightning
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------------- inference phase
def load_benchmark() -> Callable[..., dict] | None:
    """`apt_lightning.tools.bench.benchmark`, or None when it is not available (tests replace this seam)."""
    try:
        from apt_lightning.tools.bench import benchmark
    except ImportError:
        return None
    return benchmark


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def bench_settings(options: dict) -> tuple[str, str]:
    """(dtype, device) for `apt_lightning.tools.bench.benchmark`: `auto` is bf16 on CUDA, fp32 on the CPU."""
    import torch

    device = str(options["device"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(options["dtype"])
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return _DTYPE_ALIASES.get(dtype, dtype), device


def _measure(bench: Callable[..., dict], model: Any, options: dict) -> dict:
    """`rounds` back-to-back benchmarks; the round with the median throughput, plus every round's number
    (small models at batch 128 are launch-bound on a GPU: single rounds jitter by tens of percent)."""
    dtype, device = bench_settings(options)
    params = sum(p.numel() for p in model.parameters())
    results = []
    for _ in range(max(1, int(options.get("rounds", 1)))):
        results.append(
            dict(
                bench(
                    model,
                    batch_size=options["batch_size"],
                    seq_len=options["seq_len"],
                    dtype=dtype,
                    device=device,
                    warmup=options["warmup"],
                    repeats=options["repeats"],
                    cuda_graphs=options["cuda_graphs"],
                )
            )
        )
    results.sort(key=lambda r: r.get("samples_per_s") or 0.0)
    result = results[len(results) // 2]
    result.pop("latency_ms_all", None)
    result["rounds_samples_per_s"] = [r.get("samples_per_s") for r in results]
    result.setdefault("params", params)
    return result


def _dense_result(suite: Suite, bench: Callable[..., dict], hparams: dict, options: dict) -> dict:
    """The unpruned model of the same backbone and task, measured once per suite (cached on disk)."""
    key = {"backbone": hparams.get("backbone"), "task": hparams.get("task"), "settings": options}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = suite.output_dir / "_dense" / f"{hparams.get('task')}_{digest}.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    from apt_lightning.export import compact_for_inference
    from apt_lightning.module import APTModule

    dense_args = {k: v for k, v in hparams.items() if k in inspect.signature(APTModule).parameters}
    dense_args.update(adapters=None, pretrained=False)  # timing does not depend on the weights
    model = compact_for_inference(APTModule(**dense_args).student).eval()
    result = {**key, "result": _measure(bench, model, options)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def load_final_module(ckpt: Path) -> Any:
    """`export.module_from_checkpoint` on a checkpoint written through LightningCLI.

    Such checkpoints carry `_class_path` / `_instantiator` in their hyperparameters and `adapters` as a
    plain mapping. If `module_from_checkpoint` trips over either, a cleaned copy (next to the checkpoint,
    deleted afterwards) is loaded instead.
    """
    import tempfile

    import torch

    from apt_lightning.adapters import AdapterConfig
    from apt_lightning.export import module_from_checkpoint

    try:
        return module_from_checkpoint(ckpt)
    except (TypeError, AttributeError) as err:
        first = err
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = state.get("hyper_parameters", {})
    clean = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if isinstance(clean.get("adapters"), dict):
        clean["adapters"] = AdapterConfig(**clean["adapters"])
    if clean.keys() == hparams.keys() and clean.get("adapters") is hparams.get("adapters"):
        raise first
    state["hyper_parameters"] = clean
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as tmp:
        torch.save(state, Path(tmp) / "clean.ckpt")
        del state
        return module_from_checkpoint(Path(tmp) / "clean.ckpt")


def bench_runs(
    suite: Suite, runs: list[RunSpec], force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Measure the exported model of every finished run against the dense model, one at a time."""
    result: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    if suite.benchmark is None:
        return result
    bench = load_benchmark()
    if bench is None:
        log("[bench] apt_lightning.tools.bench is not available: inference efficiency not measured")
        return result
    import torch
    import transformers

    from apt_lightning.export import compact_for_inference

    transformers.logging.set_verbosity_error()  # rebuilding each model reports the fresh head; noise here
    if force:
        for cached in (suite.output_dir / "_dense").glob("*.json"):
            cached.unlink()  # measure the dense models again too, under the same conditions
    for run in runs:
        ckpt = run.run_dir / FINAL_CKPT
        if not (run.run_dir / DONE).is_file() or ((run.run_dir / INFERENCE).is_file() and not force):
            result["skipped"].append(run.run_id)
            continue
        if not ckpt.is_file():
            log(f"[bench] {run.run_id}: no {FINAL_CKPT} (deleted?); skipped")
            result["skipped"].append(run.run_id)
            continue
        try:
            module = load_final_module(ckpt)
            hparams = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
            model = compact_for_inference(module.student).eval()
            measured = _measure(bench, model, suite.benchmark)
            del module, model
            dense = _dense_result(suite, bench, hparams, suite.benchmark)
            write_json_atomic(
                run.run_dir / INFERENCE,
                {
                    "model": measured,
                    "dense": dense["result"],
                    "settings": suite.benchmark,
                    "dtype": bench_settings(suite.benchmark)[0],
                    "device": bench_settings(suite.benchmark)[1],
                    "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                },
            )
            (run.run_dir / BENCH_FAILED).unlink(missing_ok=True)
            result["done"].append(run.run_id)
            log(
                f"[bench] {run.run_id}: {measured.get('samples_per_s', float('nan')):.1f} samples/s "
                f"(dense {dense['result'].get('samples_per_s', float('nan')):.1f})"
            )
            if not suite.keep_checkpoints:
                ckpt.unlink()
        except Exception as err:  # noqa: BLE001 - one broken checkpoint must not stop the others
            result["failed"].append(run.run_id)
            write_json_atomic(run.run_dir / BENCH_FAILED, {"error": f"{type(err).__name__}: {err}"})
            log(f"[bench] {run.run_id} FAILED: {type(err).__name__}: {err}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------- suite metadata
def write_suite_meta(suite: Suite, runs: list[RunSpec], argv: list[str] | None) -> None:
    """`suite.json`: what the report needs to describe the suite without the suite file. `argv` None
    keeps the recorded command (a relabel changes names, not how the runs were made)."""
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": suite.name,
        "description": suite.description,
        "suite_file": str(suite.path),
        "suite_text": suite.path.read_text(),
        "reference": suite.reference,
        "data_root": suite.data_root,
        "command": "apt-ablate " + shlex.join(argv or []),
        "benchmark": suite.benchmark,
        "variants": [
            {
                "name": v.name,
                "description": v.description,
                "overlay": str(v.overlay_path or ""),
                "overlay_text": v.overlay_path.read_text() if v.overlay_path else "",
                "base": str(v.base_path),
                "seeds": v.seeds,
                "tasks": v.tasks,
            }
            for v in suite.variants
        ],
        "tasks": {
            k: {"task": t.task, "label": t.label, "data_dir": t.data_dir, "set": t.set}
            for k, t in suite.tasks.items()
        },
        "set": suite.set,
        "cli_set": suite.cli_set,
        "args": suite.args,
        "runs": [r.run_id for r in runs],
    }
    old = _read_json(suite.output_dir / SUITE_META) or {}
    if argv is None:
        meta["command"] = old.get("command", "")
    names = {s.name for s in suite.variants}
    # variants of earlier invocations (`--variants` subsets) stay described while their runs exist
    kept = [v for v in old.get("variants", []) if v["name"] not in names]
    meta["variants"] += [v for v in kept if (suite.output_dir / v["name"]).is_dir()]
    meta["tasks"] = {**old.get("tasks", {}), **meta["tasks"]}
    write_json_atomic(suite.output_dir / SUITE_META, meta)


# ---------------------------------------------------------------------- command line
def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite YAML (see configs/suites/)")
    p.add_argument("--data-root", help="replaces the suite's data_root (e.g. .device/data/glue)")
    p.add_argument("--output", help="replaces the suite's output_dir")
    p.add_argument("--parallel", type=int, help="concurrent training processes")
    p.add_argument("--gpus", help="spread the training processes over these GPUs: auto or indices, e.g. 0,1")
    p.add_argument("--variants", nargs="+", help="only these variants")
    p.add_argument("--tasks", nargs="+", help="only these tasks (suite task keys)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds (of each variant's seeds)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key in every run (VALUE is YAML; repeatable)",
    )
    p.add_argument("--force", action="store_true", help="rerun / re-measure finished runs")


def _suite_from_args(args: argparse.Namespace) -> Suite:
    return load_suite(
        args.suite,
        data_root=args.data_root,
        output_dir=args.output,
        parallel=args.parallel,
        gpus=args.gpus,
        variants=args.variants,
        tasks=args.tasks,
        seeds=args.seeds,
        cli_set=_parse_sets(args.set),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `apt-ablate` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_train":  # internal: one training process
        return _train_worker(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(prog="apt-ablate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train, benchmark and report a suite")
    _add_suite_args(p_run)
    p_run.add_argument("--strict", action="store_true", help="exit 1 if any run failed")
    p_run.add_argument("--no-bench", action="store_true", help="skip the inference benchmarks")
    p_run.add_argument("--no-report", action="store_true", help="skip writing the report")
    p_run.add_argument("--dry-run", action="store_true", help="write the configs and list the runs only")
    p_bench = sub.add_parser("bench", help="inference benchmarks of finished runs")
    _add_suite_args(p_bench)
    p_plan = sub.add_parser("plan", help="list the runs and their status")
    _add_suite_args(p_plan)
    p_report = sub.add_parser("report", help="results.csv, RESULTS.md and plots from a suite's output folder")
    p_report.add_argument("suite_dir")
    p_relabel = sub.add_parser(
        "relabel", help="move finished runs to the name of a variant whose config they already have"
    )
    p_relabel.add_argument("suite", help="suite YAML (as it is now)")
    p_relabel.add_argument("renames", nargs="+", metavar="OLD:NEW", help="variant renames, applied together")
    p_relabel.add_argument("--data-root", help="the data_root the runs trained with")
    p_relabel.add_argument("--output", help="replaces the suite's output_dir")
    p_relabel.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="the --set overrides the runs were made with"
    )
    args = parser.parse_args(argv)

    if args.command == "relabel":
        from apt_lightning.relabel import relabel

        pairs = [r.split(":", 1) for r in args.renames]
        if any(len(p) != 2 or not all(p) for p in pairs):
            parser.exit(2, f"apt-ablate: error: renames are OLD:NEW pairs, got {args.renames}\n")
        renames = dict(pairs)
        if len(renames) != len(pairs):
            parser.exit(2, f"apt-ablate: error: a variant is renamed twice: {args.renames}\n")
        try:
            suite = load_suite(
                args.suite, data_root=args.data_root, output_dir=args.output, cli_set=_parse_sets(args.set)
            )
            moved = relabel(suite, renames)
        except SuiteError as err:
            parser.exit(2, f"apt-ablate: error: {err}\n")
        write_suite_meta(suite, plan(suite), None)  # keeps the command the runs were made with
        print(f"relabelled {len(moved)} run(s); the report: apt-ablate report {suite.output_dir}")
        return 0

    if args.command == "report":
        from apt_lightning.report import write_report

        if not Path(args.suite_dir).is_dir():
            parser.exit(2, f"apt-ablate: error: suite folder {args.suite_dir} not found\n")
        out = write_report(args.suite_dir)
        print(f"report: {out}")
        return 0
    try:
        suite = _suite_from_args(args)
        runs = plan(suite)
    except SuiteError as err:
        parser.exit(2, f"apt-ablate: error: {err}\n")
    if args.command == "plan" or getattr(args, "dry_run", False):
        for run in runs:
            print(f"{run_status(run.run_dir):8s} {run.run_id:40s} {run.run_dir}")
            if getattr(args, "dry_run", False) and run_status(run.run_dir) not in ("done", "running"):
                # a finished or running run's config.yaml is the record of what it trained with
                run.run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(run.run_dir / CONFIG, yaml.safe_dump(run.config, sort_keys=False))
        print(f"{len(runs)} runs; {sum(run_status(r.run_dir) == 'done' for r in runs)} done")
        return 0
    # `timeout` / a job scheduler stops us with SIGTERM: end the training processes too (the except
    # clause in train_runs), since they run in their own process groups
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    write_suite_meta(suite, runs, ["run" if args.command == "run" else args.command, *argv[1:]])
    failed: list[str] = []
    if args.command == "run":
        t0 = time.time()
        trained = train_runs(suite, runs, force=args.force)
        failed += trained["failed"]
        print(
            f"training: {len(trained['done'])} done, {len(trained['skipped'])} skipped, "
            f"{len(trained['failed'])} failed ({time.time() - t0:.0f} s)"
        )
    if args.command == "bench" or not args.no_bench:
        benched = bench_runs(suite, runs, force=args.force)
        failed += benched["failed"]
    if args.command == "run" and not args.no_report:
        from apt_lightning.report import write_report

        print(f"report: {write_report(suite.output_dir)}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        if getattr(args, "strict", False) or suite.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
