"""The training phase of a suite: each run in its own `apt-fit` process, `parallel` at a time, spread over
the suite's GPUs; a run whose FT reference is still training waits while another can start. One failing
run never stops the others. `train_worker` is the body of one such process (``python -m
apt_lightning.tools.suite _train RUN_DIR``).

Each run is claimed through its ``train.lock`` before it is trained (a run another live process holds is
skipped; a stale lock, whose processes are gone, is taken over with a ``[recover]`` line), and each worker
dies with the apt-ablate process that started it (`tools.suite.lock`). done.json is the last thing a
worker writes and it wins: a run whose worker exits badly (or is killed, or times out) *after* writing it
counts as done, and no failed.json is written beside it (a stale one is removed).
"""

from __future__ import annotations

import copy
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.files import write_json_atomic, write_text_atomic
from apt_lightning.tools.suite.compose import (
    config_digest,
    fit_argv,
    monitor_mode,
    primary_monitor,
    rerun_command,
    set_tta_reference,
)
from apt_lightning.tools.suite.gpus import least_loaded
from apt_lightning.tools.suite.layout import (
    BENCH_FAILED,
    CONFIG,
    DONE,
    EFFICIENCY,
    EVAL_FAILED,
    EVAL_LOG,
    EXPORT_DIR,
    FAILED,
    FINAL_CKPT,
    INFERENCE,
    LOG_DIR,
    RUN_META,
    SELECTION_DIR,
    TRAIN_LOG,
    ZERO_SHOT,
    best_metric,
    lock_holder,
    logged_metric,
    process_start,
    read_json,
    run_dir_for,
    run_status,
    tail,
)
from apt_lightning.tools.suite.lock import RunLock, acquire, die_with_parent, parent_env, watch_parent
from apt_lightning.tools.suite.overlay import get_dotted
from apt_lightning.tools.suite.spec import RunSpec, Suite


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a worker's process group (the worker and its DataLoader processes)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reference_metric(suite: Suite, run: RunSpec) -> float | None:
    """The FT run's best dev metric for the same task and seed, if that run has finished."""
    if suite.reference is None or run.variant.name == suite.reference:
        return None
    done = read_json(run_dir_for(suite.output_dir, suite.reference, run.task.key, run.seed) / DONE)
    value = done.get("best_metric") if done else None
    return float(value) if value is not None else None


