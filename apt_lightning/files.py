"""Atomic file writes: readers (and a crash) never see half a file; and the temporary folders of atomic
folder writes, named so that the ones a killed process left behind can be found and removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` through a temporary file in the same folder and a rename; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------------- temporary folders
# ``.<name>.apt-tmp.<host>.<pid>.<random>`` beside the folder being written: the host and pid of the writer
_TEMP = re.compile(r"^\..+\.apt-tmp\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_temp_dir(target: Path) -> Path:
    """A new hidden folder beside `target` (same filesystem, so it can be renamed into place), whose name
    carries this machine's name and this process's pid (see `remove_stale_temp_dirs`)."""
    return Path(
        tempfile.mkdtemp(prefix=f".{target.name}.apt-tmp.{_host()}.{os.getpid()}.", dir=target.parent)
    )


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove the temporary folders in `parent` that `make_temp_dir` made for processes of this machine
    that are no longer alive (a killed export); returns them. Folders of live processes, of other
    machines and of any other name are left alone."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _host() or not entry.is_dir() or entry.is_symlink():
            continue
        if int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
