"""`EfficiencyMonitor`: the training-efficiency numbers of docs/method.md section 9, for any LightningModule.

Records, over one `fit`:
- peak memory: `torch.cuda.max_memory_allocated` (reset at fit start) on a GPU; on a CPU the peak resident
  set size (Linux `VmHWM`, reset at fit start through `/proc/self/clear_refs` where the kernel allows it,
  otherwise `ru_maxrss`, the process-lifetime peak). Only this process: DataLoader workers are not counted.
- step time: from this callback's `on_train_batch_start` to its `on_train_batch_end` (forward, backward,
  optimizer step and the APT callbacks' per-step and event work; validation is never inside a step). On
  CUDA each end of the interval calls `torch.cuda.synchronize()` (`cuda_sync`, default on) so the time is
  the GPU's, not the launch queue's. The cost is one pipeline drain per step: the host can no longer queue
  step t+1's kernels while step t's tail runs, typically well under 1 ms, i.e. <~2% of a 20+ ms step.
  Without it, times measure Python launch speed and are meaningless for a GPU-bound step. `steps` counts
  training batches (micro-batches under gradient accumulation); samples/s = samples / summed step time.
- time-to-accuracy (TTA): wall seconds since `on_fit_start` at the end of the first validation whose
  `monitor` value reaches `tta_fraction` of a reference (see `tta_target`). The reference is `reference`,
  or a key of a JSON file (`reference_file`, e.g. the full fine-tuning run's `efficiency.json` and its
  `best_metric`), or, with neither, this run's own best (the FT run's TTA against itself).
- the metric history (step, wall_s, metric, at_final_structure) at every validation, and the seconds spent
  in scoring, search, compaction and rank growth, read from the `timing` dict of `AdaptivePruning` /
  `AdaptiveTuning`.
- the best metric over the validations taken at the final structure only (`events.structure_final`: once
  no callback will change the widths; every validation without pruning), its step, the steps that counted
  (`best_counted_steps`), and the final value (`final_metric`, the last validation). TTA reads every point.

At the end of fit it writes `efficiency.json` atomically into `output_dir` (default `trainer.log_dir`) and
logs the scalar numbers to every Lightning logger under `efficiency/`. Under DDP the numbers above are rank
0's (its share of each global batch); rank 0 writes the file, with every rank's peak memory, samples and step
time under `per_rank` and `global_samples_per_s` (all ranks' samples over the slowest rank's step time).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning import distributed
from apt_lightning.callbacks.events import structure_final
from apt_lightning.files import write_json_atomic
from apt_lightning.telemetry import peak_rss_mb, reset_peak_rss

_MODES = ("max", "min")
_OVERHEAD_KEYS = ("score_s", "search_s", "compact_s", "grow_s")


# ---------------------------------------------------------------------- pure helpers
def tta_target(reference: float, fraction: float = 0.97, mode: str = "max") -> float:
    """The value a metric must reach. `max` (accuracy-like): `fraction * reference`; `min` (loss-like):
    `reference / fraction`, i.e. at most (1/fraction - 1) worse than the reference."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return fraction * reference if mode == "max" else reference / fraction


def time_to_accuracy(
    history: Sequence[Mapping[str, Any]], reference: float, fraction: float = 0.97, mode: str = "max"
) -> float | None:
    """Wall seconds of the first history entry (dicts with `wall_s` and `metric`, in time order) whose
    metric reaches `tta_target(reference, fraction, mode)`; None if none does. NaN metrics never count."""
    target = tta_target(reference, fraction, mode)
    for entry in history:
        value = entry["metric"]
        if value is None or math.isnan(value):
            continue
        if (value >= target) if mode == "max" else (value <= target):
            return float(entry["wall_s"])
    return None


