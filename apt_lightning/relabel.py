"""`apt-ablate relabel`: give finished runs the name of a variant whose config they already have.

After a recipe change (the base config now sets what a variant used to set, or a new variant now names
what the base used to be), finished runs belong under other variant names; retraining them would repeat
the same configs. Relabelling moves each run folder and rewrites ``config.yaml``, ``run.json`` (variant,
description, digest, commands, ``relabelled_from``) and ``done.json``. Every run is checked before
anything moves: its stored config must equal the new variant's composed config up to the run folder's
own path, the TTA reference it was given at launch, and keys it lacks where the new config holds the
class's default (an argument added since, at the value the run had).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from apt_lightning import ablate
from apt_lightning.files import write_json_atomic, write_text_atomic

_ABSENT = object()


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
        return ablate._class_default(class_path, arg) == value
    except ablate.SuiteError:
        return False


def differences(stored: dict, wanted: dict, old_dir: Path, new_dir: Path) -> list[str]:
    """Keys where a run's stored config and the new variant's config differ beyond what relabelling allows."""
    a, b = _flat(stored), _flat(wanted)
    found = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va == vb:
            continue
        if isinstance(va, str) and isinstance(vb, str) and va.replace(str(old_dir), str(new_dir)) == vb:
            continue
        if va is _ABSENT and _is_class_default(b, key, vb):
            continue
        shown = ["<absent>" if v is _ABSENT else repr(v) for v in (va, vb)]
        found.append(f"{key}: the run has {shown[0]}, the new variant {shown[1]}")
    return found


def _wanted(run: ablate.RunSpec, stored: dict) -> dict:
    """The new variant's config with the TTA reference the run was launched with (it depends on timing)."""
    wanted = copy.deepcopy(run.config)
    for new, old in zip(ablate._callbacks(wanted), ablate._callbacks(copy.deepcopy(stored)), strict=False):
        if ablate._class_name(new) == ablate._class_name(old) == "EfficiencyMonitor":
            new["init_args"] = copy.deepcopy(old.get("init_args") or {})
    return wanted


def relabel(suite: ablate.Suite, renames: dict[str, str], log=print) -> list[tuple[Path, Path]]:
    """Move the finished runs of each old variant to the new variant's folders (module docstring). Raises
    `SuiteError`, with nothing moved, if a run's config does not match or its new folder is taken."""
    planned = {(r.variant.name, r.task.key, r.seed): r for r in ablate.plan(suite)}
    finished: dict[str, list[Path]] = {}
    for old, new in renames.items():
        if not any(v.name == new for v in suite.variants):
            raise ablate.SuiteError(f"relabel {old}:{new}: the suite has no variant {new!r}")
        finished[old] = sorted(
            p for p in (suite.output_dir / old).glob("*/seed*") if ablate.run_status(p) == "done"
        )
        if not finished[old]:
            raise ablate.SuiteError(f"relabel {old}:{new}: no finished runs under {suite.output_dir / old}")
    leaving = {d for dirs in finished.values() for d in dirs}
    moves, problems = [], []
    for old, new in renames.items():
        for old_dir in finished[old]:
            run = planned.get((new, old_dir.parent.name, int(old_dir.name.removeprefix("seed"))))
            if run is None:
                problems.append(f"{old_dir}: variant {new!r} has no run for this task and seed")
                continue
            if (
                run.run_dir.exists() and run.run_dir not in leaving
            ):  # a folder being relabelled itself is free
                problems.append(f"{old_dir}: {run.run_dir} exists (relabel or remove that run first)")
            stored = yaml.safe_load((old_dir / ablate.CONFIG).read_text())
            wanted = _wanted(run, stored)
            problems += [f"{old_dir}: {d}" for d in differences(stored, wanted, old_dir, run.run_dir)]
            moves.append((old_dir, run, wanted))
    if problems:
        raise ablate.SuiteError("cannot relabel, nothing moved:\n  " + "\n  ".join(problems))
    stage = suite.output_dir / ".relabel"
    stage.mkdir(exist_ok=True)
    staged = []
    for i, (old_dir, run, wanted) in enumerate(moves):  # via a stage: a new folder may be an old one
        shutil.move(old_dir, stage / str(i))
        staged.append((stage / str(i), old_dir, run, wanted))
    done_moves = []
    for tmp, old_dir, run, wanted in staged:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp, run.run_dir)
        _rewrite(suite, run, wanted, old_dir)
        log(f"{old_dir} -> {run.run_dir}")
        done_moves.append((old_dir, run.run_dir))
    shutil.rmtree(stage, ignore_errors=True)
    for old in renames:
        for folder in sorted((suite.output_dir / old).glob("**/"), reverse=True):  # emptied task folders
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return done_moves


def _rewrite(suite: ablate.Suite, run: ablate.RunSpec, wanted: dict, old_dir: Path) -> None:
    write_text_atomic(run.run_dir / ablate.CONFIG, yaml.safe_dump(wanted, sort_keys=False))
    meta = json.loads((run.run_dir / ablate.RUN_META).read_text())
    digest = ablate.config_digest(run.config)
    meta.update(
        {
            "variant": run.variant.name,
            "description": run.variant.description,
            "overlay": str(run.variant.overlay_path or ""),
            "config_digest": digest,
            "fit_command": "apt-fit " + " ".join(ablate.fit_argv(run, suite.args)),
            "rerun": ablate.rerun_command(suite, run),
            "relabelled_from": meta.get("relabelled_from") or meta.get("variant"),
        }
    )
    write_json_atomic(run.run_dir / ablate.RUN_META, meta)
    done = json.loads((run.run_dir / ablate.DONE).read_text())
    done["config_digest"] = digest
    for key in ("log_dir", "checkpoint"):
        if isinstance(done.get(key), str):
            done[key] = done[key].replace(str(old_dir), str(run.run_dir))
    write_json_atomic(run.run_dir / ablate.DONE, done)
