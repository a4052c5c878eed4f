"""`AdaptiveTuning`: grow the ranks of the most salient adapters (docs/method.md section 6).

Adapter salience is sum_{ij} |B_ij * dL/dB_ij| per adapter (the paper's form), read from the gradients
right before each optimizer step and EMA'd. The tuning budget grows linearly from the initial adapter
size T_0 to `budget_multiple` * T_0 over the pruning phase and is applied at the pruning events (or at
this callback's own events when no `AdaptivePruning` runs). After growth the optimizer and LR schedule
are rebuilt (`APTModule.rebuild_optimizer`): the new tensors are trained from the next step, Adam's
moments restart, the schedule continues from the current step.

The new rows of A are drawn from this callback's own generator (seeded from `seed`, by default the run's
`torch.initial_seed()`, so `seed_everything` sets it), whose state is saved in the checkpoint: a resumed run
grows the same rows as an uninterrupted one, whatever the global RNG did in between.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from apt_lightning import distributed
from apt_lightning.callbacks.events import PruningEvent, find_callback
from apt_lightning.callbacks.pruning import AdaptivePruning
from apt_lightning.files import write_json_atomic
from apt_lightning.pruning.schedule import resolve_step
from apt_lightning.tuning import AdapterInfo, RankAllocation, build_allocation, tuning_params


class AdaptiveTuning(Callback):
    """Args:
    strategy: "top_half" (paper), "uniform", "none", or a `RankAllocation` instance.
    max_rank: rank cap (for strategies given by name).
    budget_multiple: final tuning budget as a multiple of the initial adapter size (>= 1).
    ema: EMA factor for adapter salience.
    start_step / end_step / num_events: own events, used only without `AdaptivePruning`.
    seed: seed of the rank-growth generator; None takes `torch.initial_seed()` at set-up.
    """

    def __init__(
        self,
        strategy: RankAllocation | str = "top_half",
        max_rank: int = 64,
        budget_multiple: float = 4.0,
        ema: float = 0.85,
        start_step: int | float = 200,
        end_step: int | float = 0.5,
        num_events: int = 10,
        seed: int | None = None,
    ) -> None:
        if budget_multiple < 1.0:
            raise ValueError(f"budget_multiple must be >= 1 (the budget only grows), got {budget_multiple}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.strategy = build_allocation(strategy, max_rank)
        self.budget_multiple = budget_multiple
        self.ema = ema
        self.start_step, self.end_step, self.num_events = start_step, end_step, num_events
        self.own_events: list[int] | None = None
        self.next_event = 0
        self.initial_params = 0
        self.salience: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self.timing = {"grow_s": 0.0}
        self.seed = seed
        self.generator: torch.Generator | None = None  # created at set-up; its state is checkpointed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        adapters = pl_module.adapters()
        if not adapters:
            raise ValueError("AdaptiveTuning needs adapters; the model is fully fine-tuned (adapters: null)")
        low = min(m.rank for m in adapters.values())
        if self.strategy.max_rank < low:
            raise ValueError(f"max_rank {self.strategy.max_rank} is below the initial adapter rank {low}")
        if not self.initial_params:
            self.initial_params = tuning_params(self._infos(pl_module))
        if self.generator is None:
            seed = self.seed if self.seed is not None else distributed.broadcast_object(torch.initial_seed())
            self.generator = torch.Generator().manual_seed(seed)
        if find_callback(trainer, AdaptivePruning) is None:
            total = int(trainer.estimated_stepping_batches)
            start = resolve_step(self.start_step, total, "start_step")
            end = resolve_step(self.end_step, total, "end_step")
            if start >= end:
                raise ValueError(f"tuning start step ({start}) must come before the end step ({end})")
            if end - start < self.num_events:
                raise ValueError(f"{end - start} steps are too few for {self.num_events} tuning events")
            span = end - start
            self.own_events = [
                start + round((k + 1) * span / self.num_events) for k in range(self.num_events)
            ]

    def _infos(self, pl_module: LightningModule) -> list[AdapterInfo]:
        return [
            AdapterInfo(
                n, m.rank, m.in_features, m.out_features, float(self.salience.get(n, torch.zeros(())))
            )
            for n, m in pl_module.adapters().items()
        ]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        for name, module in pl_module.adapters().items():
            grad = module.lora_B.grad
            if grad is None:
                continue
            s = (module.lora_B * grad).abs().sum().float()
            prev = self.salience.get(name)
            self.salience[name] = s if prev is None else self.ema * prev + (1 - self.ema) * s

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        events = self.own_events
        if events and self.next_event < len(events) and trainer.global_step >= events[self.next_event]:
            self.grow(trainer, pl_module, (self.next_event + 1) / len(events), trainer.global_step)

    def on_pruning_event(self, trainer: Trainer, pl_module: LightningModule, event: PruningEvent) -> None:
        self.grow(trainer, pl_module, event.progress, event.step)

    def budget_at(self, progress: float) -> int:
        return int(self.initial_params * (1.0 + (self.budget_multiple - 1.0) * progress))

    def grow(self, trainer: Trainer, pl_module: LightningModule, progress: float, step: int) -> None:
        """Apply the strategy at one event: new ranks, then the optimizer learns of the new tensors."""
        t0 = time.perf_counter()
        infos = self._infos(pl_module)
        budget = self.budget_at(progress)
        ranks = distributed.from_rank_zero(self.strategy.allocate(infos, budget), "the new adapter ranks")
        if ranks:
            modules = pl_module.adapters()
            for name, rank in ranks.items():  # the allocation's order: a resumed run draws the same rows
                modules[name].grow_rank(rank, generator=self.generator)
            pl_module.rebuild_optimizer()
        self.salience.clear()
        self.next_event += 1
        self.timing["grow_s"] += time.perf_counter() - t0
        infos = self._infos(pl_module)
        total = tuning_params(infos)
        self.history.append(
            {"step": step, "budget": budget, "tuning_params": total, "ranks": {a.name: a.rank for a in infos}}
        )
        pl_module.log_dict(
            {
                "tune/params": float(total),
                "tune/budget": float(budget),
                "tune/max_rank": float(max(a.rank for a in infos)),
            }
        )
        self._log_ranks(trainer, infos, step)

    def _log_ranks(self, trainer: Trainer, infos: list[AdapterInfo], step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    "tune/ranks",
                    columns=["step", "adapter", "rank"],
                    data=[[step, a.name, a.rank] for a in infos],
                )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """`tuning.json` in the run folder: budget, tuning parameters and each adapter's rank per event."""
        log_dir = distributed.log_dir(trainer)
        if trainer.is_global_zero and log_dir is not None:
            summary = {"initial_params": self.initial_params, "events": self.history, "timing": self.timing}
            write_json_atomic(Path(log_dir) / "tuning.json", summary)

    def state_dict(self) -> dict:
        return {
            "next_event": self.next_event,
            "initial_params": self.initial_params,
            "salience": dict(self.salience),
            "history": self.history,
            "timing": self.timing,
            "growth_rng": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.next_event = state["next_event"]
        self.initial_params = state["initial_params"]
        self.salience = dict(state["salience"])
        self.history = state["history"]
        self.timing = state.get("timing", {"grow_s": 0.0})
        if state.get("growth_rng") is not None:  # older checkpoints: the generator keeps its fresh seed
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["growth_rng"])
