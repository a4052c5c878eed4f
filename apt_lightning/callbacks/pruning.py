"""`AdaptivePruning`: the decisions of APT's structured pruning (docs/method.md sections 4-5).

When, what and how much: salience collection during the pruning phase, the cubic schedule of events,
the block search, mask-decay windows, compaction. The mechanics (masks, slicing) live in
`apt_lightning.structure`; this callback only calls them.

Two ways to change how blocks are scored: pass another `scorer` (any `Scorer` subclass, also by
`class_path` in YAML), or subclass this callback and override `compute_scores`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning import distributed
from apt_lightning.callbacks.events import PruningEvent, broadcast
from apt_lightning.callbacks.wandb_logs import log_kept_table, log_score_histograms
from apt_lightning.files import write_json_atomic
from apt_lightning.pruning import (
    BlockTensors,
    CubicSchedule,
    Scorer,
    build_scorer,
    kept_kv_groups,
    kept_param_count,
    select_blocks,
)
from apt_lightning.pruning.schedule import MASK_DECAY, resolve_step

_COMPACT_AT = ("event", "end", "never")
_AFTER_ALPHA = 0.01  # the default mask step of `mask_decay="after"` (the paper's alpha)


class AdaptivePruning(Callback):
    """Prune heads, FFN neurons and hidden dims of the student to `target_sparsity` of its APT parameter
    count (`ModelShapes.counted_params`: the attention and FFN weight matrices, at the family's costs).

    Args:
        target_sparsity: final fraction of counted parameters removed, in [0, 1).
        start_step / end_step: the pruning phase, as optimizer steps (int) or fractions of the run (float).
        num_events: pruning events, evenly spaced, the last at `end_step`.
        warmup_steps: sparsity warm-up after `start_step` (steps, or a fraction of the run as a float):
            events inside it hold full density, and the cubic ramp runs from its end to `end_step`
            (docs/method.md section 5). 0: the ramp starts at `start_step`.
        mask_decay: where each event's `decay_steps`-step window lies. "after": one search at the event,
            then masks move by `decay_alpha` per step towards its 0/1 decisions, then are set hard.
            "before" (the authors' code): during the window ending at the event the search is re-run
            every step on the current scores, kept blocks move to min(1, m + alpha) and pruned ones to
            max(0, m - alpha), so a block dropped early can be re-selected while its mask is above 0; at
            the event a last search sets the masks hard. A block whose mask reaches 0 inside the window
            scores 0 from then on (`Scorer.scores` zeroes masked blocks; salience would see only zeroed
            activations) and stays pruned: with the default alpha only a block pruned in every search
            gets there, at the window's last step; a larger `decay_alpha` gets there after ceil(1 / alpha)
            more steps down than up, and the drop is final.
        decay_alpha: mask step per window step; None: 0.01 with "after" (the paper's value), 1 /
            `decay_steps` with "before" (masks can just reach 0 by the event).
        scorer: a `Scorer` or a registered name (salience, random, uniform, magnitude).
        multiple_of: round kept hidden size and per-layer FFN and attention widths to a multiple (hardware
            alignment; attention widths move in whole heads, so x128 with d_h 64 keeps heads in pairs).
        even_kv_groups: with grouped-query attention, keep the same number of query heads in every
            key/value group a layer keeps (the export then runs plain GQA instead of gathering keys and
            values per query head, which slows decoding); the freed budget goes to FFN neurons. No effect
            on models without GQA.
        compact_at: when pruned blocks are removed physically: "event" compacts the blocks masked by one
            event at the start of the next (before listeners such as the teacher snapshot act) and after
            the last event's window; "end" only after the last window; "never" keeps masks only. Compacting
            at the next event rather than right after a window keeps a self-distillation teacher one event
            wider than the student: the teacher runs with masks off at the physical width, so compacting
            earlier would prune the teacher as far as the student and leave nothing to distil.
        plot: write a PNG of kept heads / neurons per layer at the end of training.
    """

    def __init__(
        self,
        target_sparsity: float = 0.6,
        start_step: int | float = 200,
        end_step: int | float = 0.5,
        num_events: int = 10,
        decay_steps: int = 10,
        decay_alpha: float | None = None,
        scorer: Scorer | str = "salience",
        multiple_of: int = 1,
        even_kv_groups: bool = False,
        compact_at: str = "event",
        plot: bool = True,
        mask_decay: str = "after",
        warmup_steps: int | float = 0,
    ) -> None:
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if compact_at not in _COMPACT_AT:
            raise ValueError(f"compact_at must be one of {_COMPACT_AT}, got {compact_at!r}")
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        if decay_alpha is not None and not 0.0 < decay_alpha <= 1.0:
            raise ValueError(f"decay_alpha must be in (0, 1] (or null for the default), got {decay_alpha}")
        if mask_decay not in MASK_DECAY:
            raise ValueError(f"mask_decay must be one of {', '.join(MASK_DECAY)}, got {mask_decay!r}")
        self.target_sparsity = target_sparsity
        self.start_step, self.end_step, self.warmup_steps = start_step, end_step, warmup_steps
        self.num_events, self.decay_steps, self.decay_alpha = num_events, decay_steps, decay_alpha
        self.mask_decay = mask_decay
        self.scorer = build_scorer(scorer)
        self.multiple_of = multiple_of
        self.even_kv_groups = even_kv_groups
        self.compact_at = compact_at
        self.plot = plot
        self.schedule: CubicSchedule | None = None
        self.next_event = 0
        self.targets: BlockTensors | None = None  # "after": where masks are heading during a window
        self.window_from: BlockTensors | None = None  # "after": mask values when the window opened
        self.window_masks: BlockTensors | None = None  # "before": mask values now, during a window
        self.window_min: BlockTensors | None = None  # "before": the lowest each mask went in the window
        self.window_start: int | None = None
        self.window_end: int | None = None
        self._last_step = -1
        self.full_count = 0
        self.history: list[dict] = []
        self.timing = {"score_s": 0.0, "search_s": 0.0, "compact_s": 0.0, "collect_steps": 0}

    @property
    def alpha(self) -> float:
        """The mask step per window step (`decay_alpha`, or the mode's default)."""
        if self.decay_alpha is not None:
            return self.decay_alpha
        return 1.0 / max(self.decay_steps, 1) if self.mask_decay == "before" else _AFTER_ALPHA

    # ------------------------------------------------------------------ set-up
    def _build_schedule(self, start: int, end: int, warmup: int) -> CubicSchedule:
        return CubicSchedule(
            self.target_sparsity, start, end, self.num_events, self.decay_steps, warmup, self.mask_decay
        )

    def plan_schedule(self, total_steps: int) -> CubicSchedule:
        """The event schedule of a run of `total_steps` optimizer steps; a ValueError naming the setting to
        change when the pruning phase does not fit (checked before any training, and by the suite tests)."""
        start = resolve_step(self.start_step, total_steps, "start_step")
        end = resolve_step(self.end_step, total_steps, "end_step")
        schedule = self._build_schedule(
            start, end, resolve_step(self.warmup_steps, total_steps, "warmup_steps")
        )
        if schedule.last_step > total_steps:
            after = f" + {self.decay_steps} decay steps" if self.mask_decay == "after" else ""
            raise ValueError(
                f"pruning ends at step {schedule.last_step} (end_step {end}{after}) "
                f"but training has only {total_steps} optimizer steps; lower end_step or train longer"
            )
        return schedule

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.schedule = self.plan_schedule(int(trainer.estimated_stepping_batches))
        distributed.find_unused_parameters(trainer, "a layer with all heads or neurons masked is skipped")
        structure = pl_module.structure
        structure.install_masks()
        self.scorer.attach(structure)
        full = structure.shapes()
        self.full_count = full.full().counted_params()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        masks = pl_module.structure.masks
        if masks is not None:
            masks.observer = None

    @property
    def pruning_done(self) -> bool:
        """The last event's window has closed (masks hard at the target): the widths will not change any
        more. With `mask_decay="before"` the last event is announced when its window opens, so an open
        window (`window_masks`) is not done either."""
        return (
            self.schedule is not None
            and self.next_event >= self.num_events
            and self.targets is None
            and self.window_masks is None
        )

    # ------------------------------------------------------------------ per step
    def _collecting(self, step: int) -> bool:
        s = self.schedule
        return self.scorer.observes_batches and s.start_step <= step < s.end_step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        pl_module.structure.masks.observer = self.scorer if self._collecting(trainer.global_step) else None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if pl_module.structure.masks.observer is not None:
            t0 = time.perf_counter()
            self.scorer.step()
            self.timing["score_s"] += time.perf_counter() - t0
            self.timing["collect_steps"] += 1

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps completed
        if step == self._last_step:  # another micro-batch of the same optimizer step (gradient accumulation)
            return
        self._last_step = step
        if self.targets is not None:
            self._decay(trainer, pl_module, step)
        elif self.window_masks is not None:
            self._reselect(trainer, pl_module, step)
        if self.next_event < self.num_events and self.targets is None and self.window_masks is None:
            if step >= self.schedule.window(self.next_event)[0]:
                self._event(trainer, pl_module, step)

    # ------------------------------------------------------------------ events
    def compute_scores(self, trainer: Trainer, pl_module: LightningModule) -> BlockTensors:
        """Block scores for this event (with `mask_decay="before"`: for every step of its window). Override
        to score differently (the second extension path)."""
        return self.scorer.scores(pl_module.structure)

    def _search(self, trainer: Trainer, pl_module: LightningModule, sparsity: float):
        """Scores and the keep decision at `sparsity`; the seconds each took go to `timing` and the event's
        record."""
        t0 = time.perf_counter()
        scores = self.compute_scores(trainer, pl_module)
        t1 = time.perf_counter()
        budget = int((1.0 - sparsity) * self.full_count)
        keep = select_blocks(
            scores, pl_module.structure.shapes(), budget, self.multiple_of, self.even_kv_groups
        )
        event = self.history[-1]["event"]
        keep = distributed.from_rank_zero(keep, f"the blocks kept at pruning event {event}")
        t2 = time.perf_counter()
        self.timing["score_s"] += t1 - t0
        self.timing["search_s"] += t2 - t1
        record = self.history[-1]
        record["score_s"] += t1 - t0
        record["search_s"] += t2 - t1
        return scores, keep

    def _event(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Open the next event's window: compaction, listeners, then the first search and mask step."""
        if self.compact_at == "event":
            self.compact_now(pl_module)
        before = self.mask_decay == "before"
        if before:
            self.window_start, self.window_end = self.schedule.window(self.next_event)
        else:
            self.window_start, self.window_end = step, step + self.decay_steps
        sparsity = self.schedule.sparsity_at(self.window_end if before else step)
        event = PruningEvent(self.next_event, self.num_events, step, sparsity)
        broadcast(trainer, pl_module, event)
        self.next_event += 1
        record = {
            "event": event.index,
            "step": self.window_end if before else step,  # the search whose decisions become hard masks
            "target_sparsity": sparsity,
            "score_s": 0.0,
            "search_s": 0.0,
        }
        if before:
            record.update({"window_start": step, "searches": 0})
        self.history.append(record)
        current = BlockTensors.from_masks(pl_module.structure.masks)
        if before:
            self.window_masks, self.window_min = current, current.map(torch.clone)
            self._reselect(trainer, pl_module, step)
            return
        scores, self.targets = self._search(trainer, pl_module, sparsity)
        self.window_from = current
        log_score_histograms(trainer, scores, step)
        self._decay(trainer, pl_module, step)
        self._check_ranks(pl_module, f"pruning event {event.index} (step {step})")

    @torch.no_grad()
    def _reselect(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """One step of a window before an event (`mask_decay="before"`): search again on the current scores
        at the event's sparsity and move every mask by alpha towards that decision; at the event the last
        search's decisions become the hard masks."""
        record = self.history[-1]
        scores, keep = self._search(trainer, pl_module, self.schedule.sparsity_at(self.window_end))
        record["searches"] += 1
        if step >= self.window_end:
            kept = keep.flat() > 0
            record["reselected"] = int((kept & (self.window_min.flat() < 1)).sum())
            keep.to_masks(pl_module.structure.masks)
            self.window_masks = self.window_min = None
            log_score_histograms(trainer, scores, step)
            self._finish_event(trainer, pl_module, keep)
            return
        a = self.alpha
        self.window_masks = keep.combine(
            self.window_masks, lambda k, m: torch.where(k > 0, (m + a).clamp(max=1), (m - a).clamp(min=0))
        )
        self.window_min = self.window_min.combine(self.window_masks, torch.minimum)
        self.window_masks.to_masks(pl_module.structure.masks)

    @torch.no_grad()
    def _decay(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Masks k steps into a window are their values at the event moved k * alpha towards the
        targets (clamped to [0, 1]); at the window's end they are set hard. Computed on the CPU, so a
        window step costs small host-to-device copies and no device sync."""
        masks, keep, start = pl_module.structure.masks, self.targets, self.window_from
        hard = step >= self.window_end
        moved = self.alpha * (step - self.window_start + 1)

        def move(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if hard:
                return target
            return torch.where(target > 0, (current + moved).clamp(max=1), (current - moved).clamp(min=0))

        for i in range(masks.num_layers):
            masks.set("head", move(start.heads[i], keep.heads[i]), i)
            masks.set("neuron", move(start.neurons[i], keep.neurons[i]), i)
        masks.set("hidden", move(start.hidden, keep.hidden))
        if hard:
            self.targets = self.window_from = None
            self._finish_event(trainer, pl_module, keep)

    def _finish_event(self, trainer: Trainer, pl_module: LightningModule, keep: BlockTensors) -> None:
        # counted before compaction: `keep` has the widths of the model the search saw
        shapes = pl_module.structure.shapes()
        kept_count = kept_param_count(keep, shapes)
        kv_groups = kept_kv_groups(keep, shapes)
        if self.compact_at != "never" and self.next_event >= self.num_events:
            self.compact_now(pl_module)
        heads, neurons, hidden = keep.counts()
        record = self.history[-1]
        record.update(
            {
                "achieved_sparsity": 1.0 - kept_count / self.full_count,
                "params_kept": kept_count,
                "heads_per_layer": heads,
                "neurons_per_layer": neurons,
                "hidden_kept": hidden,
            }
        )
        if kv_groups:  # grouped-query attention: query heads kept per key/value group
            record["kv_groups_per_layer"] = kv_groups
        pl_module.log_dict(
            {
                "prune/target_sparsity": record["target_sparsity"],
                "prune/achieved_sparsity": record["achieved_sparsity"],
                "prune/params_kept": float(kept_count),
                "prune/hidden_kept": float(hidden),
                "prune/heads_kept": float(sum(heads)),
                "prune/neurons_kept": float(sum(neurons)),
                "prune/score_s": self.timing["score_s"],
                "prune/search_s": self.timing["search_s"],
            }
        )
        log_kept_table(trainer, record)
        self._check_ranks(pl_module, f"the end of pruning event {record['event']}'s window")

    def _check_ranks(self, pl_module: LightningModule, where: str) -> None:
        """Under DDP: masks, widths, ranks, weights, teacher and salience equal on every rank."""
        distributed.check_consistency(pl_module, where, scorer=self.scorer.state_dict())

    def compact_now(self, pl_module: LightningModule) -> None:
        """Remove the blocks whose hard masks are 0 (if any); scorer statistics and optimizer follow. Called
        at the times `compact_at` names, and by a callback that decides compaction itself
        (`SelfDistillation(schedule="authors")` with `compact_at="never"`). Masks must be hard: inside a
        mask-decay window a fractional mask has no keep decision yet (`compact` refuses them)."""
        masks = pl_module.structure.masks
        if masks.is_hard() and all(masks.head_full) and all(masks.neuron_full) and masks.hidden_full:
            return
        kept = BlockTensors(
            [masks.kept("head", i).cpu() for i in range(masks.num_layers)],
            [masks.kept("neuron", i).cpu() for i in range(masks.num_layers)],
            masks.kept("hidden").cpu(),
        )
        t0 = time.perf_counter()
        pl_module.compact()
        self.scorer.compact(kept)
        pl_module.rebuild_optimizer()
        self.timing["compact_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        return {"events": self.history, "timing": dict(self.timing), "full_param_count": self.full_count}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir
        if not trainer.is_global_zero or log_dir is None:
            return
        out = Path(log_dir)
        write_json_atomic(out / "pruning.json", self.summary())
        if self.plot and self.history:
            from apt_lightning.plots import plot_kept_per_layer

            shapes = pl_module.structure.shapes()
            plot_kept_per_layer(self.history[-1], shapes, out / "kept_per_layer.png")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        def blocks(b: BlockTensors | None) -> dict | None:
            return None if b is None else {"heads": b.heads, "neurons": b.neurons, "hidden": b.hidden}

        return {
            "next_event": self.next_event,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "full_count": self.full_count,
            "targets": blocks(self.targets),
            "window_from": blocks(self.window_from),
            "window_masks": blocks(self.window_masks),
            "window_min": blocks(self.window_min),
            "scorer": self.scorer.state_dict(),
            "history": self.history,
            "timing": self.timing,
            "schedule": self._schedule_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        def blocks(d: dict | None) -> BlockTensors | None:
            return None if d is None else BlockTensors(d["heads"], d["neurons"], d["hidden"])

        if "schedule" in state:  # older checkpoints did not record it
            self._check_schedule(state["schedule"], state["next_event"], state["history"])
        self.next_event = state["next_event"]
        self.window_start, self.window_end = state["window_start"], state["window_end"]
        self.full_count = state["full_count"]
        self.targets, self.window_from = blocks(state["targets"]), blocks(state["window_from"])
        self.window_masks = blocks(state.get("window_masks"))  # older checkpoints: "after" windows only
        self.window_min = blocks(state.get("window_min"))
        self.scorer.load_state_dict(state["scorer"])
        self.history = state["history"]
        self.timing = state["timing"]

    # ------------------------------------------------------------------ schedule changes on resume
    _SCHEDULE_ARGS = (
        "target_sparsity",
        "start_step",
        "end_step",
        "num_events",
        "decay_steps",
        "decay_alpha",
        "warmup_steps",
        "mask_decay",
    )
    _SCHEDULE_DEFAULTS = {"warmup_steps": 0, "mask_decay": "after"}  # what checkpoints without them ran
    # decay_alpha was an argument before checkpoints recorded it: one without it is not checked for it

    def _schedule_state(self) -> dict:
        """The schedule as configured (steps possibly fractions) and as resolved for this run."""
        state = {k: getattr(self, k) for k in self._SCHEDULE_ARGS}
        if self.schedule is not None:
            state["resolved"] = [self.schedule.start_step, self.schedule.end_step]
            state["resolved_warmup"] = self.schedule.warmup_steps
        return state

    def _check_schedule(self, saved: dict, next_event: int, history: list[dict]) -> None:
        """A resumed run keeps the schedule it was saved with.

        The schedule arguments must equal the saved ones: the events already taken were chosen for that
        schedule, so a change would be a jump in sparsity (target_sparsity, num_events, warmup_steps), leave
        a decay window unfinished (end_step before the saved step, decay_steps, mask_decay) or moving at
        another pace (decay_alpha), or re-time decided events. Anything else is refused here, before
        training resumes. Only the run length may change: steps given as
        fractions then keep the steps they resolved to when the run started (a warning says so)."""
        if self.schedule is None:  # not set up for fitting
            return
        saved = {**self._SCHEDULE_DEFAULTS, **saved}
        names = [k for k in self._SCHEDULE_ARGS if k in saved]
        changed = [(k, saved[k], getattr(self, k)) for k in names if saved[k] != getattr(self, k)]
        if changed:
            done = f"{next_event} of {saved['num_events']} events taken"
            if history:
                last = history[-1]
                done += f", the last at step {last['step']} (target sparsity {last['target_sparsity']:.4g})"
            diff = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} configured" for k, old, new in changed)
            keep = ", ".join(f"{k}: {saved[k]!r}" for k in names)
            raise ValueError(
                f"AdaptivePruning: the checkpoint's pruning schedule differs from this run's ({diff}). "
                f"The checkpoint has {done}; those decisions were made for the saved schedule, and changing "
                "it on resume would apply a new target as a jump at the next event or leave a decay window "
                f"unfinished. Resume with the saved values ({keep}); only the run length (max_epochs / "
                "max_steps) may change, and the pruning steps then stay where they were. To prune to "
                "another schedule, start a new run."
            )
        resolved = saved.get("resolved")
        current = [self.schedule.start_step, self.schedule.end_step]
        warmup = saved.get("resolved_warmup", self.schedule.warmup_steps)
        if resolved is not None and (list(resolved) != current or warmup != self.schedule.warmup_steps):
            rank_zero_warn(
                f"AdaptivePruning: the run length changed since the checkpoint, so start_step "
                f"{self.start_step!r} / end_step {self.end_step!r} / warmup_steps {self.warmup_steps!r} "
                f"would now resolve to steps {current} / {self.schedule.warmup_steps}; the resumed run keeps "
                f"the saved pruning steps {list(resolved)} / {warmup}"
            )
            self.schedule = self._build_schedule(resolved[0], resolved[1], warmup)
