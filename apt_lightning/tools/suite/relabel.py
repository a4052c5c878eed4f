"""`apt-ablate relabel`: give finished runs the name of a variant whose config they already have.

After a recipe change (the base config now sets what a variant used to set, or a new variant now names
what the base used to be), finished runs belong under other variant names; retraining them would repeat
the same configs. Relabelling moves each run folder and rewrites ``config.yaml``, ``run.json`` (variant,
description, digest, commands, ``relabelled_from``, ``trained_as``) and ``done.json``.

Every run is checked before anything moves: its stored config must equal the new variant's composed
config up to the run folder's own path, the TTA reference it was given at launch, and keys that one side
lacks where the other holds the class's default (an argument added since, at the value the run had). The
new files are prepared before the moves too, and a failing move puts every folder back.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.files import write_json_atomic, write_text_atomic
from apt_lightning.tools.suite.compose import config_digest, fit_argv, plan, rerun_command
from apt_lightning.tools.suite.layout import CONFIG, DONE, RUN_META, run_status, seed_folders, seed_of
from apt_lightning.tools.suite.overlay import callback_list, canonical_config, class_default, class_name
from apt_lightning.tools.suite.spec import RunSpec, Suite, SuiteError

_ABSENT = object()
_REFERENCE_ARGS = ("reference", "tta_reference")  # set at launch from the FT run (compose.set_tta_reference)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {
            k: v
            for key, sub in node.items()
            for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(node, list):
        return {k: v for i, sub in enumerate(node) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: node}


def _is_class_default(flat: dict[str, Any], key: str, value: Any) -> bool:
    """Whether `key` (``...init_args.<arg>``) holds the default of the class configured beside it."""
    owner, sep, arg = key.rpartition(".init_args.")
    class_path = flat.get(f"{owner}.class_path")
    if not sep or "." in arg or not isinstance(class_path, str):
        return False
    try:
        return class_default(class_path, arg) == value
    except SuiteError:
        return False


def _moved(value: str, old_dir: Path, new_dir: Path) -> str:
    """`value` with a leading `old_dir` (the folder itself or a path inside it) replaced by `new_dir`."""
    old = str(old_dir)
    if value == old or value.startswith(old + "/"):
        return str(new_dir) + value[len(old) :]
    return value


def differences(stored: dict, wanted: dict, old_dir: Path, new_dir: Path) -> list[str]:
    """Keys where a run's stored config and the new variant's config differ beyond what relabelling allows."""
    a, b = _flat(stored), _flat(wanted)
    found = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va == vb:
            continue
        if isinstance(va, str) and isinstance(vb, str) and _moved(va, old_dir, new_dir) == vb:
            continue
        if (va is _ABSENT and _is_class_default(b, key, vb)) or (
            vb is _ABSENT and _is_class_default(a, key, va)
        ):
            continue
        shown = ["<absent>" if v is _ABSENT else repr(v) for v in (va, vb)]
        found.append(f"{key}: the run has {shown[0]}, the new variant {shown[1]}")
    return found


def _wanted(run: RunSpec, stored: dict) -> dict:
    """The new variant's config with the TTA reference the run was launched with (it depends on timing)."""
    wanted = copy.deepcopy(run.config)
    olds = [cb for cb in callback_list(copy.deepcopy(stored)) if class_name(cb) == "EfficiencyMonitor"]
    news = [cb for cb in callback_list(wanted) if class_name(cb) == "EfficiencyMonitor"]
    for new, old in zip(news, olds, strict=False):
        given = {k: v for k, v in (old.get("init_args") or {}).items() if k in _REFERENCE_ARGS}
        new["init_args"] = {**(new.get("init_args") or {}), **given}
    return wanted


def _comparable(stored: dict, wanted: dict, where: str) -> dict:
    """A stored run config in today's form: APT callbacks listed in ``trainer.callbacks`` (the syntax before
    the callback groups) moved into their groups; a run from before periodic checkpoints, trained with
    checkpointing off, has the option the new config has (it had no effect there)."""
    stored = canonical_config(stored, where)
    if (
        "checkpoint_every_n_steps" not in stored
        and (stored.get("trainer") or {}).get("enable_checkpointing") is False
    ):
        if "checkpoint_every_n_steps" in wanted:
            stored["checkpoint_every_n_steps"] = wanted["checkpoint_every_n_steps"]
    return stored


def _read(path: Path, problems: list[str]) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        problems.append(f"{path}: unreadable ({err})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a mapping")
        return None
    return data


