"""The zero-shot phase of a suite: every finished causal-LM run's exported model scored on the local
multiple-choice sets by ``apt-eval`` (`eval_command`), one process per model, after training; the
untuned backbone once per suite. Up to the suite's `parallel` processes run at a time, each on the least
used of the suite's GPUs. On only when the suite has an ``evaluation:`` block; classifier runs are
skipped (`tools.suite.exports` tells them apart by their trained model).

Each run gets ``zero_shot.json``: apt-eval's JSON (``{"model", "tasks": {task: {n, acc, acc_stderr,
acc_norm, acc_norm_stderr, chance}}, "average": {acc, acc_norm, chance}, "limit"}``) plus the settings
and command; apt-eval's output goes to ``zero_shot.log``, a failure to ``zero_shot_failed.json`` (the
others go on; the next run of the phase retries it). The backbone's scores are cached in
``_dense/zero_shot_<digest>.json`` (the backbone, the settings, the results).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from apt_lightning.files import write_json_atomic
from apt_lightning.tools.suite.gpus import device_and_dtype, least_loaded
from apt_lightning.tools.suite.layout import (
    DENSE_DIR,
    DONE,
    EVAL_FAILED,
    EVAL_LOG,
    RUN_META,
    ZERO_SHOT,
    read_json,
    tail,
)
from apt_lightning.tools.suite.spec import RunSpec, Suite

BACKBONE_PREFIX = "zero_shot_"  # _dense/zero_shot_<digest>.json: a backbone's scores


def eval_command() -> list[str]:
    """The apt-eval command line, before its arguments: this interpreter running apt-eval's module, so it
    works where the console script is not installed (a seam: tests substitute a fake evaluator)."""
    return [sys.executable, "-m", "apt_lightning.evaluation.cli"]


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def eval_settings(options: dict) -> tuple[str, str]:
    """(dtype, device) for apt-eval: `auto` is bfloat16 on CUDA, float32 on the CPU."""
    device, dtype = device_and_dtype(options)
    return _TORCH_DTYPES.get(dtype, dtype), device


def eval_argv(options: dict, source: list[str], out: Path) -> list[str]:
    """apt-eval's command for one model (`source`: ``--model-dir DIR`` or ``--backbone NAME``)."""
    dtype, device = eval_settings(options)
    argv = [*eval_command(), *source, "--tasks", str(options["tasks"]), "--batch-size"]
    argv += [str(options["batch_size"]), "--device", device, "--dtype", dtype, "--out", str(out)]
    if options.get("limit") is not None:
        argv += ["--limit", str(options["limit"])]
    if options.get("data_root") is not None:
        argv += ["--data-root", str(options["data_root"])]
    return argv


def run_eval(
    argv: list[str], out: Path, log_file: Path, timeout_s: float | None, gpu: str | None = None
) -> dict:
    """Run apt-eval (on `gpu`, a CUDA_VISIBLE_DEVICES value, when given), its output into `log_file`; its
    results (checked for the fields the report reads), or a RuntimeError naming the exit status and the
    log's tail."""
    out.unlink(missing_ok=True)
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    with log_file.open("w") as handle:
        handle.write("$ " + shlex.join(argv) + "\n")
        handle.flush()
        try:
            rc = subprocess.run(
                argv, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout_s} s"
    results = read_json(out)
    out.unlink(missing_ok=True)
    if rc != 0 or results is None:
        why = f"exit {rc}" if rc != 0 else f"no readable JSON in {out.name}"
        raise RuntimeError(f"apt-eval failed ({why}); {log_file}:\n{tail(log_file, 12)}")
    tasks, average = results.get("tasks"), results.get("average")
    if not isinstance(tasks, dict) or not tasks or not isinstance(average, dict) or "acc" not in average:
        raise RuntimeError(f"apt-eval wrote results without tasks or an average accuracy: {sorted(results)}")
    return results


def _record(results: dict, options: dict, argv: list[str]) -> dict:
    return {**results, "settings": options, "command": shlex.join(argv)}


class _Slots:
    """The GPUs apt-eval processes run on: each process takes the least used of the suite's GPUs."""

    def __init__(self, gpus: list[str] | None) -> None:
        self.gpus, self.busy, self.lock = gpus, [], threading.Lock()

    def take(self) -> str | None:
        if not self.gpus:
            return None
        with self.lock:
            gpu = least_loaded(self.gpus, self.busy)
            self.busy.append(gpu)
            return gpu

    def give(self, gpu: str | None) -> None:
        if gpu is not None:
            with self.lock:
                self.busy.remove(gpu)


