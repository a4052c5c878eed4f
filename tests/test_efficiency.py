"""EfficiencyMonitor: TTA from synthetic histories, and the efficiency.json of tiny CPU runs."""

import csv
import json
import math
import time

import pytest
import torch
from helpers_apt import quiet_trainer
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from apt_lightning.callbacks.efficiency import (
    EfficiencyMonitor,
    best_metric,
    read_reference,
    time_to_accuracy,
    tta_target,
)

FIELDS = {
    "device",
    "peak_memory_mb",
    "median_step_s",
    "samples_per_s",
    "steps",
    "train_wall_s",
    "tta_s",
    "tta_reference",
    "best_metric",
    "monitor",
    "metric_history",
    "pruning_overhead",
    "structure",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: extra threads only contend


def _hist(*pairs):
    return [{"step": i, "wall_s": w, "metric": m} for i, (w, m) in enumerate(pairs)]


# ---------------------------------------------------------------------- pure TTA
def test_tta_max_mode_first_crossing():
    history = _hist((10.0, 0.50), (20.0, 0.80), (30.0, 0.874), (40.0, 0.90), (50.0, 0.70))
    assert time_to_accuracy(history, reference=0.90, fraction=0.97) == 30.0  # target 0.873: 0.874 at 30 s
    assert time_to_accuracy(history, reference=0.90, fraction=1.0) == 40.0
    assert tta_target(0.90, 0.97) == pytest.approx(0.873)


def test_tta_exact_threshold_and_fraction_one():
    history = _hist((1.0, 0.5), (2.0, 0.75), (3.0, 0.95))
    assert time_to_accuracy(history, 1.0, 0.75) == 2.0  # reaching the target exactly counts
    assert time_to_accuracy(history, 0.95, 1.0) == 3.0


def test_tta_never_reached_nan_and_empty():
    history = _hist((1.0, float("nan")), (2.0, 0.5))
    assert time_to_accuracy(history, 0.9) is None
    assert time_to_accuracy([], 0.9) is None
    assert time_to_accuracy(_hist((1.0, float("nan")), (2.0, 0.99)), 0.9) == 2.0


def test_tta_min_mode():
    history = _hist((5.0, 1.0), (6.0, 0.52), (7.0, 0.40))
    # loss-like: target = 0.5 / 0.97 = 0.5155 -> first value <= target is 0.40 at 7 s
    assert time_to_accuracy(history, 0.5, 0.97, mode="min") == 7.0
    assert best_metric(history, "min") == 0.40
    assert best_metric(history, "max") == 1.0


@pytest.mark.parametrize("kw", [{"mode": "best"}, {"fraction": 0.0}, {"fraction": 1.5}])
def test_tta_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        time_to_accuracy(_hist((1.0, 1.0)), 1.0, **kw)


def test_read_reference(tmp_path):
    path = tmp_path / "ft.json"
    path.write_text(json.dumps({"best_metric": 0.91, "nested": {"acc": 0.8}, "word": "x"}))
    assert read_reference(path) == 0.91
    assert read_reference(path, "nested.acc") == 0.8
    with pytest.raises(KeyError, match="best_metric_x"):
        read_reference(path, "best_metric_x")
    with pytest.raises(ValueError, match="not a number"):
        read_reference(path, "word")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_reference(tmp_path / "missing.json")


def test_monitor_rejects_both_references():
    with pytest.raises(ValueError, match="either"):
        EfficiencyMonitor(reference=0.9, reference_file="x.json")
    with pytest.raises(ValueError, match="mode"):
        EfficiencyMonitor(mode="maximum")


# ---------------------------------------------------------------------- a tiny fit, no APT
class _Toy(LightningModule):
    """Linear classifier on a linearly separable problem: accuracy rises within a few epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)
        self.correct = self.total = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.correct += int((self.net(x).argmax(-1) == y).sum())
        self.total += len(y)

    def on_validation_epoch_end(self):
        self.log("val/accuracy", self.correct / max(self.total, 1))
        self.correct = self.total = 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(n=64, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class _FakePruner(Callback):
    """Stands in for AdaptivePruning: a `timing` dict and 'event' work inside on_train_batch_end."""

    def __init__(self) -> None:
        self.timing = {"score_s": 0.0, "search_s": 0.0, "compact_s": 0.0, "collect_steps": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            t0 = time.perf_counter()
            time.sleep(0.05)
            self.timing["search_s"] += time.perf_counter() - t0
            self.timing["score_s"] += 0.01


def _fit(tmp_path, monitor, extra=(), epochs=3):
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[monitor, *extra],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(_Toy(), _loader(), _loader(seed=1))
    return trainer


def test_monitor_writes_every_field(tmp_path):
    monitor = EfficiencyMonitor(reference=0.8)
    pruner = _FakePruner()
    trainer = _fit(tmp_path, monitor, [pruner])
    # the monitor moved itself after the callback that does event work inside a step
    assert trainer.callbacks.index(monitor) > trainer.callbacks.index(pruner)
    out = json.loads((tmp_path / "run" / "version_0" / "efficiency.json").read_text())
    assert FIELDS <= set(out)
    assert out["device"] == "cpu"
    assert out["steps"] == 24 and out["global_step"] == 24 and out["samples"] == 192
    assert out["peak_memory_mb"] > 10  # a Python process with torch loaded
    assert out["memory_kind"].startswith("cpu_peak_rss")
    assert out["median_step_s"] > 0
    assert out["step_time_total_s"] >= 0.05  # the 50 ms event step is inside the measured steps
    assert out["samples_per_s"] == pytest.approx(out["samples"] / out["step_time_total_s"])
    assert out["train_wall_s"] >= out["step_time_total_s"]
    history = out["metric_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # sanity-check validation is not recorded
    assert [h["step"] for h in history] == [8, 16, 24]
    assert all(0 <= h["metric"] <= 1 for h in history)
    walls = [h["wall_s"] for h in history]
    assert walls == sorted(set(walls))  # one entry per validation, in the order they ran
    assert out["best_metric"] == max(h["metric"] for h in history)
    assert out["tta_reference"] == 0.8 and out["tta_reference_source"] == "value"
    assert out["tta_s"] == time_to_accuracy(history, 0.8)
    assert out["tta_s"] is not None and out["tta_s"] <= out["train_wall_s"]
    overhead = out["pruning_overhead"]
    assert set(overhead) >= {"score_s", "search_s", "compact_s", "grow_s", "per_step_fraction"}
    assert overhead["search_s"] >= 0.05 and overhead["grow_s"] == 0.0
    frac = (overhead["score_s"] + overhead["search_s"]) / out["step_time_total_s"]
    assert overhead["per_step_fraction"] == pytest.approx(frac) and 0 < frac < 1
    assert out["structure"] is None  # a plain module has no prunable structure
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"efficiency/tta_s", "efficiency/median_step_s", "efficiency/peak_memory_mb"} <= set(header)


def test_monitor_with_log_false_logs_no_metrics(tmp_path):
    """`log=False` keeps efficiency numbers out of the loggers (efficiency.json is still written)."""
    _fit(tmp_path, EfficiencyMonitor(reference=0.8, log=False), epochs=1)
    assert (tmp_path / "run" / "version_0" / "efficiency.json").is_file()
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert not [h for h in header if h.startswith("efficiency/")]


def test_monitor_without_reference_uses_own_best_and_output_dir(tmp_path):
    monitor = EfficiencyMonitor(output_dir=tmp_path / "eff", tta_fraction=1.0)
    _fit(tmp_path, monitor, epochs=2)
    out = json.loads((tmp_path / "eff" / "efficiency.json").read_text())
    assert out["tta_reference_source"] == "own_best"
    assert out["tta_reference"] == out["best_metric"]
    first_best = next(h for h in out["metric_history"] if h["metric"] == out["best_metric"])
    assert out["tta_s"] == first_best["wall_s"]
    assert not list((tmp_path / "eff").glob("*.tmp"))


def test_monitor_reference_file_and_unreachable(tmp_path):
    ref = tmp_path / "ft_efficiency.json"
    ref.write_text(json.dumps({"best_metric": 5.0}))  # accuracy can never reach 0.97 * 5
    monitor = EfficiencyMonitor(reference_file=ref, output_dir=tmp_path)
    _fit(tmp_path, monitor, epochs=1)
    out = json.loads((tmp_path / "efficiency.json").read_text())
    assert out["tta_reference"] == 5.0 and out["tta_reference_source"] == str(ref)
    assert out["tta_s"] is None


def test_monitor_missing_metric_warns_and_keeps_going(tmp_path):
    monitor = EfficiencyMonitor(monitor="val/f1", reference=0.5, output_dir=tmp_path)
    with pytest.warns(UserWarning, match="val/f1"):
        _fit(tmp_path, monitor, epochs=1)
    out = json.loads((tmp_path / "efficiency.json").read_text())
    assert out["metric_history"] == [] and out["tta_s"] is None and out["best_metric"] is None
    assert out["steps"] == 8


def test_monitor_state_round_trip():
    a = EfficiencyMonitor(reference=0.9)
    a.step_times, a.samples, a.history, a.tta_s = [0.1, 0.2], 16, _hist((3.0, 0.95)), 3.0
    b = EfficiencyMonitor()
    b.load_state_dict(a.state_dict())
    assert (b.step_times, b.samples, b.history, b.tta_s, b.reference) == ([0.1, 0.2], 16, a.history, 3.0, 0.9)


# ---------------------------------------------------------------------- with APT callbacks on a tiny backbone
def test_monitor_with_apt_pruning(tmp_path, tiny_backbone_dir):
    from apt_lightning import APTModule
    from apt_lightning.callbacks import AdaptivePruning, AdaptiveTuning

    torch.manual_seed(0)
    n, length = 48, 12
    ids = torch.randint(5, 1000, (n, length))
    data = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": torch.tensor(int(ids[i, 0] % 2)),
        }
        for i in range(n)
    ]
    module = APTModule(backbone=str(tiny_backbone_dir), task="sst2")
    pruning = AdaptivePruning(
        target_sparsity=0.5, start_step=2, end_step=10, num_events=2, decay_steps=1, plot=False
    )
    monitor = EfficiencyMonitor(reference=0.5, output_dir=tmp_path)
    trainer = quiet_trainer(
        max_epochs=2,
        limit_val_batches=None,
        default_root_dir=tmp_path,
        callbacks=[monitor, pruning, AdaptiveTuning(start_step=2, end_step=10, num_events=2)],
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data[:16], batch_size=8))
    out = json.loads((tmp_path / "efficiency.json").read_text())
    assert out["steps"] == 12 and out["samples"] == 96
    assert len(out["metric_history"]) == 2
    s = out["structure"]
    assert s is not None and s["params_full"] > s["params_kept"] > 0
    assert math.isclose(s["sparsity"], pruning.history[-1]["achieved_sparsity"])
    assert s["sparsity"] >= 0.5
    o = out["pruning_overhead"]
    assert o["score_s"] > 0 and o["search_s"] > 0 and o["compact_s"] > 0 and o["collect_steps"] > 0
    assert 0 < o["per_step_fraction"] < 1