def relabel(suite: Suite, renames: dict[str, str], log=print) -> list[tuple[Path, Path]]:
    """Move the finished runs of each old variant to the new variant's folders (module docstring). Raises
    `SuiteError`, with nothing moved, if a run's config does not match or its new folder is taken."""
    targets = list(renames.values())
    if len(set(targets)) != len(targets):
        raise SuiteError(f"relabel: two variants renamed to the same name: {renames}")
    planned = {(r.variant.name, r.task.key, r.seed): r for r in plan(suite)}
    finished: dict[str, list[Path]] = {}
    for old, new in renames.items():
        if not any(v.name == new for v in suite.variants):
            raise SuiteError(f"relabel {old}:{new}: the suite has no variant {new!r}")
        finished[old] = sorted(p for p in seed_folders(suite.output_dir / old) if run_status(p) == "done")
        if not finished[old]:
            raise SuiteError(f"relabel {old}:{new}: no finished runs under {suite.output_dir / old}")
    leaving = {d for dirs in finished.values() for d in dirs}
    plans, problems = [], []
    for old, new in renames.items():
        for old_dir in finished[old]:
            run = planned.get((new, old_dir.parent.name, int(seed_of(old_dir))))
            if run is None:
                problems.append(f"{old_dir}: variant {new!r} has no run for this task and seed")
                continue
            if run.run_dir.exists() and run.run_dir not in leaving:  # a folder being relabelled is free
                problems.append(f"{old_dir}: {run.run_dir} exists (relabel or remove that run first)")
            files = [_read(old_dir / name, problems) for name in (CONFIG, RUN_META, DONE)]
            if None in files:
                continue
            stored, meta, done = files
            wanted = _wanted(run, stored)
            stored = _comparable(stored, wanted, str(old_dir))
            problems += [f"{old_dir}: {d}" for d in differences(stored, wanted, old_dir, run.run_dir)]
            plans.append((old_dir, run, _new_files(suite, run, wanted, meta, done, old_dir)))
    if problems:
        raise SuiteError("cannot relabel, nothing moved:\n  " + "\n  ".join(problems))
    _move_all([(old_dir, run.run_dir) for old_dir, run, _ in plans], suite.output_dir)
    for old_dir, run, (config_text, meta, done) in plans:
        write_text_atomic(run.run_dir / CONFIG, config_text)
        write_json_atomic(run.run_dir / RUN_META, meta)
        write_json_atomic(run.run_dir / DONE, done)
        log(f"{old_dir} -> {run.run_dir}")
    for old in renames:
        for folder in sorted((suite.output_dir / old).glob("**/"), reverse=True):  # emptied task folders
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return [(old_dir, run.run_dir) for old_dir, run, _ in plans]


def _move_all(moves: list[tuple[Path, Path]], root: Path) -> None:
    """Move folders through a fresh stage (a destination may be another move's source); on any error put
    every folder back where it was. The stage is removed only when empty: it never deletes a run."""
    stage = Path(tempfile.mkdtemp(prefix=".relabel-", dir=root))
    staged: list[int] = []
    placed: list[int] = []
    try:
        for i, (src, _) in enumerate(moves):
            shutil.move(src, stage / str(i))
            staged.append(i)
        for i, (_, dst) in enumerate(moves):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(stage / str(i), dst)
            placed.append(i)
    except BaseException:
        for i in reversed(placed):  # back into the stage first: a destination may be another's origin
            shutil.move(moves[i][1], stage / str(i))
        for i in reversed(staged):
            moves[i][0].parent.mkdir(parents=True, exist_ok=True)
            shutil.move(stage / str(i), moves[i][0])
        raise
    finally:
        if not any(stage.iterdir()):
            stage.rmdir()


def _new_files(
    suite: Suite, run: RunSpec, wanted: dict, meta: dict, done: dict, old_dir: Path
) -> tuple[str, dict, dict]:
    """config.yaml text, run.json and done.json of the relabelled run."""
    digest = config_digest(run.config)
    meta = {
        **meta,
        "variant": run.variant.name,
        "description": run.variant.description,
        "overlay": str(run.variant.overlay_path or ""),
        "config_digest": digest,
        "fit_command": "apt-fit " + shlex.join(fit_argv(run, suite.args)),
        "rerun": rerun_command(suite, run),
        "relabelled_from": meta.get("variant"),
        "trained_as": meta.get("trained_as") or meta.get("variant"),
    }
    done = {**done, "config_digest": digest}
    for key in ("log_dir", "checkpoint"):
        if isinstance(done.get(key), str):
            done[key] = _moved(done[key], old_dir, run.run_dir)
    return yaml.safe_dump(wanted, sort_keys=False), meta, done
