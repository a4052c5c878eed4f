"""`RunDashboard`: what a run's W&B page and its last lines of output say (no required arguments).

- At fit start, the run's full configuration goes into every `WandbLogger`'s run config as dotted keys
  (`pruning.target_sparsity`, `pruning.scorer`, `distillation.tau`, `optimizer.lr`, `seed`, `model.*`,
  `data.*`, ...; see `run_config.py`), so runs can be grouped and filtered by their pruning settings.
- Every `log_every_n_steps` optimizer steps (default: the trainer's), the learning rate of each parameter
  group (`optim/lr`, `optim/lr_pg<i>` for groups after the first) and the global L2 norm of the gradients
  before clipping (`optim/grad_norm`, in `on_before_optimizer_step`) go to every logger (CSV too).
- After each pruning event's decay window closes (`AdaptivePruning.history` gains its kept widths) and
  after each rank growth (`AdaptiveTuning.history`), heatmaps go to W&B as images: kept heads and kept
  FFN neurons per layer over the events (`dashboard/kept_heads`, `dashboard/kept_neurons`) and adapter
  ranks per adapter over the events (`dashboard/adapter_ranks`). At fit end the final heatmaps are written
  into `<log_dir>/dashboard/` (with or without W&B) and logged with `kept_per_layer.png`.
- At fit end: a W&B run summary (final sparsity, params kept, best and final validation metric, peak
  memory, TTA and training wall time when `EfficiencyMonitor` ran) and, on stdout, where the checkpoints,
  config.yaml, metrics.csv, pruning.json, tuning.json, efficiency.json and plots are, with the final
  sparsity and the best / final metric. The best counts only validations at the final structure
  (`apt_lightning.callbacks.selection`). Works without W&B and without any APT callback.

In `setup` the callback moves itself to the end of `trainer.callbacks`: at fit end the other callbacks have
written their files, and the image rendering after an event falls outside `EfficiencyMonitor`'s step times.
It keeps no checkpoint state: a resumed run logs the events that happen after the resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from apt_lightning import distributed
from apt_lightning.callbacks.events import find_callback, structure_final
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.callbacks.run_config import run_config
from apt_lightning.callbacks.summary import collect_files, format_summary, run_summary
from apt_lightning.callbacks.tuning import AdaptiveTuning
from apt_lightning.callbacks.wandb_logs import wandb_loggers


def short_names(names: list[str]) -> list[str]:
    """Adapter names without the dotted prefix they all share (`student.bert.encoder.layer.` ...)."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def grad_norm(pl_module: LightningModule) -> torch.Tensor | None:
    """Global L2 norm over every parameter gradient (fp32), or None when there are none."""
    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        for p in pl_module.parameters()
        if p.grad is not None
    ]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