def evaluate_runs(
    suite: Suite, runs: list[RunSpec], force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Score the export of every finished causal-LM run (and the untuned backbone, once), up to the suite's
    `parallel` apt-eval processes at a time, spread over its GPUs."""
    result: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    options = suite.evaluation
    if options is None:
        return result
    from apt_lightning.tools.suite.exports import causal_lm_export

    backbones: list[str] = []
    todo: list[tuple[RunSpec, Path]] = []
    for run in runs:
        if not (run.run_dir / DONE).is_file() or ((run.run_dir / ZERO_SHOT).is_file() and not force):
            result["skipped"].append(run.run_id)
            continue
        try:
            folder = causal_lm_export(run.run_dir)
        except Exception as err:  # noqa: BLE001 - one broken model must not stop the others
            _failed(run, err, result, log)
            continue
        if folder is None:
            result["skipped"].append(run.run_id)  # a classifier run (or nothing left to evaluate)
            continue
        backbone = (read_json(run.run_dir / RUN_META) or {}).get("backbone")
        if backbone and backbone not in backbones:
            backbones.append(backbone)
        todo.append((run, folder))
    slots = _Slots(suite.gpus)

    def evaluate(run: RunSpec, folder: Path) -> None:
        gpu = slots.take()
        try:
            out = run.run_dir / f".{ZERO_SHOT}.partial"
            argv = eval_argv(options, ["--model-dir", str(folder)], out)
            scores = run_eval(argv, out, run.run_dir / EVAL_LOG, options["timeout_s"], gpu)
            write_json_atomic(run.run_dir / ZERO_SHOT, _record(scores, options, argv))
            (run.run_dir / EVAL_FAILED).unlink(missing_ok=True)
            result["done"].append(run.run_id)
            average = scores["average"]["acc"]
            log(f"[eval] {run.run_id}: average acc {average:.4f} over {len(scores['tasks'])} tasks")
        except Exception as err:  # noqa: BLE001 - one broken model must not stop the others
            _failed(run, err, result, log)
        finally:
            slots.give(gpu)

    def evaluate_backbone(backbone: str) -> None:
        gpu = slots.take()
        try:
            if not _evaluate_backbone(suite, backbone, options, force, log, gpu):
                result["failed"].append(f"backbone {backbone}")
        finally:
            slots.give(gpu)

    with ThreadPoolExecutor(max_workers=max(1, suite.parallel)) as pool:
        jobs = [pool.submit(evaluate, run, folder) for run, folder in todo]
        if options["backbone"]:
            jobs += [pool.submit(evaluate_backbone, backbone) for backbone in backbones]
        for job in jobs:
            job.result()
    return result


def _failed(run: RunSpec, err: Exception, result: dict, log: Callable[[str], None]) -> None:
    result["failed"].append(run.run_id)
    write_json_atomic(run.run_dir / EVAL_FAILED, {"error": f"{type(err).__name__}: {err}"})
    log(f"[eval] {run.run_id} FAILED: {type(err).__name__}: {err}")


def backbone_cache(suite_dir: Path, backbone: str, options: dict) -> Path:
    key = json.dumps({"backbone": backbone, "settings": options}, sort_keys=True, default=str)
    return suite_dir / DENSE_DIR / f"{BACKBONE_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _evaluate_backbone(
    suite: Suite, backbone: str, options: dict, force: bool, log: Callable, gpu: str | None = None
) -> bool:
    """The untuned backbone's scores, once per suite and settings; False when apt-eval failed."""
    path = backbone_cache(suite.output_dir, backbone, options)
    if path.is_file() and not force:
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    out = path.with_name(f".{path.name}.partial")
    argv = eval_argv(options, ["--backbone", backbone], out)
    try:
        scores = run_eval(argv, out, path.with_suffix(".log"), options["timeout_s"], gpu)
    except RuntimeError as err:
        log(f"[eval] backbone {backbone} FAILED: {err}")
        return False
    write_json_atomic(path, {"backbone": backbone, **_record(scores, options, argv)})
    log(f"[eval] backbone {backbone} (untuned): average acc {scores['average']['acc']:.4f}")
    return True
