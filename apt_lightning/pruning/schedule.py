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


@dataclass
class CubicSchedule:
    """Target sparsity gamma_t = gamma_T * (1 - (1 - (t - start) / (end - start))^3) between `start_step`
    and `end_step` (0 before, gamma_T after), applied at `num_events` evenly spaced events, the last at
    `end_step`. Each event opens a mask-decay window of `decay_steps` steps that must end before the next.
    In kept-fraction terms: kept_t = (1 - gamma_T) + gamma_T (1 - (t - start) / T)^3, the paper's form."""

    target_sparsity: float
    start_step: int
    end_step: int
    num_events: int = 10
    decay_steps: int = 0

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
        spacing = (self.end_step - self.start_step) / self.num_events
        if spacing < self.decay_steps + 1:
            raise ValueError(
                f"{self.end_step - self.start_step} pruning steps are too few for {self.num_events} events "
                f"with {self.decay_steps}-step decay windows "
                f"(need >= {self.num_events * (self.decay_steps + 1)}); "
                "lengthen the pruning phase or use fewer events / shorter windows"
            )

    def sparsity_at(self, step: int) -> float:
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.target_sparsity
        left = 1.0 - (step - self.start_step) / (self.end_step - self.start_step)
        return self.target_sparsity * (1.0 - left**3)

    def event_steps(self) -> list[int]:
        span = self.end_step - self.start_step
        return [self.start_step + round((k + 1) * span / self.num_events) for k in range(self.num_events)]

    @property
    def last_step(self) -> int:
        """The step at which the final hard masks are set."""
        return self.end_step + self.decay_steps
