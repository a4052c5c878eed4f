"""ClockSampler: sampling on a thread, medians over time windows, and its off switch where NVML is absent."""

import time

import pytest
import torch

from apt_lightning import telemetry
from apt_lightning.telemetry import ClockSampler
from apt_lightning.tools.bench import reporting


def test_unavailable_on_cpu_records_nothing():
    with ClockSampler("cpu") as clocks:
        time.sleep(0.02)
    assert not clocks.available and "not a CUDA device" in clocks.unavailable_reason
    assert clocks.samples == [] and clocks.during([(0.0, time.perf_counter())]) is None


def test_unreadable_nvml_is_reported_not_raised(monkeypatch):
    def broken(device):
        raise ModuleNotFoundError("No module named 'pynvml'")

    monkeypatch.setattr(telemetry, "_read", broken)
    clocks = ClockSampler(torch.device("cuda"))
    assert not clocks.available and "pynvml" in clocks.unavailable_reason


def test_samples_on_a_thread_and_takes_medians_inside_windows(monkeypatch):
    readings = iter(range(1, 10**6))

    def fake(device):  # a clock that rises by 1 MHz per reading, at a fixed 300 W
        return float(next(readings)), 300.0

    monkeypatch.setattr(telemetry, "_read", fake)
    with ClockSampler("cuda", interval=0.001) as clocks:
        first = time.perf_counter()
        time.sleep(0.05)
        middle = time.perf_counter()
        time.sleep(0.05)
    count = len(clocks.samples)
    time.sleep(0.01)
    assert len(clocks.samples) == count > 10  # the thread stopped on exit
    early, late = clocks.during([(first, middle)]), clocks.during([(middle, time.perf_counter())])
    assert early["power_w"] == 300.0 and early["sm_clock_mhz"] < late["sm_clock_mhz"]
    both = clocks.during([(first, middle), (middle, time.perf_counter())])
    assert both["samples"] == early["samples"] + late["samples"]
    assert clocks.during([(-2.0, -1.0)]) is None


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        ClockSampler("cpu", interval=0)


def test_table_names_the_clocks_each_model_ran_at():
    c = {"sm_clock_mhz": 1755.0, "power_w": 650.2, "samples": 40}
    report = {
        "env": {
            "device_name": "GPU",
            "dtype": "bf16",
            "seq_len": 8,
            "warmup": 1,
            "repeats": 2,
            "order": "interleaved",
        },
        "models": {"dense": {"params": 2e6}},
        "results": [
            {
                "model": "dense",
                "batch_size": 2,
                "samples_per_s": 10.0,
                "speedup_vs_dense": 1.0,
                "latency_ms": 1.0,
                "latency_speedup_vs_dense": 1.0,
                "peak_mb": 1.0,
                "memory_vs_dense": 1.0,
                "gpu_clocks": {"single": c, "blocks": None},
            }
        ],
    }
    table = reporting.markdown_table(report)
    assert "dense (batch 2): 1755 MHz 650 W; n/a" in table


@pytest.mark.gpu
def test_samples_a_real_gpu_under_load():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    clocks = ClockSampler("cuda")
    if not clocks.available:
        pytest.skip(clocks.unavailable_reason)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with clocks:
        start = time.perf_counter()
        for _ in range(200):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
        end = time.perf_counter()
    busy = clocks.during([(start, end)])
    assert busy is not None and busy["samples"] >= 2
    assert 100 < busy["sm_clock_mhz"] < 5000 and 0 < busy["power_w"] < 2000
