"""The end-of-run numbers and files of `RunDashboard`: what the W&B run summary holds and stdout prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import distributed
from apt_lightning.callbacks.efficiency import EfficiencyMonitor
from apt_lightning.callbacks.events import find_callback
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.tuning import AdaptiveTuning

_NOT_METRICS = ("step", "epoch", "at_final_structure")  # the keys of a metric_history entry besides metrics


def resolve_monitor(dashboard, trainer: Trainer, pl_module: LightningModule) -> tuple[str | None, str]:
    """The summary's validation metric and its mode (see `RunDashboard`'s arguments)."""
    monitor, mode = dashboard.monitor, dashboard.mode
    if monitor is None:
        efficiency = find_callback(trainer, EfficiencyMonitor)
        checkpoint = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        task = getattr(pl_module, "task", None)
        recorded = [k for entry in dashboard.metric_history for k in entry if k not in _NOT_METRICS]
        if efficiency is not None:
            monitor, mode = efficiency.monitor, mode or efficiency.mode
        elif checkpoint is not None:
            monitor, mode = checkpoint.monitor, mode or checkpoint.mode
        elif getattr(task, "primary_metric", None):
            monitor = f"val/{task.primary_metric}"
        elif recorded:
            monitor = next((k for k in recorded if "loss" not in k), recorded[0])
    if mode is None:
        mode = "min" if monitor and "loss" in monitor else "max"
    return monitor, mode


def run_summary(dashboard, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Final sparsity, best / final metric, peak memory, TTA (when EfficiencyMonitor ran). The best counts
    only validations at the final structure (`apt_lightning.callbacks.selection`); the final is the last."""
    epochs = trainer.fit_loop.epoch_progress.current.completed
    out: dict[str, Any] = {"global_step": trainer.global_step, "epochs": epochs}
    structure = EfficiencyMonitor._structure(pl_module)  # None without a prunable structure
    pruner = find_callback(trainer, AdaptivePruning)
    done = [r for r in pruner.history if "achieved_sparsity" in r] if pruner is not None else []
    if structure is not None:
        out.update(
            final_sparsity=structure["sparsity"],
            params_kept=structure["params_kept"],
            params_full=structure["params_full"],
        )
    elif done:
        out.update(final_sparsity=done[-1]["achieved_sparsity"], params_kept=done[-1]["params_kept"])
    if pruner is not None:
        out["target_sparsity"] = pruner.target_sparsity
        out["pruning_events"] = len(done)
    tuner = find_callback(trainer, AdaptiveTuning)
    if tuner is not None and tuner.history:
        out["tuning_params"] = tuner.history[-1]["tuning_params"]
        out["max_adapter_rank"] = max(tuner.history[-1]["ranks"].values(), default=None)
    monitor, mode = resolve_monitor(dashboard, trainer, pl_module)
    out["monitor"], out["mode"] = monitor, mode
    values = [
        (e["step"], e[monitor], e.get("at_final_structure", True))
        for e in dashboard.metric_history
        if monitor in e and not math.isnan(e[monitor])
    ]
    if values:
        out.update(final_metric=values[-1][1], final_step=values[-1][0])
        counted = [(step, value) for step, value, final in values if final]
        out["counted_points"], out["validation_points"] = len(counted), len(values)
        if counted:  # only validations at the final structure (apt_lightning.callbacks.selection)
            pick = max if mode == "max" else min
            out["best_step"], out["best_metric"] = pick(counted, key=lambda v: v[1])
            out["first_counted_step"] = counted[0][0]
    efficiency = find_callback(trainer, EfficiencyMonitor)
    if efficiency is not None:
        numbers = efficiency.summary(trainer, pl_module)
        for key in ("peak_memory_mb", "memory_kind", "tta_s", "tta_target", "train_wall_s", "samples_per_s"):
            out[key] = numbers.get(key)
    else:
        out.update(_peak_memory(pl_module))
    return out


def _peak_memory(pl_module: LightningModule) -> dict[str, Any]:
    from apt_lightning.telemetry import peak_rss_mb

    device = pl_module.device
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory_kind": "cuda_process",
        }
    return {"peak_memory_mb": peak_rss_mb(), "memory_kind": "cpu_peak_rss_process"}