class RunDashboard(Callback):
    """Args:
    log_every_n_steps: optimizer steps between LR / grad-norm readings; None: the trainer's setting.
    images: render and log the heatmaps to W&B at every event (final ones are written at fit end anyway).
    monitor / mode: the validation metric of the summary; None: EfficiencyMonitor's, else a monitored
        ModelCheckpoint's, else `val/<the task's primary metric>`; mode from the same place, else "min"
        for a loss and "max" otherwise.
    print_summary: print the end-of-run summary on stdout.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        images: bool = True,
        monitor: str | None = None,
        mode: str | None = None,
        print_summary: bool = True,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps}")
        if mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max', 'min' or None, got {mode!r}")
        self.log_every_n_steps = log_every_n_steps
        self.images = images
        self.monitor, self.mode = monitor, mode
        self.print_summary = print_summary
        self.config: dict[str, Any] = {}
        self.config_source = ""
        self.metric_history: list[dict] = []
        self.summary: dict[str, Any] = {}
        self.files: dict[str, Path] = {}
        self._events_seen = (0, 0)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self in trainer.callbacks and trainer.callbacks[-1] is not self:
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metric_history = []
        self._events_seen = self._event_counts(trainer)
        if not trainer.is_global_zero:
            return
        self.config, self.config_source = run_config(trainer, pl_module)
        self.config["dashboard.config_source"] = self.config_source
        for logger in wandb_loggers(trainer):
            logger.experiment.config.update(self.config, allow_val_change=True)

    # ------------------------------------------------------------------ per step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every or not trainer.loggers:
            return
        metrics = {}
        for i, group in enumerate(optimizer.param_groups):
            metrics["optim/lr" if i == 0 else f"optim/lr_pg{i}"] = float(group["lr"])
        norm = grad_norm(pl_module)
        if norm is not None:
            metrics["optim/grad_norm"] = float(norm)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        counts = self._event_counts(trainer)
        if counts == self._events_seen:
            return
        pruned, grown = counts[0] > self._events_seen[0], counts[1] > self._events_seen[1]
        self._events_seen = counts
        if self.images and trainer.is_global_zero and wandb_loggers(trainer):
            paths = self._render(trainer, pl_module, pruning=pruned, tuning=grown)
            self._log_images(trainer, paths)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val") and v.numel() == 1
        }
        if values:
            self.metric_history.append(
                {
                    "step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "at_final_structure": structure_final(trainer),
                    **values,
                }
            )

    # ------------------------------------------------------------------ heatmaps
    @staticmethod
    def _event_counts(trainer: Trainer) -> tuple[int, int]:
        pruning, tuning = find_callback(trainer, AdaptivePruning), find_callback(trainer, AdaptiveTuning)
        done = sum("heads_per_layer" in r for r in pruning.history) if pruning is not None else 0
        return done, len(tuning.history) if tuning is not None else 0

    def _folder(self, trainer: Trainer) -> Path:
        return Path(distributed.log_dir(trainer) or trainer.default_root_dir) / "dashboard"

    def _render(
        self, trainer: Trainer, pl_module: LightningModule, pruning=True, tuning=True
    ) -> dict[str, Path]:
        from apt_lightning.plots import plot_heatmap

        folder, paths = self._folder(trainer), {}
        pruner, tuner = find_callback(trainer, AdaptivePruning), find_callback(trainer, AdaptiveTuning)
        structure = getattr(pl_module, "structure", None)
        records = [r for r in pruner.history if "heads_per_layer" in r] if pruner is not None else []
        if pruning and records and structure is not None:
            shapes = structure.shapes()
            columns = ["full"] + [f"{r['event']}@{r['step']}" for r in records]
            for key, field, full, what in (
                ("kept_heads", "heads_per_layer", shapes.full_heads, "attention heads"),
                ("kept_neurons", "neurons_per_layer", shapes.full_neurons, "FFN neurons"),
            ):
                values = [[full[i]] + [r[field][i] for r in records] for i in range(len(full))]
                colors = [[v / row[0] if row[0] else 0.0 for v in row] for row in values]
                last = records[-1]["achieved_sparsity"]
                paths[key] = plot_heatmap(
                    values,
                    [f"layer {i}" for i in range(len(full))],
                    columns,
                    folder / f"{key}.png",
                    f"{what} kept per layer (sparsity {last:.3f} after event {records[-1]['event']})",
                    colors=colors,
                    color_label="fraction kept",
                    limits=(0.0, 1.0),
                    xlabel="event@step",
                )
        if tuning and tuner is not None and tuner.history:
            names = list(tuner.history[-1]["ranks"])
            values = [[e["ranks"].get(n, math.nan) for e in tuner.history] for n in names]
            paths["adapter_ranks"] = plot_heatmap(
                values,
                short_names(names),
                [f"@{e['step']}" for e in tuner.history],
                folder / "adapter_ranks.png",
                f"adapter ranks ({tuner.history[-1]['tuning_params']} tuning params)",
                color_label="rank",
                xlabel="rank growth at step",
            )
        return paths

    def _log_images(self, trainer: Trainer, paths: dict[str, Path]) -> None:
        for logger in wandb_loggers(trainer):
            for key, path in paths.items():
                logger.log_image(f"dashboard/{key}", images=[str(path)], step=trainer.global_step)

    # ------------------------------------------------------------------ the end
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return

        paths = self._render(trainer, pl_module) if self.images else {}
        kept_plot = self._kept_per_layer_plot(trainer, pl_module)
        if kept_plot is not None:
            paths["kept_per_layer"] = kept_plot
        self.summary = run_summary(self, trainer, pl_module)
        self.files = collect_files(trainer, paths)
        loggers = wandb_loggers(trainer)
        if loggers:
            self._log_images(trainer, paths)
            record = {
                k: v for k, v in self.summary.items() if v is not None and not isinstance(v, (list, dict))
            }
            record.update({f"files/{k}": str(v) for k, v in self.files.items()})
            for logger in loggers:
                logger.experiment.summary.update(record)
        if self.print_summary:
            print(format_summary(self.summary, self.files, loggers))

    def _kept_per_layer_plot(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """`kept_per_layer.png` from AdaptivePruning (plot=True), else drawn here from its last event."""
        pruner = find_callback(trainer, AdaptivePruning)
        records = [r for r in pruner.history if "heads_per_layer" in r] if pruner is not None else []
        log_dir = distributed.log_dir(trainer)
        if not records or log_dir is None:
            return None
        path = Path(log_dir) / "kept_per_layer.png"
        if path.is_file():
            return path
        from apt_lightning.plots import plot_kept_per_layer

        path = self._folder(trainer) / "kept_per_layer.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_kept_per_layer(records[-1], pl_module.structure.shapes(), path)
        return path
