"""The run's full configuration as one flat dict of dotted keys, for a W&B run config (`RunDashboard`).

Two sources, merged (the live objects win where both name a key):

- the CLI's resolved config: LightningCLI's `SaveConfigCallback` (its parser and config) when it is among the
  trainer's callbacks, else the `config.yaml` it wrote into the log folder. `{class_path, init_args}` nodes
  flatten to `<key>.class` plus their arguments under `<key>.` (`model.optimizer.lr`, `data.batch_size`).
- the live run, so that a run started without the CLI has the same keys: the module's hyperparameters
  (`model.*`), the datamodule's (`data.*`), a few trainer settings (`trainer.*`), each non-Lightning
  callback's init arguments under a short section name (`pruning.target_sparsity`, `pruning.scorer`,
  `tuning.strategy`, `distillation.tau`, `efficiency.monitor`), the optimizer's class and defaults
  (`optimizer.name`, `optimizer.lr`, `optimizer.weight_decay`), the LR scheduler (`lr_scheduler.*`) and
  the seed (`seed`, from `PL_GLOBAL_SEED`, which `seed_everything` sets).

A callback's init arguments are read back from its attributes: for each parameter of its `__init__`, the
attribute of that name, else `_<name>`; parameters stored under another name are left out, and so is an
attribute that holds a bound method (Lightning overwrites every callback's `log` and `log_dict` with the
module's at fit start, so an argument named `log` cannot be read back). An object
argument (a scorer, an allocation strategy) is recorded by its registered `name` or class name, and its own
arguments under `<key>_args.`.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer

from apt_lightning import distributed
from apt_lightning.callbacks.distillation import SelfDistillation
from apt_lightning.callbacks.efficiency import EfficiencyMonitor
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.tuning import AdaptiveTuning

_PRIMITIVE = (bool, int, float, str, type(None))
_TRAINER_KEYS = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "log_every_n_steps",
    "val_check_interval",
    "num_devices",
    "num_nodes",
    "estimated_stepping_batches",
)


def section_name(cb: object) -> str:
    """Short config section of a callback: pruning, tuning, distillation, efficiency, dashboard, or the
    class name in snake case."""

    for cls, name in (
        (AdaptivePruning, "pruning"),
        (AdaptiveTuning, "tuning"),
        (SelfDistillation, "distillation"),
        (EfficiencyMonitor, "efficiency"),
    ):
        if isinstance(cb, cls):
            return name
    if type(cb).__name__ == "RunDashboard":
        return "dashboard"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(cb).__name__).lower()


def init_args(obj: object) -> dict[str, Any]:
    """`obj`'s constructor arguments as far as its attributes hold them (see the module docstring)."""
    try:
        params = inspect.signature(type(obj).__init__).parameters
    except (TypeError, ValueError):
        return {}
    args = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        for attr in (name, "_" + name):
            if attr in getattr(obj, "__dict__", {}) or isinstance(getattr(type(obj), attr, None), property):
                try:
                    value = getattr(obj, attr)
                except Exception:  # a property that cannot be read yet
                    continue
                if not inspect.ismethod(value):  # Lightning sets `callback.log` to the module's `log`
                    args[name] = value
                break
    return args


def _describe(value: Any, key: str, out: dict, depth: int) -> None:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, _PRIMITIVE):
        out[key] = value
    elif isinstance(value, Path):
        out[key] = str(value)
    elif isinstance(value, Mapping):
        if not value:
            out[key] = {}
        for k, v in value.items():
            _describe(v, f"{key}.{k}" if key else str(k), out, depth)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _describe(dataclasses.asdict(value), key, out, depth)
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
        if all(isinstance(v, _PRIMITIVE) for v in items):
            out[key] = items
        else:
            out[key] = [_label(v) for v in items]
    elif inspect.isfunction(value) or inspect.isclass(value):
        out[key] = f"{value.__module__}.{value.__qualname__}"
    else:
        out[key] = _label(value)
        if depth > 0:
            for k, v in init_args(value).items():
                _describe(v, f"{key}_args.{k}", out, depth - 1)


def _label(value: Any) -> Any:
    if isinstance(value, _PRIMITIVE):
        return value
    name = getattr(value, "name", None)
    return name if isinstance(name, str) and name != "custom" else type(value).__name__


