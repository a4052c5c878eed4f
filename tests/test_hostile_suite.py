"""apt-ablate under abuse: a SIGKILLed apt-ablate leaves no orphan worker and its rerun takes the stale lock
over; a worker killed after done.json counts as done; benchmarks refuse to run beside a training process
of the suite on the same device."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GLUE_DIR, REPO

from apt_lightning.tools.suite import inference, layout, lock, train
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite

needs_glue = pytest.mark.skipif(not (GLUE_DIR / "sst2").is_dir(), reason="shared GLUE data not present")
BASE = REPO / "configs" / "quickstart_cpu.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _suite(tmp_path: Path, variants=("apt",)) -> Path:
    spec = {
        "name": "hostile",
        "base": str(BASE),
        "overlay_dir": str(REPO / "configs" / "ablations"),
        "output_dir": str(tmp_path / "out"),
        "data_root": str(GLUE_DIR),
        "seeds": [0],
        "variants": list(variants),
        "tasks": {"sst2": {"data_dir": "{data_root}/sst2"}},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _alive(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


# a fake worker: trains while the HOLD file exists, then writes done.json (KILL_AFTER_DONE: dies at once)
WORKER = """
import json, os, pathlib, signal, sys, time
run = pathlib.Path(sys.argv[1])
hold = pathlib.Path(os.environ.get("HOLD", "/nonexistent"))
while hold.exists():
    time.sleep(0.05)
(run / "done.json").write_text(json.dumps({"best_metric": 0.5}))
if os.environ.get("KILL_AFTER_DONE"):
    os.kill(os.getpid(), signal.SIGKILL)
