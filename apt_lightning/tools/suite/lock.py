"""Who trains a run, and keeping training processes from outliving the apt-ablate process that started them.

**The run lock.** ``train.lock`` in a run folder is claimed with ``flock`` by the apt-ablate process that
is about to train the run and is passed to the worker, so the kernel releases it when both are gone. Its
JSON records the claimer (``owner``), the worker (``worker``), their start times (a reused pid is told
apart), the machine and the worker's GPUs (``gpus``: its CUDA_VISIBLE_DEVICES, null when unrestricted).
A lock that exists but whose processes are gone is *stale*: the next apt-ablate takes it over and says
so in its log. A clean finish empties the file (it is never deleted: deleting a locked path would let
two processes lock two different files).

**Workers die with their parent.** On Linux each worker asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, set between fork and exec); everywhere, `watch_parent` in the worker polls
its parent's pid and kills the worker's process group once the parent is gone. So a killed apt-ablate
leaves no orphan training, and its rerun takes the stale locks over.

**Benchmarks and training.** `training_on` lists the live workers of a suite that share a device with a
benchmark; `apt-ablate bench` refuses to measure while there are any (tools.suite.inference).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from apt_lightning.tools.suite.layout import LOCK, lock_holder, process_start, run_folders, same_process

PARENT_ENV = "APT_ABLATE_PARENT"  # the worker's parent: "<pid>:<start time>"
_PR_SET_PDEATHSIG = 1


class RunLock:
    """A held train.lock (see the module docstring). `fd` is passed to the worker."""

    def __init__(self, path: Path, fd: int, record: dict):
        self.path, self.fd, self.record = path, fd, record

    def update(self, **fields) -> None:
        self.record.update(fields)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.record).encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = -1


def acquire(run_dir: Path, run_id: str, log: Callable[[str], None] = print) -> RunLock | None:
    """Claim a run for this process; None when a live process holds it. A stale lock is taken over."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    try:
        old = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        old = {}
    if old.get("owner"):
        pids = ", ".join(f"{k} {old[k]}" for k in ("owner", "worker") if old.get(k))
        log(f"[recover] {run_id}: stale lock ({pids}; those processes are gone): taken over")
    lock = RunLock(path, fd, {})
    lock.update(
        owner=os.getpid(),
        owner_start=process_start(os.getpid()),
        host=socket.gethostname(),
        claimed=time.time(),
    )
    return lock


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for a worker: SIGKILL when this (the parent) process dies (Linux; elsewhere a no-op,
    and the worker's `watch_parent` does it). If the parent is already gone, the child exits at once."""
    parent, prctl = os.getpid(), None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
        except (OSError, AttributeError):
            prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def parent_env() -> dict[str, str]:
    """The environment entry that tells a worker whom to watch (`watch_parent`)."""
    return {PARENT_ENV: f"{os.getpid()}:{process_start(os.getpid()) or ''}"}


def watch_parent(interval: float = 1.0) -> threading.Thread | None:
    """In a worker: a daemon thread that kills the worker's process group once the apt-ablate process
    named in APT_ABLATE_PARENT is gone (the fallback of PR_SET_PDEATHSIG). None when not set."""
    value = os.environ.get(PARENT_ENV, "")
    if not value:
        return None
    pid_text, _, start = value.partition(":")
    pid = int(pid_text)

    def gone() -> bool:
        if os.getppid() != pid:
            return True
        now = process_start(pid)
        return bool(start and now and now != start)

    def watch() -> None:
        while not gone():
            time.sleep(interval)
        print(f"apt-ablate: parent process {pid} is gone; stopping this training process", file=sys.stderr)
        try:
            if os.getpgrp() == os.getpid():  # our own group (start_new_session): the DataLoader workers too
                os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="apt-ablate-parent-watch", daemon=True)
    thread.start()
    return thread


def physical_gpu(device: str) -> str | None:
    """The GPU a torch device string of this process is on, as CUDA_VISIBLE_DEVICES names it; None: CPU."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(visible):
        return visible[index]
    return str(index)


def training_on(suite_dir: Path, device: str) -> list[dict]:
    """The live training workers of the suite in `suite_dir` that share `device` with a benchmark of this
    process: on the CPU every one of them (they all load the CPU), on a GPU those that may use that GPU
    (their CUDA_VISIBLE_DEVICES holds it or is unrestricted). Each: the lock record plus ``run_dir``."""
    gpu = physical_gpu(device)
    busy = []
    for run_dir in run_folders(suite_dir):
        record = lock_holder(run_dir)
        if record is None or not record.get("worker"):
            continue  # free, stale, or claimed but not started
        here = record.get("host") in (None, socket.gethostname())
        if here and not same_process(record["worker"], record.get("worker_start")):
            continue  # the worker has just ended
        gpus = record.get("gpus")
        if gpu is None or gpus is None or gpu in [g.strip() for g in str(gpus).split(",")]:
            busy.append({**record, "run_dir": str(run_dir)})
    return busy