def flatten(value: Any, prefix: str = "", depth: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _describe(value, prefix, out, depth)
    return out


# ---------------------------------------------------------------------- the CLI's config
def _flatten_cli(node: Any, key: str, out: dict) -> None:
    if isinstance(node, Mapping) and "class_path" in node:
        out[f"{key}.class"] = node["class_path"]
        _flatten_cli(node.get("init_args") or {}, key, out)
        for k, v in (node.get("dict_kwargs") or {}).items():
            _flatten_cli(v, f"{key}.{k}", out)
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _flatten_cli(v, f"{key}.{k}" if key else str(k), out)
    elif isinstance(node, list) and node and all(isinstance(v, Mapping) and "class_path" in v for v in node):
        for v in node:
            _flatten_cli(v, f"{key}.{str(v['class_path']).rsplit('.', 1)[-1]}", out)
    elif isinstance(node, (list, tuple)):
        out[key] = [v if isinstance(v, _PRIMITIVE) else str(v) for v in node]
    else:
        out[key] = node if isinstance(node, _PRIMITIVE) else str(node)


def cli_config(trainer: Trainer) -> dict[str, Any] | None:
    """The LightningCLI config of this run as a nested dict, or None when the run has none."""
    import yaml
    from lightning.pytorch.cli import SaveConfigCallback

    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    text = None
    if saver is not None:
        try:
            text = saver.parser.dump(saver.config, skip_none=False)
        except Exception:  # fall back to the file it wrote
            text = None
    log_dir = distributed.log_dir(trainer)  # rank 0 only: Trainer.log_dir's broadcast would hang DDP
    if text is None and log_dir is not None:
        name = getattr(saver, "config_filename", "config.yaml")
        path = Path(log_dir) / name
        if path.is_file():
            text = path.read_text()
    if text is None:
        return None
    config = yaml.safe_load(text)
    return config if isinstance(config, dict) else None


def flatten_cli(config: Mapping) -> dict[str, Any]:
    """The CLI config flattened; the callbacks (the groups and `trainer.callbacks`) are left to the live
    section names (`pruning.*`, ...), read from the callbacks themselves."""
    config = {k: v for k, v in config.items() if k not in ("pruning", "tuning", "distillation")}
    trainer = dict(config.get("trainer") or {})
    trainer.pop("callbacks", None)
    config["trainer"] = trainer
    out: dict[str, Any] = {}
    _flatten_cli(config, "", out)
    return out


# ---------------------------------------------------------------------- the live run
def _optimizer_config(trainer: Trainer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not trainer.optimizers:
        return out
    optimizer = trainer.optimizers[0]
    out["optimizer.name"] = type(optimizer).__name__
    out.update(flatten({k: v for k, v in optimizer.defaults.items() if k != "params"}, "optimizer", depth=0))
    if len(trainer.optimizers) > 1:
        out["optimizer.count"] = len(trainer.optimizers)
    if trainer.lr_scheduler_configs:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        out["lr_scheduler.name"] = type(scheduler).__name__
        args = {k: v for k, v in init_args(scheduler).items() if k != "optimizer"}
        out.update(flatten(args, "lr_scheduler", depth=0))
    return out


def assemble(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """The live run's settings as dotted keys (see the module docstring)."""
    out: dict[str, Any] = {}
    out.update(flatten(dict(pl_module.hparams), "model"))
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "hparams", None):
        out.update(flatten(dict(datamodule.hparams), "data"))
    for key in _TRAINER_KEYS:
        try:
            value = getattr(trainer, key)
        except Exception:
            continue
        if key == "gradient_clip_algorithm" and value is not None:
            value = str(getattr(value, "value", value))
        out.update(flatten(value, f"trainer.{key}", depth=0))
    seen: dict[str, int] = {}
    for cb in trainer.callbacks:
        if type(cb).__module__.startswith(("lightning.", "pytorch_lightning.")):
            continue
        name = section_name(cb)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name] - 1}"
        out[f"{name}.class"] = f"{type(cb).__module__}.{type(cb).__qualname__}"
        out.update(flatten(init_args(cb), name))
    out.update(_optimizer_config(trainer))
    seed = os.environ.get("PL_GLOBAL_SEED")
    out["seed"] = int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed
    return out


def run_config(trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, Any], str]:
    """The merged flat config and where it came from ("cli+run" or "run")."""
    config = cli_config(trainer)
    flat = flatten_cli(config) if config else {}
    flat.update(assemble(trainer, pl_module))
    return flat, "cli+run" if config else "run"


__all__ = ["assemble", "cli_config", "flatten", "flatten_cli", "init_args", "run_config", "section_name"]
