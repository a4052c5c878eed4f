"""Composing the runs of a suite: each run's complete apt-fit config, the plan and the commands.

Overrides apply in the order overlay, suite ``set``, task, variant ``set``, ``--set``; then the runner sets
the seed, the loggers (CSV into ``<run>/logs``, W&B if enabled), the EfficiencyMonitor (its TTA reference is
the FT run's best metric of the same task and seed when that run finished first) and turns the default
checkpointing off (it saves ``<run>/final.ckpt`` itself). A run whose data carves its validation split
from the training set (``data.init_args.val_from_train``) gets a `FinalStructureCheckpoint` on the primary
metric instead, which the worker tests on the official dev set after training. Every ``set`` key is an
apt-fit key, dotted (`overlay`): ``pruning.start_step: 2`` sets AdaptivePruning's start step (a variant that
switched pruning off skips it; a group neither the base nor the variant switched on is an error).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
from pathlib import Path

from apt_lightning.tools.suite.layout import CONFIG, LOG_DIR, SELECTION_DIR, run_dir_for
from apt_lightning.tools.suite.overlay import (
    apply_overlay,
    apply_set,
    callback_list,
    canonical_config,
    class_keys,
    class_name,
    get_dotted,
    load_overlay,
    load_yaml,
    resolve_refs,
)
from apt_lightning.tools.suite.spec import RunSpec, Suite, SuiteError, TaskSpec, VariantSpec

EFFICIENCY_CLASS = "apt_lightning.callbacks.efficiency.EfficiencyMonitor"
SELECTION_CLASS = "apt_lightning.callbacks.FinalStructureCheckpoint"
CHECKPOINT_CLASSES = ("ModelCheckpoint", "FinalStructureCheckpoint")
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


def primary_monitor(task: str) -> str:
    from apt_lightning.data.tasks import get_task

    return f"val/{get_task(task).primary_metric}"


def monitor_mode(task: str) -> str:
    """`max` when the task's primary metric is higher-is-better (classification), `min` for a loss (the
    task's `mode`; tasks without one are classification)."""
    from apt_lightning.data.tasks import get_task

    return str(getattr(get_task(task), "mode", "max"))


def compose_config(suite: Suite, variant: VariantSpec, task: TaskSpec, seed: int, run_dir: Path) -> dict:
    """The complete apt-fit config of one run (see the module docstring for the order of overrides)."""
    base = load_yaml(variant.base_path, "base config")
    if not isinstance(base, dict):
        raise SuiteError(f"base config {variant.base_path} must be a mapping")
    where = f"variant {variant.name}"
    base = canonical_config(base, f"base config {variant.base_path}")
    sets = [*suite.set.items(), ("model.init_args.task", task.task)]
    if task.data_dir is not None:
        sets.append(("data.init_args.data_dir", task.data_dir))
    sets += [*task.set.items(), *variant.set.items(), *suite.cli_set.items()]
    sets = [(key, resolve_refs(value, base, seed, f"{where}: {key}")) for key, value in sets]
    config = base
    if variant.overlay_path is not None:
        effective = copy.deepcopy(base)  # the base as this run changes it: what ${key.arg} refers to
        in_base = {class_name(cb) for cb in callback_list(copy.deepcopy(base))}
        for key, value in sets:
            if set(class_keys(key)) <= in_base:  # keys of callbacks the overlay adds wait for the overlay
                apply_set(effective, key, value, base, where)
        config = apply_overlay(
            base,
            load_overlay(variant.overlay_path),
            seed,
            f"{where} ({variant.overlay_path.name})",
            refs=effective,
        )
    config = copy.deepcopy(config)
    for key, value in sets:
        apply_set(config, key, value, base, where)
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
    cbs = callback_list(config)
    if carves_validation(config) and not any(class_name(cb) in CHECKPOINT_CLASSES for cb in cbs):
        monitor = primary_monitor(task.task)
        args = {"monitor": monitor, "mode": monitor_mode(task.task), "dirpath": str(run_dir / SELECTION_DIR)}
        cbs.append({"class_path": SELECTION_CLASS, "init_args": args})
        config["checkpoint_every_n_steps"] = None  # no resume points: the worker writes final.ckpt
    if not any(class_name(cb) in CHECKPOINT_CLASSES for cb in cbs):
        trainer["enable_checkpointing"] = False
    if suite.efficiency is not None and not any(class_name(cb) == "EfficiencyMonitor" for cb in cbs):
        monitor = _efficiency_entry(suite.efficiency, primary_monitor(task.task), monitor_mode(task.task))
        if monitor is not None:
            cbs.append(monitor)
    return config


def carves_validation(config: dict) -> bool:
    """Whether a run's data carves its validation split from the training set (the dev set is its test)."""
    return get_dotted(config, "data.init_args.val_from_train") is not None


def _efficiency_entry(options: dict, monitor: str, mode: str = "max") -> dict | None:
    """The EfficiencyMonitor callback entry (following `monitor`, better when `mode`: max or min), or None
    when that class is not importable (a seam for tests)."""
    class_path = options.get("class_path", EFFICIENCY_CLASS)
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    init = dict(options.get("init_args") or {})
    params = inspect.signature(cls).parameters
    if "monitor" in params:
        init.setdefault("monitor", monitor)
    # only where the class default is wrong: configs of classification suites stay as they were
    if "mode" in params and init.get("monitor") == monitor and params["mode"].default != mode:
        init.setdefault("mode", mode)
    return {"class_path": class_path, "init_args": init}


def set_tta_reference(config: dict, value: float | None) -> bool:
    """Give the EfficiencyMonitor of `config` the FT metric to time against; False if none was set."""
    if value is None:
        return False
    for cb in callback_list(config):
        if class_name(cb) == "EfficiencyMonitor":
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
                run_dir = run_dir_for(suite.output_dir, variant.name, key, seed)
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
