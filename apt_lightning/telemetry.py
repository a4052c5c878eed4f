"""Resource readings: this process's memory (resident set size, its peak) and, on a thread while a
benchmark runs, GPU clock and power samples.

Under sustained load a GPU lowers its clocks when it reaches its power or thermal limits, and by how much
depends on the work: on an H200 a dense bf16 encoder draws more power than its pruned form and settles at
lower clocks. A speedup measured over short bursts (the card still at its idle boost clock) and one measured
over sustained load can therefore differ; `ClockSampler` records the clocks so a result says which it is.
"""

from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from types import TracebackType

import torch


def _read(device: torch.device) -> tuple[float, float]:
    """The SM clock (MHz) and power draw (W) now, through NVML (`torch.cuda.clock_rate`, `power_draw`)."""
    return float(torch.cuda.clock_rate(device)), torch.cuda.power_draw(device) / 1e3


class ClockSampler:
    """A context manager sampling the SM clock and power of a CUDA `device` every `interval` seconds.

    `available` is False on a CPU, or where NVML cannot be read (no `pynvml`, no driver access); the sampler
    then records nothing and `during` returns None. Timestamps are `time.perf_counter()` seconds.
    """

    def __init__(self, device: str | torch.device, interval: float = 0.005) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.device = torch.device(device)
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, SM MHz, W)
        self.unavailable_reason: str | None = None
        if self.device.type != "cuda":
            self.unavailable_reason = f"not a CUDA device: {self.device}"
        else:
            try:
                _read(self.device)
            except Exception as err:  # noqa: BLE001 - NVML raises its own error types, or ModuleNotFoundError
                self.unavailable_reason = f"NVML not readable: {err}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            self.samples.append((now, *_read(self.device)))
            self._stop.wait(self.interval)

    def __enter__(self) -> ClockSampler:
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="clock-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def during(self, windows: list[tuple[float, float]]) -> dict[str, float | int] | None:
        """Medians of the samples taken inside any of the `(start, end)` windows, or None without samples."""
        inside = [(mhz, w) for t, mhz, w in self.samples if any(a <= t <= b for a, b in windows)]
        if not inside:
            return None
        return {
            "sm_clock_mhz": statistics.median(m for m, _ in inside),
            "power_w": statistics.median(w for _, w in inside),
            "samples": len(inside),
        }


# ---------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last `reset_peak_rss`, where supported)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")