# ---------------------------------------------------------------------- training phase
def _prepare(suite: Suite, run: RunSpec) -> list[str]:
    """Clear a previous attempt, write config.yaml and run.json; return the worker's command."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (
        DONE,
        FAILED,
        INFERENCE,
        BENCH_FAILED,
        FINAL_CKPT,
        TRAIN_LOG,
        ZERO_SHOT,
        EVAL_FAILED,
        EVAL_LOG,
    ):
        (run.run_dir / stale).unlink(missing_ok=True)
    for folder in (run.run_dir / LOG_DIR, run.run_dir / EXPORT_DIR, run.run_dir / SELECTION_DIR):
        if folder.is_dir():
            import shutil

            shutil.rmtree(folder)
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
        "mode": monitor_mode(run.task.task),
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
    return [sys.executable, "-m", "apt_lightning.tools.suite", "_train", str(run_dir), *extra]


def _finish_failed(run: RunSpec, rc: int | None, reason: str) -> None:
    if (run.run_dir / DONE).is_file():  # done wins: the worker finished before it was stopped
        (run.run_dir / FAILED).unlink(missing_ok=True)
        return
    write_json_atomic(
        run.run_dir / FAILED,
        {
            "returncode": rc,
            "reason": reason,
            "finished": time.time(),
            "log_tail": tail(run.run_dir / TRAIN_LOG),
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
    todo, locks = [], {}
    for run in runs:
        status = run_status(run.run_dir)
        if status == "done" and (run.run_dir / FAILED).is_file():
            (run.run_dir / FAILED).unlink()
            log(f"[fix] {run.run_id}: both done.json and failed.json; done wins, failed.json removed")
        if status == "done" and not force:
            done = read_json(run.run_dir / DONE) or {}
            if done.get("config_digest") not in (None, config_digest(run.config)):
                log(f"[skip] {run.run_id}: finished with a different config (use --force to rerun it)")
            result["skipped"].append(run.run_id)
        elif status == "running" or (lock := acquire(run.run_dir, run.run_id, log)) is None:
            holder = lock_holder(run.run_dir) or read_json(run.run_dir / RUN_META) or {}
            if holder.get("worker") or holder.get("pid"):
                what = f"another process is training it (pid {holder.get('worker') or holder.get('pid')})"
            else:
                what = f"another apt-ablate process (pid {holder.get('owner')}) has claimed it"
            log(f"[skip] {run.run_id}: {what}")
            result["skipped"].append(run.run_id)
        else:
            todo.append(run)
            locks[run.run_id] = lock
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if suite.parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // suite.parallel))
    try:
        _train_all(suite, todo, locks, env, result, log)
    finally:
        for lock in locks.values():
            lock.release()
    return result


def _train_all(
    suite: Suite,
    todo: list[RunSpec],
    locks: dict[str, RunLock],
    env: dict,
    result: dict,
    log: Callable[[str], None],
) -> None:
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
                    gpu = least_loaded(suite.gpus, [g for _, _, _, g in active.values()])
                    run_env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
                lock = locks[pick.run_id]
                proc = subprocess.Popen(
                    cmd,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env={**run_env, **parent_env()},
                    start_new_session=True,
                    preexec_fn=die_with_parent(),  # noqa: PLW1509 - only prctl and getppid run there
                    pass_fds=(lock.fd,),  # the worker holds the run's lock too, until it ends
                )
                lock.update(
                    worker=proc.pid,
                    worker_start=process_start(proc.pid),
                    gpus=run_env.get("CUDA_VISIBLE_DEVICES"),
                    run=pick.run_id,
                )
                meta = read_json(pick.run_dir / RUN_META) or {}
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
                locks.pop(run.run_id).release()
                if (run.run_dir / DONE).is_file():  # done wins, whatever happened after it was written
                    (run.run_dir / FAILED).unlink(missing_ok=True)
                    result["done"].append(run.run_id)
                    late = "" if rc == 0 else f" (the process then exited {rc}; done.json wins)"
                    log(f"[done] {run.run_id} in {time.time() - t0:.0f} s{late}")
                else:
                    if not (run.run_dir / FAILED).is_file():
                        _finish_failed(run, rc, "training process failed")
                    result["failed"].append(run.run_id)
                    log(
                        f"[FAILED] {run.run_id} (exit {rc}); log: {run.run_dir / TRAIN_LOG}\n"
                        + _indent(tail(run.run_dir / TRAIN_LOG, 15))
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


def _waits_for_reference(suite: Suite, run: RunSpec, active: dict) -> bool:
    if suite.reference is None or run.variant.name == suite.reference:
        return False
    ref_dir = run_dir_for(suite.output_dir, suite.reference, run.task.key, run.seed)
    return any(r.run_dir == ref_dir for r, _, _, _ in active.values())


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def train_worker(run_dir: Path, extra: list[str]) -> int:
    """The body of one training process: apt-fit on config.yaml, final checkpoint, the selected checkpoint
    tested on the official dev set (with a carved validation split; `test_selected`), done.json."""
    watch_parent()  # stop when the apt-ablate process that started us is gone
    meta = read_json(run_dir / RUN_META) or {}
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
    logged = [value for _, value in logged_metric(log_dir, meta.get("monitor", "val/accuracy"))]
    best = best_metric(read_json(log_dir / EFFICIENCY), None, logged, meta.get("mode", "max"))
    final = logged[-1] if logged else None
    tested = test_selected(cli, meta.get("monitor", "val/accuracy"))
    import torch

    write_json_atomic(
        run_dir / DONE,
        {
            **tested,
            "finished": time.time(),
            "wall_s": time.time() - t0,
            "global_step": trainer.global_step,
            "best_metric": best,
            "final_metric": final,
            "monitor": meta.get("monitor"),
            "mode": meta.get("mode", "max"),
            "log_dir": str(log_dir),
            "checkpoint": str(run_dir / FINAL_CKPT),
            "config_digest": meta.get("config_digest"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": _versions(),
        },
    )
    return 0


def test_selected(cli, monitor: str) -> dict:
    """With a validation split carved from the training data: the checkpoint the run's
    `FinalStructureCheckpoint` chose on it (the final model when it saved none) tested on the official dev
    set (the datamodule's test split), its file then deleted. Returns done.json's test keys ({} without a
    carved split); a failing test is recorded as `test_error`, not lost with the trained run.

    The checkpoint is tested on a fresh module of the run's class and hyperparameters, cut to the widths
    the checkpoint saved: the trained model may have changed shape after the save (`SelfDistillation`'s
    `authors` schedule compacts the student when distillation ends, after the last selected point)."""
    from apt_lightning.callbacks import FinalStructureCheckpoint

    trainer, datamodule = cli.trainer, cli.datamodule
    if not getattr(datamodule, "carved", False):
        return {}
    selector = next((c for c in trainer.callbacks if isinstance(c, FinalStructureCheckpoint)), None)
    path = selector.best_model_path if selector is not None and selector.best_model_path else None
    out: dict[str, Any] = {"selected_checkpoint": "best" if path else "final"}
    out["selected_step"] = trainer.global_step
    if path:
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        out["selected_step"] = saved["global_step"]
        out["selected_val_metric"] = float(selector.best_model_score)
    try:
        model = type(cli.model).load_from_checkpoint(path, map_location="cpu") if path else cli.model
        results = trainer.test(model, datamodule=datamodule, verbose=False)
    except Exception as err:  # the trained run stays done; the report shows the test as missing
        import traceback

        traceback.print_exc()
        return {**out, "test_error": repr(err)}
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if path:
        Path(path).unlink(missing_ok=True)
    test_key = "test/" + monitor.removeprefix("val/")
    return {**out, "test_metric": metrics.get(test_key), "test_monitor": test_key, "test_metrics": metrics}


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