def collect_files(trainer: Trainer, plots: dict[str, Path]) -> dict[str, Path]:
    """Every file of the run that exists: checkpoints, config, metrics, the APT callbacks' JSON, plots."""
    files: dict[str, Path] = {}
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        kind = "periodic_checkpoint" if type(cb).__name__ == "PeriodicCheckpoint" else "checkpoint"
        if kind in files:
            kind = f"{kind}_{len([k for k in files if k.startswith(kind)])}"
        best = cb.best_model_path
        if best:
            files[f"best_{kind}" if cb.monitor else kind] = Path(best)
        if cb.last_model_path and cb.last_model_path != best:
            files[f"last_{kind}"] = Path(cb.last_model_path)
    log_dir = distributed.log_dir(trainer)  # rank 0 only: Trainer.log_dir's broadcast would hang DDP
    log_dir = Path(log_dir) if log_dir is not None else None
    if log_dir is not None:
        saver = next((cb for cb in trainer.callbacks if type(cb).__name__ == "SaveConfigCallback"), None)
        files["config"] = log_dir / getattr(saver, "config_filename", "config.yaml")
        for name in ("pruning.json", "tuning.json"):
            files[name.split(".")[0]] = log_dir / name
    for logger in trainer.loggers:
        path = getattr(logger, "experiment", None)
        metrics_file = getattr(path, "metrics_file_path", None)
        if isinstance(metrics_file, str):
            files.setdefault("metrics", Path(metrics_file))
    efficiency = find_callback(trainer, EfficiencyMonitor)
    if efficiency is not None and (efficiency.output_dir or log_dir) is not None:
        files["efficiency"] = Path(efficiency.output_dir or log_dir) / "efficiency.json"
    files.update(plots)
    return {k: v.resolve() for k, v in files.items() if v.is_file()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_summary(summary: dict[str, Any], files: dict[str, Path], wandb_loggers: list) -> str:
    """The end-of-run summary printed after `fit`: one `label  value` line each."""
    lines = ["apt-fit: run summary"]

    def line(label: str, text: str) -> None:
        lines.append(f"  {label:<22} {text}")

    line("steps", f"{summary['global_step']} optimizer steps, {summary['epochs']} epoch(s) completed")
    if summary.get("final_sparsity") is not None:
        text = f"{summary['final_sparsity']:.4f}"
        if summary.get("params_kept") is not None and summary.get("params_full"):
            text += f" ({summary['params_kept']} of {summary['params_full']} counted params kept)"
        if summary.get("target_sparsity") is not None:
            text += f"; target {summary['target_sparsity']:.4g}"
        line("final sparsity", text)
    monitor = summary.get("monitor")
    if summary.get("final_metric") is not None:
        final = f"final {_fmt(summary['final_metric'])} (step {summary['final_step']})"
        counted, total = summary["counted_points"], summary["validation_points"]
        if summary.get("best_metric") is None:
            text = f"{final}; no validation at the final structure, so no best"
        else:
            text = f"best {_fmt(summary['best_metric'])} (step {summary['best_step']}), {final}"
            if counted < total:
                text += (
                    f"; best over the {counted} of {total} validations at the final structure "
                    f"(from step {summary['first_counted_step']})"
                )
        line(f"{monitor}", text)
    elif monitor:
        line(f"{monitor}", "not logged (no validation ran)")
    if summary.get("tuning_params") is not None:
        line("tuning params", f"{summary['tuning_params']} (max adapter rank {summary['max_adapter_rank']})")
    if summary.get("peak_memory_mb") is not None:
        line("peak memory", f"{summary['peak_memory_mb']:.1f} MB ({summary.get('memory_kind')})")
    if summary.get("tta_s") is not None:
        line("time to accuracy", f"{summary['tta_s']:.1f} s (target {_fmt(summary.get('tta_target'))})")
    if summary.get("train_wall_s") is not None:
        line("training wall time", f"{summary['train_wall_s']:.1f} s")
    for key, path in files.items():
        line(key.replace("_", " "), str(path))
    for logger in wandb_loggers:
        run = logger.experiment
        where = getattr(run, "url", None) or getattr(run, "dir", None)
        if where:
            line("W&B run", str(where))
    return "\n".join(lines)