def counted(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The entries a best metric counts: those taken at the final structure (`at_final_structure`, recorded
    by `EfficiencyMonitor`; entries without the flag, e.g. from older files, count), with a metric."""
    return [
        e
        for e in history
        if e.get("at_final_structure", True) and e["metric"] is not None and not math.isnan(e["metric"])
    ]


def best_entry(history: Sequence[Mapping[str, Any]], mode: str = "max") -> Mapping[str, Any] | None:
    """The first entry with the best counted metric (see `counted`), or None."""
    entries = counted(history)
    if not entries:
        return None
    pick = max if mode == "max" else min
    return pick(entries, key=lambda e: e["metric"])


def best_metric(history: Sequence[Mapping[str, Any]], mode: str = "max") -> float | None:
    entry = best_entry(history, mode)
    return None if entry is None else entry["metric"]


def read_reference(path: str | Path, key: str = "best_metric") -> float:
    """A number from a JSON results file; `key` may be a dotted path into nested objects ("a.b")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference_file {path} not found (expected a JSON results file such as "
            "an earlier run's efficiency.json)"
        )
    node: Any = json.loads(path.read_text())
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"reference_file {path} has no key {key!r} (missing {part!r}; found {have})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ValueError(f"reference_file {path}: {key!r} is {node!r}, not a number")
    return float(node)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (dicts, lists, tuples searched in order)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = _batch_size(item)
            if n:
                return n
    return 0


def _does_step_work(cb: Callback) -> bool:
    """Callbacks whose event work (scoring, search, compaction, growth, snapshots) runs inside a step."""
    return isinstance(getattr(cb, "timing", None), dict) or hasattr(cb, "on_pruning_event")


# ---------------------------------------------------------------------- the callback
class EfficiencyMonitor(Callback):
    """Peak memory, step time, throughput, time-to-accuracy and pruning overhead of a fit (module docstring).

    Args:
        monitor: validation metric in `trainer.callback_metrics` that TTA follows.
        mode: "max" if higher is better, "min" otherwise.
        tta_fraction: TTA is the time to reach this fraction of the reference (paper: 0.97).
        reference: the reference value (the FT result); overrides `reference_file`.
        reference_file: JSON results file to read the reference from (e.g. an FT run's efficiency.json).
        reference_key: key (dotted path) in `reference_file`.
        output_dir: where efficiency.json goes; default `trainer.log_dir`.
        cuda_sync: synchronize CUDA around each step so step times are device time.
        log: also send the numbers to the Lightning loggers.
    """

    def __init__(
        self,
        monitor: str = "val/accuracy",
        mode: str = "max",
        tta_fraction: float = 0.97,
        reference: float | None = None,
        reference_file: str | Path | None = None,
        reference_key: str = "best_metric",
        output_dir: str | Path | None = None,
        cuda_sync: bool = True,
        log: bool = True,
    ) -> None:
        tta_target(1.0, tta_fraction, mode)  # validates mode and fraction
        if reference is not None and reference_file is not None:
            raise ValueError("give either reference or reference_file, not both")
        self.monitor, self.mode, self.tta_fraction = monitor, mode, tta_fraction
        self.reference, self.reference_file, self.reference_key = reference, reference_file, reference_key
        self.output_dir = output_dir
        self.cuda_sync = cuda_sync
        self.log_metrics = log  # not `self.log`: Lightning binds the module's log method onto callbacks
        self.step_times: list[float] = []
        self.samples = 0
        self.history: list[dict] = []
        self.tta_s: float | None = None
        self._elapsed_before = 0.0  # wall seconds of earlier fits of a resumed run
        self._t0: float | None = None
        self._batch_t0: float | None = None
        self._batch_n = 0
        self._device: torch.device | None = None
        self._memory_kind = "n/a"
        self._warned = False
        self.per_rank: list[dict] = []  # every rank's numbers, gathered at the end of fit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)  # several monitors can share a Trainer

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.reference is None and self.reference_file is not None:
            self.reference = read_reference(self.reference_file, self.reference_key)  # fail before training
        self._run_after_step_work(trainer)

    def _run_after_step_work(self, trainer: Trainer) -> None:
        """Hooks run in `trainer.callbacks` order: move this callback after the APT callbacks so the pruning
        events they run in `on_train_batch_end` fall inside the measured step, whatever the config order."""
        cbs = list(trainer.callbacks)
        if self not in cbs:
            return
        i = cbs.index(self)
        later = [j for j, cb in enumerate(cbs) if j > i and _does_step_work(cb)]
        if later:
            cbs.insert(later[-1], cbs.pop(i))
            trainer.callbacks = cbs  # a new list: the `setup` loop running now keeps iterating the old one

    def _sync(self) -> None:
        if self.cuda_sync and self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._device = pl_module.device
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
            self._memory_kind = "cuda_max_memory_allocated"
        else:
            self._memory_kind = "cpu_peak_rss_since_fit_start" if reset_peak_rss() else "cpu_peak_rss_process"
        self._t0 = time.perf_counter() - self._elapsed_before

    def wall_s(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_n = _batch_size(batch)  # before training_step, which may pop entries (labels)
        self._sync()
        self._batch_t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_t0 is None:
            return
        self._sync()
        self.step_times.append(time.perf_counter() - self._batch_t0)
        self.samples += self._batch_n
        self._batch_t0 = None

    # ------------------------------------------------------------------ validation
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned:
                rank_zero_warn(
                    f"EfficiencyMonitor: metric {self.monitor!r} not logged; available: "
                    f"{sorted(trainer.callback_metrics)}. TTA will be None."
                )
                self._warned = True
            return
        wall = self.wall_s()
        entry = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "wall_s": wall,
            "metric": float(value),
            "at_final_structure": structure_final(trainer),
        }
        self.history.append(entry)
        new_tta = self.reference is not None and self.tta_s is None
        if new_tta:
            self.tta_s = time_to_accuracy([entry], self.reference, self.tta_fraction, self.mode)
        if self.log_metrics:
            metrics = {"efficiency/wall_s": wall}
            if new_tta and self.tta_s is not None:
                metrics["efficiency/tta_s"] = self.tta_s
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ summary
    def _peak_memory_mb(self) -> float | None:
        if self._device is None:
            return None
        if self._device.type == "cuda":
            return torch.cuda.max_memory_allocated(self._device) / 2**20
        return peak_rss_mb()

    def _overhead(self, trainer: Trainer) -> dict:
        totals = dict.fromkeys(_OVERHEAD_KEYS, 0.0)
        collect = 0
        for cb in trainer.callbacks:
            timing = getattr(cb, "timing", None)
            if not isinstance(timing, dict):
                continue
            for key in _OVERHEAD_KEYS:
                totals[key] += float(timing.get(key, 0.0))
            collect += int(timing.get("collect_steps", 0))
        step_total = sum(self.step_times)
        frac = (totals["score_s"] + totals["search_s"]) / step_total if step_total > 0 else None
        return {**totals, "collect_steps": collect, "per_step_fraction": frac}

    @staticmethod
    def _structure(pl_module: LightningModule) -> dict | None:
        """Kept APT parameter count of the student (`pl_module.student`, else the module itself), if it
        has a prunable structure; hard masks that were not compacted yet count as pruned."""
        from apt_lightning.pruning.blocks import BlockTensors, kept_param_count
        from apt_lightning.structure import get_structure

        model = getattr(pl_module, "student", pl_module)
        try:
            structure = get_structure(model)
        except (ValueError, AttributeError):
            return None
        s = structure.shapes()
        heads, neurons, hidden = list(s.heads), list(s.neurons), s.hidden
        masks = structure.masks
        kept = s.counted_params()
        if masks is not None:
            keep = BlockTensors(
                [(masks.head(i) > 0).float().cpu() for i in range(masks.num_layers)],
                [(masks.neuron(i) > 0).float().cpu() for i in range(masks.num_layers)],
                (masks.hidden > 0).float().cpu(),
            )
            heads, neurons, hidden = keep.counts()
            kept = kept_param_count(keep, s)
        full = s.full().counted_params()
        return {
            "params_kept": kept,
            "params_full": full,
            "sparsity": 1.0 - kept / full if full else 0.0,
            "heads_per_layer": heads,
            "neurons_per_layer": neurons,
            "hidden": hidden,
        }

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Everything efficiency.json holds (see the module docstring for how each number is measured)."""
        steps = len(self.step_times)
        step_total = sum(self.step_times)
        best_at = best_entry(self.history, self.mode)
        best = None if best_at is None else best_at["metric"]
        last = next((e for e in reversed(self.history) if e["metric"] is not None), None)
        reference = self.reference
        source = "value" if self.reference_file is None else str(self.reference_file)
        if reference is None and best is not None:
            reference, source = best, "own_best"
        tta = self.tta_s
        if tta is None and reference is not None:
            tta = time_to_accuracy(self.history, reference, self.tta_fraction, self.mode)
        device = self._device or pl_module.device
        name = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)"
        )
        return {
            "device": str(device),
            "device_name": name,
            "peak_memory_mb": self._peak_memory_mb(),
            "memory_kind": self._memory_kind,
            "median_step_s": statistics.median(self.step_times) if steps else None,
            "samples_per_s": self.samples / step_total if step_total > 0 else None,
            "steps": steps,
            "global_step": trainer.global_step,
            "samples": self.samples,
            "train_wall_s": self.wall_s(),
            "step_time_total_s": step_total,
            "monitor": self.monitor,
            "mode": self.mode,
            "tta_fraction": self.tta_fraction,
            "tta_reference": reference,
            "tta_reference_source": source if reference is not None else None,
            "tta_target": None if reference is None else tta_target(reference, self.tta_fraction, self.mode),
            "tta_s": tta,
            "best_metric": best,
            "best_step": None if best_at is None else best_at["step"],
            "best_counted_steps": [e["step"] for e in counted(self.history)],
            "final_metric": None if last is None else last["metric"],
            "final_step": None if last is None else last["step"],
            "metric_history": self.history,
            "pruning_overhead": self._overhead(trainer),
            "structure": self._structure(pl_module),
            "cuda_sync": self.cuda_sync,
            "world_size": trainer.world_size,
            **self._across_ranks(),
        }

    def _rank_numbers(self, trainer: Trainer) -> dict:
        return {
            "rank": trainer.global_rank,
            "peak_memory_mb": self._peak_memory_mb(),
            "samples": self.samples,
            "step_time_total_s": sum(self.step_times),
        }

    def _across_ranks(self) -> dict:
        if len(self.per_rank) < 2:
            return {}
        slowest = max(r["step_time_total_s"] for r in self.per_rank)
        samples = sum(r["samples"] for r in self.per_rank)
        return {
            "per_rank": self.per_rank,
            "global_samples_per_s": samples / slowest if slowest > 0 else None,
        }

    def _write(self, trainer: Trainer, summary: dict) -> Path | None:
        folder = self.output_dir or distributed.log_dir(trainer)  # runs on rank 0 only: no broadcast
        if folder is None:
            return None
        return write_json_atomic(Path(folder) / "efficiency.json", summary)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.per_rank = distributed.gather_object(self._rank_numbers(trainer))  # every rank enters
        summary = self.summary(trainer, pl_module)
        if self.log_metrics:
            scalars = {
                f"efficiency/{k}": float(v)
                for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            scalars.update(
                {f"efficiency/{k}": float(v) for k, v in summary["pruning_overhead"].items() if v is not None}
            )
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
        if trainer.is_global_zero:
            self._write(trainer, summary)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Keep what was measured when a run is interrupted (the file says so)."""
        if not trainer.is_global_zero or self._t0 is None:
            return
        try:
            self._write(trainer, {**self.summary(trainer, pl_module), "interrupted": repr(exception)})
        except Exception:  # never mask the original error
            pass

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "step_times": self.step_times,
            "samples": self.samples,
            "history": self.history,
            "tta_s": self.tta_s,
            "elapsed_s": self.wall_s(),
            "reference": self.reference,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_times = list(state["step_times"])
        self.samples = state["samples"]
        self.history = list(state["history"])
        self.tta_s = state["tta_s"]
        self._elapsed_before = state["elapsed_s"]
        if self.reference is None:
            self.reference = state.get("reference")
