"""Adaptive tuning (issue 5): rank growth, allocation strategies and budgets, the Lightning path, resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers_apt import (
    CountSteps,
    SaveAt,
    make_module,
    quiet_trainer,
    repeated_batch_loader,
    synthetic_batch,
)
from lightning import Callback

from apt_lightning import APTModule
from apt_lightning.callbacks import AdaptivePruning, AdaptiveTuning
from apt_lightning.tuning import (
    AdapterInfo,
    RankAllocation,
    StaticAllocation,
    TopHalfAllocation,
    UniformAllocation,
    build_allocation,
    tuning_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sgd_free_adamw(params):
    """AdamW without weight decay: a tensor only moves when it has a gradient."""
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def logits(model: APTModule, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def ranks_of(model: APTModule) -> dict[str, int]:
    return {n: m.rank for n, m in model.adapters().items()}


# ---------------------------------------------------------------------------------------------- growth
def test_growth_leaves_output_unchanged(backbone):
    model = make_module(backbone).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.adapters().values():  # trained adapters: B != 0, so the adapters matter
        m.lora_B.data = 0.05 * torch.randn(m.lora_B.shape, generator=g)
    batch = synthetic_batch()
    before = logits(model, batch)
    tuning = AdaptiveTuning(budget_multiple=3.0)
    tuning.initial_params = tuning_params(tuning._infos(model))
    tuning.salience = {name: torch.tensor(float(i)) for i, name in enumerate(model.adapters())}
    old = ranks_of(model)
    tuning.grow(SimpleNamespace(loggers=[]), model, progress=1.0, step=0)
    new = ranks_of(model)
    grown = [n for n in new if new[n] > old[n]]
    assert grown and all(new[n] >= old[n] for n in new)
    torch.testing.assert_close(logits(model, batch), before)
    for name in grown:  # new A rows random, new B columns zero
        m = model.adapters()[name]
        assert float(m.lora_A[old[name] :].abs().sum()) > 0
        assert float(m.lora_B[:, old[name] :].abs().sum()) == 0
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
    # the growth is real: once the new B columns move, the output moves
    m = model.adapters()[grown[0]]
    m.lora_B.data[:, old[grown[0]] :] = 0.5
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)


class GrowthProbe(Callback):
    """Put after AdaptiveTuning: at each growth, checks the optimizer holds exactly the current trainable
    tensors, snapshots the new A rows, and records their gradients on later steps."""

    def __init__(self) -> None:
        self.ranks: dict[str, int] = {}
        self.grown: dict[str, tuple[int, int, torch.Tensor]] = {}  # name -> (old rank, new rank, new rows)
        self.grad: dict[str, float] = {}
        self.checks: list[dict] = []
        self.tuning: AdaptiveTuning | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.tuning = next(cb for cb in trainer.callbacks if isinstance(cb, AdaptiveTuning))
        self.ranks = ranks_of(pl_module)
        self.events = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.tuning.history) == self.events:
            return
        self.events = len(self.tuning.history)
        now = ranks_of(pl_module)
        for name, rank in now.items():
            old = self.ranks.get(name, rank)
            if rank > old:
                rows = pl_module.adapters()[name].lora_A[old:rank].detach().clone()
                self.grown[name] = (old, rank, rows)
        optimizer = trainer.optimizers[0]
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.checks.append(
            {
                "step": trainer.global_step,
                "exact": in_opt == {id(p) for p in pl_module.trainable_parameters()},
                "adapters_in": all(
                    id(m.lora_A) in in_opt and id(m.lora_B) in in_opt for m in pl_module.adapters().values()
                ),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer,
            }
        )
        self.ranks = now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, (old, new, _) in self.grown.items():
            module = pl_module.adapters().get(name)
            if module is not None and module.lora_A.grad is not None:
                g = float(module.lora_A.grad[old:new].abs().sum())
                self.grad[name] = max(self.grad.get(name, 0.0), g)


@pytest.mark.parametrize("with_pruning", [False, True])
def test_grown_rows_train_through_lightning(backbone, tmp_path, with_pruning):
    model = make_module(backbone, optimizer=sgd_free_adamw)
    tuning = AdaptiveTuning(budget_multiple=2.0, start_step=2, end_step=6, num_events=2)
    callbacks = [tuning]
    if with_pruning:  # growth then happens at the pruning events (steps 4 and 6), before each search
        callbacks.insert(
            0,
            AdaptivePruning(
                target_sparsity=0.3, start_step=2, end_step=6, num_events=2, decay_steps=0, plot=False
            ),
        )
    probe = GrowthProbe()
    trainer = quiet_trainer(max_steps=10, callbacks=[*callbacks, probe], default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=repeated_batch_loader(10))
    assert [h["step"] for h in tuning.history] == [4, 6]
    assert len(probe.checks) == 2
    assert all(c["exact"] and c["adapters_in"] and c["scheduler"] for c in probe.checks), probe.checks
    alive = {n: m for n, m in model.adapters().items() if n in probe.grown}
    assert alive, "no adapter grew"
    for name, module in alive.items():
        old, new, rows = probe.grown[name]
        assert probe.grad.get(name, 0.0) > 0, f"new rows of {name} never got a gradient"
        now = module.lora_A[old:new].detach()
        if now.shape == rows.shape:  # (pruning may have removed input columns since)
            assert not torch.allclose(now, rows), f"new rows of {name} did not change"
    final = ranks_of(model)
    assert max(final.values()) > 8
    assert tuning.history[-1]["tuning_params"] <= tuning.history[-1]["budget"]


def test_none_strategy_keeps_ranks_and_optimizer(backbone, tmp_path):
    model = make_module(backbone)
    tuning = AdaptiveTuning(strategy="none", start_step=2, end_step=6, num_events=2)

    class OptimizerIds(Callback):
        def __init__(self) -> None:
            self.ids: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ids.append(id(trainer.optimizers[0]))

    probe = OptimizerIds()
    trainer = quiet_trainer(max_steps=8, callbacks=[tuning, probe], default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=repeated_batch_loader(8))
    assert len(tuning.history) == 2
    assert set(ranks_of(model).values()) == {8}
    assert len(set(probe.ids)) == 1  # never rebuilt
    assert StaticAllocation().allocate([AdapterInfo("a", 8, 32, 32, 1.0)], 10**9) == {}


# ---------------------------------------------------------------------------------------------- budgets
def random_adapters(seed: int, n: int, same_rank: bool = True) -> list[AdapterInfo]:
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    return [
        AdapterInfo(
            f"a{i}",
            8 if same_rank else [4, 8, 16][randint(0, 2)],
            randint(16, 160),
            randint(16, 160),
            float(torch.rand((), generator=g)),
        )
        for i in range(n)
    ]


def top_half(adapters, max_rank):
    growable = sorted((a for a in adapters if a.rank < max_rank), key=lambda a: -a.salience)
    return growable[: max(1, len(growable) // 2)]


@pytest.mark.parametrize("seed", range(6))
def test_top_half_meets_budget_when_no_cap_binds(seed):
    adapters = random_adapters(seed, n=4 + seed)
    t0 = tuning_params(adapters)
    budget = int(t0 * (1.2 + 0.5 * seed))
    ranks = TopHalfAllocation(max_rank=10_000).allocate(adapters, budget)
    total = tuning_params(adapters, ranks)
    assert total <= budget
    chosen = top_half(adapters, 10_000)
    assert set(ranks) <= {a.name for a in chosen}  # only the most salient half grows
    assert all(ranks[a.name] > a.rank for a in adapters if a.name in ranks)
    for a in chosen:  # maximal: one more rank on any chosen adapter would exceed the budget
        assert total + a.cost_per_rank > budget, (a, total, budget)


@pytest.mark.parametrize("max_rank", [9, 12, 20])
@pytest.mark.parametrize("seed", range(3))
def test_top_half_never_exceeds_budget_or_cap(seed, max_rank):
    adapters = random_adapters(50 + seed, n=6, same_rank=False)
    t0 = tuning_params(adapters)
    for multiple in (0.5, 1.0, 1.5, 4.0, 50.0):
        budget = int(t0 * multiple)
        ranks = TopHalfAllocation(max_rank=max_rank).allocate(adapters, budget)
        total = tuning_params(adapters, ranks)
        assert total <= max(budget, t0)  # never above the budget (below T_0 nothing changes)
        if budget <= t0:
            assert ranks == {}
        assert all(r <= max_rank for r in ranks.values())
        for a in top_half(adapters, max_rank):
            r = ranks.get(a.name, a.rank)
            assert r == max_rank or total + a.cost_per_rank > budget


def test_top_half_skips_adapters_at_the_cap():
    adapters = [
        AdapterInfo("capped", 16, 32, 32, 100.0),
        AdapterInfo("b", 8, 32, 32, 2.0),
        AdapterInfo("c", 8, 32, 32, 1.0),
    ]
    ranks = TopHalfAllocation(max_rank=16).allocate(adapters, 10**9)
    assert ranks == {"b": 16}  # growable: b, c; top half of them: b; capped stays


@pytest.mark.parametrize("seed", range(4))
def test_uniform_grows_every_adapter_by_one_factor(seed):
    adapters = random_adapters(seed, n=5)
    t0 = tuning_params(adapters)
    budget = int(t0 * (1.5 + seed))
    ranks = UniformAllocation(max_rank=10_000).allocate(adapters, budget)
    new = [ranks.get(a.name, a.rank) for a in adapters]
    assert len(set(new)) == 1 and new[0] > 8  # all rank 8 before: one shared new rank
    total = tuning_params(adapters, ranks)
    assert total <= budget
    assert tuning_params(adapters, {a.name: new[0] + 1 for a in adapters}) > budget  # the largest such factor


@pytest.mark.parametrize("seed", range(3))
def test_uniform_factor_with_mixed_ranks(seed):
    adapters = random_adapters(10 + seed, n=6, same_rank=False)
    budget = int(tuning_params(adapters) * 2.5)
    ranks = UniformAllocation(max_rank=10_000).allocate(adapters, budget)
    assert tuning_params(adapters, ranks) <= budget
    new = {a.name: ranks.get(a.name, a.rank) for a in adapters}
    # one rate for all: new = floor(r * rate)  <=>  max(new / r) <= rate < min((new + 1) / r)
    lo = max(new[a.name] / a.rank for a in adapters)
    hi = min((new[a.name] + 1) / a.rank for a in adapters)
    assert lo < hi and lo > 1.0


def test_none_and_builder():
    assert isinstance(build_allocation("top_half"), TopHalfAllocation)
    assert isinstance(build_allocation("uniform", 32), UniformAllocation)
    assert build_allocation("uniform", 32).max_rank == 32
    assert isinstance(build_allocation("none"), StaticAllocation)
    mine = UniformAllocation(max_rank=16)
    assert build_allocation(mine) is mine


# ---------------------------------------------------------------------------------------------- resume
class RanksAtStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.ranks = ranks_of(pl_module)
        self.step = trainer.global_step


def test_resume_after_growth_restores_ranks(backbone, tmp_path):
    def run(ckpt_path=None, save_steps=()):
        model = make_module(backbone)
        tuning = AdaptiveTuning(budget_multiple=3.0, start_step=1, end_step=5, num_events=2)
        saver, start = SaveAt(tmp_path, list(save_steps)), RanksAtStart()
        trainer = quiet_trainer(max_steps=8, callbacks=[tuning, saver, start], default_root_dir=tmp_path)
        trainer.fit(
            model, train_dataloaders=repeated_batch_loader(8), ckpt_path=ckpt_path, weights_only=False
        )  # see test_pruning.py::test_resume_with_default_weights_only
        return model, tuning, saver, start, trainer

    ref, ref_tuning, saver, _, _ = run(save_steps=[4])  # growth at steps 3 and 5
    grown_at_4 = ref_tuning.history[0]["ranks"]
    assert max(grown_at_4.values()) > 8
    model, tuning, _, start, trainer = run(ckpt_path=saver.paths[4])
    assert start.step == 4 and start.ranks == grown_at_4  # ranks restored before training resumed
    assert trainer.global_step == 8  # and it trained on, through one more growth, without a shape error
    assert [h["step"] for h in tuning.history] == [3, 5]
    assert tuning.history[0] == ref_tuning.history[0]
    assert tuning.initial_params == ref_tuning.initial_params
    assert tuning_params(tuning._infos(model)) <= tuning.history[-1]["budget"]
    for module in model.adapters().values():
        assert module.lora_A.shape[0] == module.lora_B.shape[1] == module.rank
        assert torch.isfinite(module.lora_B).all()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget_multiple": 0.5}, "budget_multiple"),
        ({"strategy": "bogus"}, "unknown rank allocation strategy 'bogus'"),
        ({"max_rank": 0}, "max_rank"),
        ({"ema": 1.0}, "ema"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTuning(**kwargs)


@pytest.mark.parametrize(
    "kwargs,module_kw,match",
    [
        ({"max_rank": 4}, {}, "max_rank 4 is below the initial adapter rank 8"),
        ({"start_step": 6, "end_step": 3}, {}, "must come before"),
        ({"start_step": 2, "end_step": 4, "num_events": 5}, {}, "too few"),
        ({}, {"adapters": None}, "needs adapters"),
    ],
)
def test_bad_setup_fails_before_training(backbone, tmp_path, kwargs, module_kw, match):
    model = make_module(backbone, **module_kw)
    counter = CountSteps()
    trainer = quiet_trainer(
        max_steps=8, callbacks=[AdaptiveTuning(**kwargs), counter], default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train_dataloaders=repeated_batch_loader(8))
    assert counter.batches == 0 and trainer.global_step == 0


def test_custom_allocation_base_class():
    with pytest.raises(NotImplementedError):
        RankAllocation().allocate([], 0)