"""

# an apt-ablate stand-in: train_runs with the fake worker, in its own process
PARENT = """
import sys
from apt_lightning.tools.suite import train
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite
train.worker_command = lambda run_dir, extra: [sys.executable, sys.argv[2], str(run_dir)]
suite = load_suite(sys.argv[1])
train.train_runs(suite, plan(suite))
"""


@pytest.fixture
def worker(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setattr(
        train, "worker_command", lambda run_dir, extra: [sys.executable, str(script), str(run_dir)]
    )
    return script


@needs_glue
def test_killed_parent_takes_its_worker_along_and_the_rerun_recovers(tmp_path, worker, monkeypatch):
    hold = tmp_path / "hold"
    hold.touch()
    suite_path = _suite(tmp_path)
    run_dir = plan(load_suite(suite_path))[0].run_dir
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(suite_path), str(worker)],
        env={**ENV, "HOLD": str(hold)},
        stdout=subprocess.DEVNULL,
    )
    pid = None
    try:
        record = _wait_for(lambda: (layout.read_json(run_dir / layout.LOCK) or {}).get("worker"))
        pid = int(record)
        assert _alive(pid) and layout.run_status(run_dir) == "running"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not _alive(pid), timeout=20)  # the worker died with its parent
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert layout.run_status(run_dir) == "pending" and layout.lock_holder(run_dir) is None
    hold.unlink()
    messages: list[str] = []
    suite = load_suite(suite_path)
    result = train.train_runs(suite, plan(suite), log=messages.append)
    assert result["done"] == ["apt/sst2/seed0"], messages
    assert any(m.startswith("[recover] apt/sst2/seed0: stale lock (owner ") for m in messages), messages
    assert layout.read_json(run_dir / layout.LOCK) is None  # released: empty
    assert layout.run_status(run_dir) == "done"


def test_worker_polls_its_parent_where_there_is_no_pdeathsig(tmp_path):
    """The fallback: a worker started without prctl stops once its parent is gone."""
    child = (
        "import time; from apt_lightning.tools.suite.lock import watch_parent; "
        "assert watch_parent(0.05) is not None; time.sleep(120)"
    )
    parent_code = (
        "import os, subprocess, sys, time\n"
        "from apt_lightning.tools.suite.lock import parent_env\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, **parent_env()}}, "
        "start_new_session=True)\n"
        "print(p.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=ENV, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not _alive(pid), timeout=20)
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- locks
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = _dead_pid()
    (run_dir / layout.LOCK).write_text(
        json.dumps({"owner": dead, "worker": dead, "host": os.uname().nodename})
    )
    assert layout.lock_holder(run_dir) is None and layout.run_status(run_dir) == "pending"
    messages: list[str] = []
    held = lock.acquire(run_dir, "x/run", messages.append)
    assert held is not None and messages == [
        f"[recover] x/run: stale lock (owner {dead}, worker {dead}; those processes are gone): taken over"
    ]
    assert layout.lock_holder(run_dir)["owner"] == os.getpid() and layout.run_status(run_dir) == "running"
    assert lock.acquire(run_dir, "x/run", messages.append) is None  # held (flock), not stale
    held.release()
    assert layout.lock_holder(run_dir) is None and (run_dir / layout.LOCK).read_text() == ""
    again = lock.acquire(run_dir, "x/run", messages.append)
    assert again is not None and len(messages) == 1  # a cleanly released lock is not "stale"
    again.release()


@needs_glue
def test_a_run_claimed_by_a_live_process_is_skipped(tmp_path, worker):
    suite = load_suite(_suite(tmp_path))
    run = plan(suite)[0]
    other = lock.acquire(run.run_dir, run.run_id, lambda _: None)  # as another apt-ablate would
    try:
        messages: list[str] = []
        result = train.train_runs(suite, plan(suite), log=messages.append)
        assert result["skipped"] == [run.run_id] and not (run.run_dir / "done.json").exists()
        assert f"another apt-ablate process (pid {os.getpid()}) has claimed it" in messages[0]
    finally:
        other.release()
    assert train.train_runs(suite, plan(suite), log=lambda _: None)["done"] == [run.run_id]


# ---------------------------------------------------------------------- done wins
@needs_glue
def test_worker_killed_right_after_done_json_counts_as_done(tmp_path, worker, monkeypatch):
    monkeypatch.setenv("KILL_AFTER_DONE", "1")
    suite = load_suite(_suite(tmp_path))
    run = plan(suite)[0]
    messages: list[str] = []
    result = train.train_runs(suite, plan(suite), log=messages.append)
    assert result["done"] == [run.run_id] and result["failed"] == []
    assert (run.run_dir / "done.json").is_file() and not (run.run_dir / "failed.json").exists()
    assert f"exited {-signal.SIGKILL}; done.json wins" in messages[-1]
    # a folder left with both (by an older version): done wins and the stale failed.json goes
    (run.run_dir / "failed.json").write_text("{}")
    assert layout.run_status(run.run_dir) == "done"
    result = train.train_runs(suite, plan(suite), log=messages.append)
    assert result["skipped"] == [run.run_id] and not (run.run_dir / "failed.json").exists()
    assert any(m.startswith(f"[fix] {run.run_id}: both done.json and failed.json") for m in messages)


# ---------------------------------------------------------------------- benchmarks beside training
def test_training_on_matches_devices(tmp_path, monkeypatch):
    suite_dir = tmp_path / "suite"
    run_dir = suite_dir / "v" / "sst2" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / layout.RUN_META).write_text("{}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = lock.acquire(run_dir, "v/sst2/seed0", lambda _: None)
    try:
        assert lock.training_on(suite_dir, "cpu") == []  # claimed, no worker yet
        held.update(worker=sleeper.pid, worker_start=layout.process_start(sleeper.pid), gpus="1")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert [b["worker"] for b in lock.training_on(suite_dir, "cpu")] == [sleeper.pid]
        assert lock.training_on(suite_dir, "cuda") == [] and lock.training_on(suite_dir, "cuda:0") == []
        assert len(lock.training_on(suite_dir, "cuda:1")) == 1
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # this process's cuda:1 is GPU 1
        assert len(lock.training_on(suite_dir, "cuda:1")) == 1 and lock.training_on(suite_dir, "cuda:0") == []
        held.update(gpus=None)  # an unrestricted worker may use any GPU
        assert len(lock.training_on(suite_dir, "cuda:0")) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.training_on(suite_dir, "cpu") == []  # the worker has gone
    held.release()


@needs_glue
def test_bench_refuses_while_a_training_process_of_the_suite_shares_the_device(
    tmp_path, tiny_backbone_dir, monkeypatch
):
    import apt_lightning.export

    suite = load_suite(_suite(tmp_path, variants=("apt", "ft", "no_distillation")))
    runs = plan(suite)
    for run in runs[:2]:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "done.json").write_text("{}")
        (run.run_dir / "final.ckpt").write_text(run.variant.name)
        (run.run_dir / "run.json").write_text("{}")
    training = runs[2].run_dir  # a run of the suite that another apt-ablate is training now
    training.mkdir(parents=True)
    (training / "run.json").write_text("{}")

    class Fake:
        def __init__(self, ckpt):
            self.hparams = {"backbone": str(tiny_backbone_dir), "task": "sst2"}
            self.student = torch.nn.Linear(2, 2)

    calls: list[int] = []
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = lock.acquire(training, runs[2].run_id, lambda _: None)

    def start_training():
        held.update(worker=sleeper.pid, worker_start=layout.process_start(sleeper.pid), gpus=None)

    def bench(model, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            start_training()  # training starts while the first model is measured
        return {"samples_per_s": 10.0, "latency_ms": 1.0, "peak_mb": 1.0}

    monkeypatch.setattr(inference, "load_final_module", Fake)
    monkeypatch.setattr(apt_lightning.export, "compact_for_inference", lambda m: m)
    monkeypatch.setattr(inference, "load_benchmark", lambda: bench)
    suite.benchmark.update(device="cpu", rounds=1)
    dense_dir = suite.output_dir / "_dense"
    try:
        messages: list[str] = []
        result = inference.bench_runs(suite, runs, log=messages.append)
        assert result["busy"] == [r.run_id for r in runs[:2]] and result["done"] == []
        assert "since the measurement began" in messages[0] and "now:" in messages[1]
        assert f"{runs[2].run_id} (pid {sleeper.pid})" in messages[1] and "apt-ablate bench" in messages[1]
        assert not any((r.run_dir / "inference.json").exists() for r in runs)
        assert not dense_dir.exists() or not list(dense_dir.glob("*.json"))  # no disturbed dense cached
    finally:
        sleeper.kill()
        sleeper.wait()
        held.release()
    result = inference.bench_runs(suite, runs, log=lambda _: None)
    assert result["done"] == [r.run_id for r in runs[:2]] and len(list(dense_dir.glob("*.json"))) == 1
