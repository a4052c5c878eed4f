"""The cubic sparsity schedule over discrete pruning events (docs/method.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass


def resolve_step(value: int | float, total_steps: int, what: str) -> int:
    """An int is a step; a float in (0, 1] is a fraction of the run's optimizer steps (1.0: the last step)."""
    if isinstance(value, float) and (0.0 < value <= 1.0 or not value.is_integer()):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{what} as a fraction of training must be in (0, 1], got {value}")
        return int(round(value * total_steps))
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


MASK_DECAY = ("after", "before")


@dataclass
class CubicSchedule:
    """Target sparsity gamma_t = gamma_T * (1 - (1 - (t - w) / (end - w))^3) between w = `start_step` +
    `warmup_steps` and `end_step` (0 before, gamma_T after), applied at `num_events` events evenly spaced
    after `start_step`, the last at `end_step`; events inside the warm-up hold full density. In kept-fraction
    terms: kept_t = (1 - gamma_T) + gamma_T (1 - (t - w) / T)^3, the paper's form.

    Each event has a mask-decay window of `decay_steps` steps that must not reach the previous or the next
    event: with `mask_decay` "after" it opens at the event (one search, then masks move towards it), with
    "before" it ends at the event (a search every step, masks set hard at the event)."""

    target_sparsity: float
    start_step: int
    end_step: int
    num_events: int = 10
    decay_steps: int = 0
    warmup_steps: int = 0
    mask_decay: str = "after"

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.num_events < 1:
            raise ValueError(f"num_events must be >= 1, got {self.num_events}")
        if self.start_step >= self.end_step:
            raise ValueError(
                f"pruning start step ({self.start_step}) must come before the end step ({self.end_step})"
            )
        if self.decay_steps < 0:
            raise ValueError(f"decay_steps must be >= 0, got {self.decay_steps}")
        if self.mask_decay not in MASK_DECAY:
            raise ValueError(f"mask_decay must be one of {', '.join(MASK_DECAY)}, got {self.mask_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.start_step + self.warmup_steps >= self.end_step:
            raise ValueError(
                f"the sparsity warm-up ({self.warmup_steps} steps from start step {self.start_step}) must "
                f"end before the end step ({self.end_step}); shorten warmup_steps or prune until later"
            )
        spacing = (self.end_step - self.start_step) / self.num_events
        if spacing < self.decay_steps + 1:
            raise ValueError(
                f"{self.end_step - self.start_step} pruning steps are too few for {self.num_events} events "
                f"with {self.decay_steps}-step decay windows "
                f"(need >= {self.num_events * (self.decay_steps + 1)}); "
                "lengthen the pruning phase or use fewer events / shorter windows"
            )

    @property
    def ramp_start(self) -> int:
        """The step the cubic ramp starts from: the end of the sparsity warm-up."""
        return self.start_step + self.warmup_steps

    def sparsity_at(self, step: int) -> float:
        if step <= self.ramp_start:
            return 0.0
        if step >= self.end_step:
            return self.target_sparsity
        left = 1.0 - (step - self.ramp_start) / (self.end_step - self.ramp_start)
        return self.target_sparsity * (1.0 - left**3)

    def event_steps(self) -> list[int]:
        span = self.end_step - self.start_step
        return [self.start_step + round((k + 1) * span / self.num_events) for k in range(self.num_events)]

    def window(self, event: int) -> tuple[int, int]:
        """(the step event `event`'s window opens, the step its masks are set hard)."""
        step = self.event_steps()[event]
        if self.mask_decay == "before":
            return step - self.decay_steps, step
        return step, step + self.decay_steps

    @property
    def last_step(self) -> int:
        """The step at which the final hard masks are set."""
        return self.window(self.num_events - 1)[1]
