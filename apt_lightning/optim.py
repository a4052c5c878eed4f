"""Learning-rate schedule that survives optimizer rebuilds.

APT rebuilds the optimizer whenever shapes change (compaction, rank growth). The schedule is a pure
function of the *global* step, so a scheduler built at step `start_step` continues the original curve
over the remaining steps instead of restarting it (the authors' code loses its scheduler here).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupLinearLR(LambdaLR):
    """Linear warm-up over `warmup_ratio` of `total_steps`, then linear decay to 0, times `scale`.

    `start_step` is the global step at which this scheduler (and its optimizer) was built; it is saved
    in the scheduler's state dict, so a resumed run continues from the right point of the curve.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_ratio: float = 0.06,
        total_steps: int = 1,
        start_step: int = 0,
        scale: float = 1.0,
    ) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_ratio = warmup_ratio
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.scale = scale
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        t = self.start_step + step
        warmup = int(self.warmup_ratio * self.total_steps)
        if t < warmup:
            return self.scale * (t + 1) / warmup
        return self.scale * max(0.0, (self.total_steps - t) / max(1, self.total_steps - warmup))
