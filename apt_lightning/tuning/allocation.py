"""Rank allocation strategies for adaptive tuning (docs/method.md section 6).

A strategy gets every adapter's rank, size and salience plus a budget of tuning parameters and returns
the new ranks. Costs: an adapter of rank r on an (out x in) Linear has r * (in + out) parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdapterInfo:
    name: str
    rank: int
    in_features: int
    out_features: int
    salience: float

    @property
    def cost_per_rank(self) -> int:
        return self.in_features + self.out_features


def tuning_params(adapters: list[AdapterInfo], ranks: dict[str, int] | None = None) -> int:
    ranks = ranks or {}
    return sum(ranks.get(a.name, a.rank) * a.cost_per_rank for a in adapters)


class RankAllocation:
    """Base class: return {adapter name: new rank} (only adapters that change)."""

    name = "custom"

    def __init__(self, max_rank: int = 64) -> None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.max_rank = max_rank

    def allocate(self, adapters: list[AdapterInfo], budget: int) -> dict[str, int]:
        raise NotImplementedError

    def _scaled(self, adapters: list[AdapterInfo], chosen: list[AdapterInfo], budget: int) -> dict[str, int]:
        """Largest shared growth rate for `chosen` (ranks floor(r * rate), capped) within `budget`."""

        def ranks_at(rate: float) -> dict[str, int]:
            return {a.name: max(a.rank, min(self.max_rank, math.floor(a.rank * rate))) for a in chosen}

        lo, hi = 1.0, float(self.max_rank)
        if tuning_params(adapters, ranks_at(hi)) <= budget:
            return ranks_at(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tuning_params(adapters, ranks_at(mid)) <= budget else (lo, mid)
        return ranks_at(lo)


class TopHalfAllocation(RankAllocation):
    """The paper's allocation: grow the most salient half of the adapters (among those below `max_rank`)
    by one shared rate, then hand what is left of the budget out one rank at a time in salience order,
    so the total meets the budget up to less than one rank of one adapter whenever no cap binds."""

    name = "top_half"

    def allocate(self, adapters: list[AdapterInfo], budget: int) -> dict[str, int]:
        growable = sorted((a for a in adapters if a.rank < self.max_rank), key=lambda a: -a.salience)
        chosen = growable[: max(1, len(growable) // 2)] if growable else []
        if not chosen or tuning_params(adapters) >= budget:
            return {}
        ranks = self._scaled(adapters, chosen, budget)
        progress = True
        while progress:
            progress = False
            for a in chosen:
                if (
                    ranks[a.name] < self.max_rank
                    and tuning_params(adapters, ranks) + a.cost_per_rank <= budget
                ):
                    ranks[a.name] += 1
                    progress = True
        return {n: r for n, r in ranks.items() if r != next(a.rank for a in adapters if a.name == n)}


class UniformAllocation(RankAllocation):
    """Every adapter grows by the same factor (the paper's 'without salience' allocation)."""

    name = "uniform"

    def allocate(self, adapters: list[AdapterInfo], budget: int) -> dict[str, int]:
        if tuning_params(adapters) >= budget:
            return {}
        ranks = self._scaled(adapters, adapters, budget)
        return {a.name: ranks[a.name] for a in adapters if ranks[a.name] != a.rank}


class StaticAllocation(RankAllocation):
    """Ranks never change (the 'without adaptive tuning' ablation)."""

    name = "none"

    def allocate(self, adapters: list[AdapterInfo], budget: int) -> dict[str, int]:
        return {}


STRATEGIES = {cls.name: cls for cls in (TopHalfAllocation, UniformAllocation, StaticAllocation)}


def build_allocation(strategy: RankAllocation | str, max_rank: int = 64) -> RankAllocation:
    if isinstance(strategy, RankAllocation):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown rank allocation strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](max_rank=max_rank)
