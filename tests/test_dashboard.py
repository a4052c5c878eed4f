"""RunDashboard: W&B run config, summary and heatmaps; LR and grad-norm curves; the end-of-run summary."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from helpers_apt import make_module, quiet_trainer, repeated_batch_loader
from lightning.pytorch.loggers import CSVLogger

from apt_lightning.callbacks import (
    AdaptivePruning,
    AdaptiveTuning,
    EfficiencyMonitor,
    RunDashboard,
    SelfDistillation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path: Path, loggers, callbacks, max_steps: int = 12) -> L.Trainer:
    return quiet_trainer(
        max_steps=max_steps,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        log_every_n_steps=2,
        val_check_interval=6,
        limit_val_batches=1,
    )


def _printed_paths(text: str) -> list[Path]:
    return [Path(m) for m in re.findall(r"^  .{22} (/\S+)$", text, flags=re.M)]


def _offline_run(run_dir: Path) -> tuple[dict, dict]:
    """(config, summary) of an offline W&B run: `files/config.yaml` and `files/wandb-summary.json` where this
    wandb version writes them, else read from the run's transaction log (`run-<id>.wandb`: a LevelDB-style
    log of protobuf records, which wandb-core offline runs keep until `wandb sync`)."""
    files = run_dir / "files"
    if (files / "config.yaml").is_file() and (files / "wandb-summary.json").is_file():
        config = yaml.safe_load((files / "config.yaml").read_text())
        config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
        return config, json.loads((files / "wandb-summary.json").read_text())
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    config, summary, pos, pending = {}, {}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            kind_name = record.WhichOneof("record_type")
            items = {"config": record.config.update, "run": record.run.config.update}.get(kind_name, [])
            for item in items:
                config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.update if kind_name == "summary" else []:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config, summary


def _csv_columns(logger: CSVLogger) -> set[str]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return set(next(csv.reader(f)))


def test_apt_fit_with_wandb_offline(backbone, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    if wandb.run is not None:  # a run an earlier test left open (disabled mode) would be reused by the logger
        wandb.finish()
    L.seed_everything(7)
    model = make_module(backbone)
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="apt-test")
    pruning = AdaptivePruning(target_sparsity=0.5, start_step=2, end_step=8, num_events=3, decay_steps=1)
    tuning = AdaptiveTuning(max_rank=16)
    callbacks = [RunDashboard(), pruning, tuning, SelfDistillation(tau=3.0), EfficiencyMonitor()]
    trainer = _trainer(tmp_path, [csv_logger, wandb_logger], callbacks)
    try:
        trainer.fit(model, repeated_batch_loader(12), repeated_batch_loader(1))
    finally:
        wandb.finish()
    assert trainer.callbacks[-1] is callbacks[0]  # moved itself last

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    value, summary = _offline_run(run_dir)
    deadline = time.monotonic() + 30
    while "final_sparsity" not in summary and time.monotonic() < deadline:  # wandb-core flushes after finish
        time.sleep(0.5)
        value, summary = _offline_run(run_dir)
    assert value["pruning.target_sparsity"] == 0.5
    assert value["pruning.scorer"] == "salience"
    assert value["pruning.num_events"] == 3
    assert value["tuning.strategy"] == "top_half" and value["tuning.strategy_args.max_rank"] == 16
    assert value["distillation.tau"] == 3.0
    assert value["efficiency.monitor"] == "val/accuracy"
    assert value["optimizer.name"] == "AdamW" and value["optimizer.lr"] == pytest.approx(2e-4)
    assert value["optimizer.weight_decay"] == pytest.approx(0.1)
    assert value["seed"] == 7
    assert value["model.backbone"] == str(backbone) and value["trainer.max_steps"] == 12

    assert summary["final_sparsity"] == pytest.approx(pruning.history[-1]["achieved_sparsity"], abs=1e-6)
    assert summary["final_sparsity"] > 0.3
    assert summary["monitor"] == "val/accuracy"
    assert 0.0 <= summary["best_metric"] <= 1.0 and 0.0 <= summary["final_metric"] <= 1.0
    assert summary["peak_memory_mb"] > 0 and "tta_s" in summary

    images = [p.name for p in (run_dir / "files" / "media" / "images").rglob("*.png")]
    for key in ("kept_heads", "kept_neurons", "adapter_ranks", "kept_per_layer"):
        assert any(name.startswith(key) for name in images), (key, images)
    # one image per completed pruning event / rank growth, plus the final ones
    assert sum(name.startswith("kept_heads") for name in images) >= 3

    columns = _csv_columns(csv_logger)
    assert {"optim/lr", "optim/grad_norm"} <= columns

    out = capsys.readouterr().out
    assert "apt-fit: run summary" in out and "final sparsity" in out and "val/accuracy" in out
    printed = _printed_paths(out)
    assert all(p.exists() for p in printed), printed  # files; the W&B run folder
    names = {p.name for p in printed}
    assert {"pruning.json", "tuning.json", "efficiency.json", "kept_per_layer.png", "metrics.csv"} <= names
    assert any(p.suffix == ".ckpt" for p in printed)
    assert {"kept_heads.png", "kept_neurons.png", "adapter_ranks.png"} <= names


def test_plain_fit_without_wandb_or_apt_callbacks(backbone, tmp_path, capsys):
    L.seed_everything(0)
    model = make_module(backbone)
    csv_logger = CSVLogger(tmp_path, name="csv")
    dashboard = RunDashboard(log_every_n_steps=3)
    trainer = _trainer(tmp_path, [csv_logger], [dashboard], max_steps=6)
    trainer.fit(model, repeated_batch_loader(6), repeated_batch_loader(1))
    assert {"optim/lr", "optim/grad_norm"} <= _csv_columns(csv_logger)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("optim/grad_norm")]
    assert steps == [0, 3]  # every 3 optimizer steps
    assert dashboard.config["seed"] == 0 and dashboard.config["optimizer.lr"] == pytest.approx(2e-4)
    assert dashboard.config["dashboard.log_every_n_steps"] == 3
    assert dashboard.summary["final_sparsity"] == 0.0  # nothing pruned
    out = capsys.readouterr().out
    printed = _printed_paths(out)
    assert printed and all(p.is_file() for p in printed)
    assert any(p.suffix == ".ckpt" for p in printed) and any(p.name == "metrics.csv" for p in printed)
    assert "val/accuracy" in out and "pruning.json" not in out
    assert "6 optimizer steps, 1 epoch(s) completed" in out  # 6 batches, max_steps 6


def test_config_reads_callback_arguments_back():
    from apt_lightning.callbacks.run_config import flatten, init_args, section_name

    class Hidden(L.Callback):  # an argument stored under another name is left out, not guessed
        def __init__(self, alpha: float = 1.0, beta: int = 2) -> None:
            self.alpha, self._beta_value = alpha, beta

    assert init_args(Hidden(0.5)) == {"alpha": 0.5}
    hidden = Hidden()
    hidden.alpha = hidden.on_fit_start  # as Lightning does to `callback.log`: a method is not an argument
    assert init_args(hidden) == {}
    assert section_name(Hidden()) == "hidden"
    assert section_name(SelfDistillation()) == "distillation"
    flat = flatten(init_args(AdaptivePruning(target_sparsity=0.3, scorer="magnitude")), "pruning")
    assert flat["pruning.target_sparsity"] == 0.3 and flat["pruning.scorer"] == "magnitude"
    assert flatten({"a": {"b": [1, 2]}, "p": Path("/x")}) == {"a.b": [1, 2], "p": "/x"}
