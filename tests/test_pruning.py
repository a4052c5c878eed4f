"""Adaptive pruning (issue 4): salience, schedule, block search, scorers, the callback, resume, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import GLUE_DIR, REPO, bert_count, bert_shapes
from helpers_apt import (
    CountingScorer,
    CountSteps,
    SaveAt,
    make_module,
    quiet_trainer,
    repeated_batch_loader,
    synthetic_batch,
)
from lightning import Callback

from apt_lightning import APTModule
from apt_lightning.adapters import AdapterConfig
from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.pruning import (
    BlockTensors,
    CubicSchedule,
    MagnitudeScorer,
    OutlierAwareSalience,
    RandomScorer,
    UniformScorer,
    build_scorer,
    kept_param_count,
    select_blocks,
)
from apt_lightning.pruning.schedule import resolve_step
from apt_lightning.structure import MaskedLayerNorm, ModelShapes

pytestmark = pytest.mark.usefixtures("one_thread")


def set_test_masks(masks) -> None:
    """Fractional and zero entries everywhere, so the masked paths are exercised."""
    masks.set("head", torch.tensor([1.0, 0.5, 1.0, 0.0]), 1)
    neuron = torch.ones(48)
    neuron[[3, 7]] = torch.tensor([0.0, 0.3])
    masks.set("neuron", neuron, 2)
    hidden = torch.ones(32)
    hidden[[5, 9]] = torch.tensor([0.0, 0.6])
    masks.set("hidden", hidden)


# ---------------------------------------------------------------------------------------------- salience
def direct_salience(model: APTModule, batch: dict) -> dict[tuple[str, int], torch.Tensor]:
    """Per-channel (sum |x|) * (sum |dL/dx|) at every mask site, from forward hooks and autograd.grad."""
    structure = model.structure
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def grad_leaf(x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # everything upstream frozen: make it a leaf we can differentiate
            x.requires_grad_(True)
        return x

    def keep(key):
        def pre_hook(module, args):  # registered after the mask's pre-hook: sees the masked tensor
            captured[key] = grad_leaf(args[0])

        return pre_hook

    def keep_out(key):
        def hook(module, args, output):
            captured[key] = grad_leaf(output)

        return hook

    for i, layer in enumerate(structure.layers):
        handles.append(layer.attention.output.dense.register_forward_pre_hook(keep(("head", i))))
        handles.append(layer.output.dense.register_forward_pre_hook(keep(("neuron", i))))
    for module in model.modules():
        if isinstance(module, MaskedLayerNorm):
            handles.append(module.register_forward_hook(keep_out(("hidden", module.site))))
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = F.cross_entropy(model(**inputs).logits, batch["labels"])
        keys = list(captured)
        grads = torch.autograd.grad(loss, [captured[k] for k in keys])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, g in zip(keys, grads, strict=True):
        x = captured[key]
        width = x.shape[-1]
        out[key] = x.detach().abs().reshape(-1, width).sum(0) * g.abs().reshape(-1, width).sum(0)
    return out


def observed_step(model: APTModule, scorer, batch: dict) -> None:
    masks = model.structure.masks
    masks.observer = scorer
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        F.cross_entropy(model(**inputs).logits, batch["labels"]).backward()
        scorer.step()
    finally:
        masks.observer = None
    model.zero_grad(set_to_none=True)


def expected_blocks(direct: dict, model: APTModule) -> BlockTensors:
    shapes = model.structure.shapes()
    dh = shapes.head_dim
    return BlockTensors(
        [direct[("head", i)].reshape(h, dh).sum(1) for i, h in enumerate(shapes.heads)],
        [direct[("neuron", i)] for i in range(shapes.num_layers)],
        sum(v for (kind, _), v in direct.items() if kind == "hidden"),
    )


def assert_blocks_close(a: BlockTensors, b: BlockTensors, rtol=1e-5) -> None:
    for x, y in zip(a.heads + a.neurons + [a.hidden], b.heads + b.neurons + [b.hidden], strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("targets", [None, ["intermediate.dense"]], ids=["qv_ffn", "ffn_only"])
def test_hook_salience_equals_direct_autograd(backbone, targets):
    # ffn_only: nothing before layer 0's FFN is trainable, yet its heads and the embedding output are scored
    model = make_module(backbone, **({"adapters": AdapterConfig(targets=targets)} if targets else {}))
    structure = model.structure
    set_test_masks(structure.install_masks())
    batch = synthetic_batch()
    direct = direct_salience(model, batch)
    # every site is there, the embedding output (all frozen upstream) included
    assert {k for k in direct if k[0] == "hidden"} == {("hidden", s) for s in range(2 * 3 + 1)}
    model.zero_grad(set_to_none=True)

    scorer = OutlierAwareSalience(ema=0.0, kurtosis=False)
    scorer.attach(structure)
    observed_step(model, scorer, batch)
    assert set(scorer.salience) == set(direct)
    got = scorer.compute(structure)
    want = expected_blocks(direct, model)
    assert_blocks_close(got, want)
    assert float(want.hidden.sum()) > 0 and float(torch.cat(want.heads).sum()) > 0
    assert got.heads[1][3] == 0  # a head masked to 0 has zero activation, hence zero salience


def test_salience_ema_over_steps(backbone):
    model = make_module(backbone)
    structure = model.structure
    structure.install_masks()
    b1, b2 = synthetic_batch(seed=1), synthetic_batch(seed=2)
    s1 = expected_blocks(direct_salience(model, b1), model)
    s2 = expected_blocks(direct_salience(model, b2), model)
    model.zero_grad(set_to_none=True)
    scorer = OutlierAwareSalience(ema=0.85, kurtosis=False)
    scorer.attach(structure)
    observed_step(model, scorer, b1)
    observed_step(model, scorer, b2)
    want = BlockTensors(
        [0.85 * a + 0.15 * b for a, b in zip(s1.heads, s2.heads, strict=True)],
        [0.85 * a + 0.15 * b for a, b in zip(s1.neurons, s2.neurons, strict=True)],
        0.85 * s1.hidden + 0.15 * s2.hidden,
    )
    assert_blocks_close(scorer.compute(structure), want)


def test_salience_of_a_removed_sublayer_fades(backbone):
    model = make_module(backbone)
    structure = model.structure
    masks = structure.install_masks()
    scorer = OutlierAwareSalience(ema=0.5, kurtosis=False)
    scorer.attach(structure)
    observed_step(model, scorer, synthetic_batch(seed=1))
    masks.set("head", torch.zeros(4), 1)  # layer 1 loses its attention block: hidden site 3 disappears
    hidden = torch.ones(32)
    hidden[:2] = 0.0
    masks.set("hidden", hidden)
    kept = BlockTensors(
        [masks.kept("head", i) for i in range(3)],
        [masks.kept("neuron", i) for i in range(3)],
        masks.kept("hidden"),
    )
    model.compact()
    scorer.compact(kept)
    stale = scorer.salience[("hidden", 3)].clone()
    live = scorer.salience[("hidden", 4)].clone()
    assert stale.shape == (30,) and float(stale.sum()) > 0
    observed_step(model, scorer, synthetic_batch(seed=2))
    torch.testing.assert_close(scorer.salience[("hidden", 3)], 0.5 * stale)  # EMA with S = 0
    assert not torch.allclose(scorer.salience[("hidden", 4)], 0.5 * live)  # a live site got a new term
    assert scorer.compute(structure).heads[1].numel() == 0


def fisher_kurtosis_rows(o: torch.Tensor) -> torch.Tensor:
    z = (o - o.mean(1, keepdim=True)) / o.std(1, unbiased=False, keepdim=True)
    return (z**4).mean(1) - 3.0


def test_kurtosis_term_per_neuron(backbone):
    model = make_module(backbone)
    structure = model.structure
    structure.install_masks()
    plain = OutlierAwareSalience(ema=0.0, kurtosis=False)
    outlier = OutlierAwareSalience(ema=0.0, kurtosis=True)
    for scorer in (plain, outlier):
        scorer.attach(structure)
        observed_step(model, scorer, synthetic_batch())
    for i in range(3):
        w = structure.ffn_output_weight(i).detach()
        mean_act = plain.mean_act[("neuron", i)]
        assert mean_act.shape == (48,)
        extra = fisher_kurtosis_rows((w * mean_act).t()).clamp_min(0).sqrt()
        got = outlier.compute(structure).neurons[i] - plain.compute(structure).neurons[i]
        torch.testing.assert_close(got, extra, rtol=1e-4, atol=1e-5)
        assert float(extra.max()) > 0


@pytest.mark.parametrize("name", ["salience", "random", "uniform", "magnitude"])
def test_masked_blocks_score_zero(backbone, name):
    model = make_module(backbone)
    structure = model.structure
    masks = structure.install_masks()
    scorer = build_scorer(name)
    scorer.attach(structure)
    if scorer.observes_batches:
        observed_step(model, scorer, synthetic_batch())
    masks.set("head", torch.tensor([1.0, 1.0, 0.0, 1.0]), 0)
    neuron = torch.ones(48)
    neuron[5] = 0.0
    masks.set("neuron", neuron, 1)
    hidden = torch.ones(32)
    hidden[7] = 0.0
    masks.set("hidden", hidden)
    raw = scorer.compute(structure)
    scores = scorer.scores(structure)
    assert scores.heads[0][2] == 0 and scores.neurons[1][5] == 0 and scores.hidden[7] == 0
    if name != "salience":  # the raw score is non-zero, so it is `scores` that zeroed it
        assert raw.heads[0][2] != 0 and raw.neurons[1][5] != 0 and raw.hidden[7] != 0
    alive = torch.cat(
        [
            scores.heads[0][[0, 1, 3]],
            scores.neurons[1][torch.arange(48) != 5],
            scores.hidden[torch.arange(32) != 7],
            scores.heads[2],
            scores.neurons[0],
        ]
    )
    assert bool((alive > 0).all())


def test_builtin_scorers_and_unknown_name():
    assert isinstance(build_scorer("salience"), OutlierAwareSalience)
    assert isinstance(build_scorer("random"), RandomScorer)
    assert isinstance(build_scorer("uniform"), UniformScorer)
    assert isinstance(build_scorer("magnitude"), MagnitudeScorer)
    mine = CountingScorer()
    assert build_scorer(mine) is mine
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*magnitude"):
        build_scorer("nope")


# ---------------------------------------------------------------------------------------------- schedule
def test_cubic_schedule_values_and_events():
    s = CubicSchedule(target_sparsity=0.6, start_step=10, end_step=30, num_events=4, decay_steps=2)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(10) == 0.0
    assert s.sparsity_at(30) == pytest.approx(0.6) and s.sparsity_at(1000) == pytest.approx(0.6)
    assert s.sparsity_at(20) == pytest.approx(0.6 * (1 - 0.125))
    assert s.sparsity_at(15) == pytest.approx(0.6 * (1 - 0.75**3))
    values = [s.sparsity_at(t) for t in range(0, 40)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert s.event_steps() == [15, 20, 25, 30]
    assert s.last_step == 32
    assert CubicSchedule(0.5, 0, 10, num_events=3).event_steps() == [3, 7, 10]


def test_resolve_step():
    assert resolve_step(0.5, 100, "x") == 50
    assert resolve_step(1.0, 100, "x") == 100  # a float 1.0 is the whole run, not step 1
    assert resolve_step(200, 1000, "x") == 200
    assert resolve_step(200.0, 1000, "x") == 200
    with pytest.raises(ValueError, match="fraction"):
        resolve_step(1.5, 100, "start_step")
    with pytest.raises(ValueError, match=">= 0"):
        resolve_step(-1, 100, "start_step")


# ---------------------------------------------------------------------------------------------- search
def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    layers = randint(1, 4)
    dh = [4, 8][randint(0, 1)]
    shapes = bert_shapes(
        [randint(0, 6) for _ in range(layers)], [randint(0, 40) for _ in range(layers)], randint(8, 48), dh
    )
    scores = BlockTensors.full(shapes).map(lambda t: torch.rand(t.shape, generator=g))
    full = bert_count(shapes.heads, shapes.neurons, shapes.hidden, dh)
    budget = int(float(torch.rand((), generator=g)) * 1.1 * full)
    return shapes, scores, budget


def reference_prefix(shapes: ModelShapes, scores: BlockTensors, budget: int):
    """Blocks in density order, and the longest prefix within the budget (computed block by block)."""
    d, dh = shapes.hidden, shapes.head_dim
    per_hidden = sum(4 * h * dh + 2 * f for h, f in zip(shapes.heads, shapes.neurons, strict=True))
    blocks = []  # (density, flat position, kind, layer, index)
    for layer, h in enumerate(shapes.heads):
        for j in range(h):
            blocks.append((float(scores.heads[layer][j]) / (4 * d * dh), "head", layer, j))
    for layer, f in enumerate(shapes.neurons):
        for j in range(f):
            blocks.append((float(scores.neurons[layer][j]) / (2 * d), "neuron", layer, j))
    for j in range(d):
        blocks.append((float(scores.hidden[j]) / per_hidden, "hidden", -1, j))
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i][0])

    def count(prefix):
        heads = [0] * shapes.num_layers
        neurons = [0] * shapes.num_layers
        hidden = 0
        for i in prefix:
            _, kind, layer, _ = blocks[i]
            if kind == "head":
                heads[layer] += 1
            elif kind == "neuron":
                neurons[layer] += 1
            else:
                hidden += 1
        return bert_count(heads, neurons, hidden, dh)

    k = 0
    while k < len(order) and count(order[: k + 1]) <= budget:
        k += 1
    return blocks, order, k, count


def as_sets(keep: BlockTensors):
    out = set()
    for layer, t in enumerate(keep.heads):
        out |= {("head", layer, int(j)) for j in torch.nonzero(t).flatten()}
    for layer, t in enumerate(keep.neurons):
        out |= {("neuron", layer, int(j)) for j in torch.nonzero(t).flatten()}
    out |= {("hidden", -1, int(j)) for j in torch.nonzero(keep.hidden).flatten()}
    return out


@pytest.mark.parametrize("seed", range(8))
def test_select_blocks_within_budget_and_maximal(seed):
    shapes, scores, budget = random_case(seed)
    keep = select_blocks(scores, shapes, budget)
    blocks, order, k, count = reference_prefix(shapes, scores, budget)
    kept = kept_param_count(keep, shapes)
    assert kept <= budget
    assert as_sets(keep) == {blocks[i][1:] for i in order[:k]}  # exactly the longest prefix in density order
    if k < len(order):
        assert count(order[: k + 1]) > budget  # the next block would not fit
    assert kept == count(order[:k])


@pytest.mark.parametrize("multiple_of", [4, 8, 16, 32])
@pytest.mark.parametrize("seed", range(5))
def test_select_blocks_multiple_of(seed, multiple_of):
    g = torch.Generator().manual_seed(100 + seed)
    layers = 3
    shapes = bert_shapes(
        [4] * layers,
        [int(torch.randint(20, 64, (1,), generator=g)) for _ in range(layers)],
        8 * int(torch.randint(3, 7, (1,), generator=g)),
        8,
    )
    scores = BlockTensors.full(shapes).map(lambda t: torch.rand(t.shape, generator=g))
    full = bert_count(shapes.heads, shapes.neurons, shapes.hidden, 8)
    budget = int((0.25 + 0.6 * float(torch.rand((), generator=g))) * full)
    keep = select_blocks(scores, shapes, budget, multiple_of=multiple_of)
    heads, neurons, hidden = keep.counts()
    assert hidden % multiple_of == 0 and hidden > 0
    assert all(n % multiple_of == 0 for n in neurons), neurons
    head_group = max(1, multiple_of // 8)  # attention widths (heads x d_h = 8) aligned too
    assert all(h % head_group == 0 for h in heads), heads
    kept = kept_param_count(keep, shapes)
    assert kept <= budget
    # maximal: no aligned group of pruned heads or pruned neurons would still fit
    free_heads = [(int(m.numel()) - int(m.sum())) // head_group for m in keep.heads]
    free_groups = [(int(m.numel()) - int(m.sum())) // multiple_of for m in keep.neurons]
    if any(free_heads):
        assert kept + head_group * 4 * 8 * hidden > budget
    if any(free_groups):
        assert kept + 2 * multiple_of * hidden > budget
    for masks, layer_scores in ((keep.heads, scores.heads), (keep.neurons, scores.neurons)):
        for mask, score in zip(masks, layer_scores, strict=True):  # each layer keeps its densest blocks
            if 0 < mask.sum() < mask.numel():
                assert score[mask == 1].min() > score[mask == 0].max()


@pytest.mark.parametrize("head_dim, multiple_of", [(26, 64), (64, 512)])
def test_select_blocks_leaves_heads_unaligned_when_groups_cannot_fit(head_dim, multiple_of):
    """TinyBERT-like d_h 26 at x64 would need groups of 32 heads, x512 with d_h 64 groups of 8; neither
    divides 12 heads, so heads stay unaligned (with a warning) instead of being dropped at sparsity 0."""
    shapes = bert_shapes([12, 12], [1024, 1024], 1024, head_dim)
    full = bert_count(shapes.heads, shapes.neurons, shapes.hidden, head_dim)
    with pytest.warns(UserWarning, match="attention widths are left unaligned"):
        keep = select_blocks(BlockTensors.full(shapes), shapes, full, multiple_of=multiple_of)
    assert keep.counts()[0] == [12, 12]


def test_select_blocks_rejects_bad_multiple():
    shapes = bert_shapes([2], [4], 8, 4)
    with pytest.raises(ValueError, match="multiple_of"):
        select_blocks(BlockTensors.full(shapes), shapes, 10, multiple_of=0)


@pytest.mark.parametrize("heads,neurons", [([4, 4, 4], [48, 48, 48]), ([4, 2, 3], [48, 24, 36])])
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_uniform_scores_keep_equal_fractions(heads, neurons, sparsity):
    shapes = bert_shapes(heads, neurons, 32, 8)
    structure = SimpleNamespace(shapes=lambda: shapes)
    scores = UniformScorer().compute(structure)
    full = bert_count(heads, neurons, 32, 8)
    keep = select_blocks(scores, shapes, int((1 - sparsity) * full))
    kh, kn, kd = keep.counts()
    fh = [k / n for k, n in zip(kh, heads, strict=True)]
    fn = [k / n for k, n in zip(kn, neurons, strict=True)]
    for fracs, sizes in ((fh, heads), (fn, neurons)):
        for a, na in zip(fracs, sizes, strict=True):
            for b, nb in zip(fracs, sizes, strict=True):
                assert abs(a - b) <= 1 / na + 1 / nb + 1e-9, (fracs, sizes)
    f = math.sqrt(1 - sparsity)  # C = (f D)(f A) = f^2 C_0 when every group keeps a fraction f
    assert abs(kd / 32 - f) <= 2 / 32 + 1e-9
    assert all(abs(x - f) <= 1 / n + 2 / 32 for x, n in zip(fn, neurons, strict=True))
    # within a group lower indices win the tie: kept heads and neurons are a leading range
    for t in keep.heads + keep.neurons:
        k = int(t.sum())
        assert bool((t[:k] == 1).all())


# ---------------------------------------------------------------------------------------------- callback runs
@pytest.mark.skipif(not GLUE_DIR.exists(), reason="shared GLUE data not present")
def test_custom_scorer_from_yaml_class_path(backbone, tmp_path):
    from apt_lightning.cli import run_cli

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 12,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "apt_lightning.callbacks.AdaptivePruning",
                    "init_args": {
                        "target_sparsity": 0.4,
                        "start_step": 2,
                        "end_step": 8,
                        "num_events": 3,
                        "decay_steps": 1,
                        "plot": False,
                        "scorer": {
                            "class_path": "helpers_apt.CountingScorer",
                            "init_args": {"zero_layer": 0},
                        },
                    },
                }
            ],
        },
        "model": {
            "class_path": "apt_lightning.APTModule",
            "init_args": {"backbone": str(backbone), "task": "sst2"},
        },
        "data": {
            "class_path": "apt_lightning.data.GLUEDataModule",
            "init_args": {
                "data_dir": str(GLUE_DIR / "sst2"),
                "batch_size": 8,
                "max_length": 32,
                "train_limit": 64,
                "eval_limit": 16,
            },
        },
    }
    path = tmp_path / "in" / "apt.yaml"  # (the CLI saves its own config.yaml into default_root_dir)
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["fit", "--config", str(path)])
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptivePruning))
    scorer = pruning.scorer
    assert type(scorer).__name__ == "CountingScorer" and scorer.zero_layer == 0
    assert scorer.calls == 3  # once per event
    assert scorer.attached is cli.model.structure
    assert cli.trainer.global_step == 12
    # its scores drove the search: every block of layer 0 scored 0 and was pruned first
    shapes = cli.model.structure.shapes()
    assert shapes.heads[0] == 0 and shapes.neurons[0] == 0
    # score 1 everywhere else: neurons have the highest density (1 / 2D) and all survive
    assert min(shapes.heads[1:]) > 0 and shapes.neurons[1:] == [48, 48]
    assert pruning.history[-1]["achieved_sparsity"] == pytest.approx(0.4, abs=0.05)
    assert pruning.history[-1]["achieved_sparsity"] >= 0.4 - 1e-9


def pruning_callback() -> AdaptivePruning:
    return AdaptivePruning(
        target_sparsity=0.5, start_step=2, end_step=8, num_events=3, decay_steps=1, plot=False
    )


def fit_pruning(backbone, tmp_path, ckpt_path=None, save_steps=(), weights_only=False):
    model = make_module(backbone)
    pruning = pruning_callback()
    saver = SaveAt(tmp_path, list(save_steps))
    trainer = quiet_trainer(max_steps=12, callbacks=[pruning, saver], default_root_dir=tmp_path)
    # weights_only=False: see test_resume_with_default_weights_only for the default
    trainer.fit(
        model, train_dataloaders=repeated_batch_loader(12), ckpt_path=ckpt_path, weights_only=weights_only
    )
    return model, pruning, saver


def test_resume_mid_pruning_matches_uninterrupted_run(backbone, tmp_path):
    # events at steps 4, 6, 8; each one's 1-step decay window ends (hard masks) at 5, 7, 9
    ref, ref_cb, saver = fit_pruning(backbone, tmp_path, save_steps=[4, 7])
    assert set(saver.paths) == {4, 7}
    ref_shapes = ref.structure.shapes()
    assert sum(ref_shapes.heads) + sum(ref_shapes.neurons) < 3 * 4 + 3 * 48  # it did prune
    assert [e["step"] for e in ref_cb.history] == [4, 6, 8]
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    mid = torch.load(saver.paths[4], weights_only=False)
    cb_state = next(v for k, v in mid["callbacks"].items() if "AdaptivePruning" in k)
    assert cb_state["targets"] is not None and cb_state["next_event"] == 1  # saved inside the decay window
    fractional = [v for k, v in mid["state_dict"].items() if "apt_masks" in k and ((v > 0) & (v < 1)).any()]
    assert fractional
    for step in (4, 7):  # 4: inside a decay window (fractional masks); 7: after event 1's window
        model, cb, _ = fit_pruning(backbone, tmp_path, ckpt_path=saver.paths[step])
        assert model.structure.shapes() == ref_shapes
        timing = ("score_s", "search_s")
        assert [{k: v for k, v in e.items() if k not in timing} for e in cb.history] == [
            {k: v for k, v in e.items() if k not in timing} for e in ref_cb.history
        ]
        state = model.state_dict()
        assert set(state) == set(ref_state)
        for name, value in ref_state.items():
            torch.testing.assert_close(
                state[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} after resume at {step}"
            )


def test_resume_with_default_weights_only(backbone, tmp_path):
    _, _, saver = fit_pruning(backbone, tmp_path, save_steps=[7])
    fit_pruning(backbone, tmp_path, ckpt_path=saver.paths[7], weights_only=None)  # Lightning's default


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"target_sparsity": -0.1}, "target_sparsity"),
        ({"scorer": "nope"}, "unknown scorer"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"decay_alpha": 0.0}, "decay_alpha"),
        ({"compact_at": "sometimes"}, "compact_at"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePruning(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"start_step": 8, "end_step": 4}, "must come before"),
        ({"start_step": 2, "end_step": 6, "num_events": 5, "decay_steps": 0}, "too few"),
        ({"start_step": 2, "end_step": 9, "num_events": 3, "decay_steps": 2}, "too few"),
        ({"start_step": 2, "end_step": 11, "num_events": 2, "decay_steps": 3}, "only 12 optimizer steps"),
    ],
)
def test_bad_schedule_fails_before_training(backbone, tmp_path, kwargs, match):
    model = make_module(backbone)
    counter = CountSteps()
    trainer = quiet_trainer(
        max_steps=12, callbacks=[AdaptivePruning(plot=False, **kwargs), counter], default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train_dataloaders=repeated_batch_loader(12))
    assert counter.batches == 0 and trainer.global_step == 0


@pytest.mark.parametrize(
    "args,match",
    [
        ((1.0, 0, 10), "target_sparsity"),
        ((0.5, 10, 10), "must come before"),
        ((0.5, 10, 5), "must come before"),
    ],
)
def test_cubic_schedule_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        CubicSchedule(*args)
    with pytest.raises(ValueError, match="num_events"):
        CubicSchedule(0.5, 0, 10, num_events=0)


class MaskValuesAt(Callback):
    """Records the set of mask values after optimizer step `step`."""

    def __init__(self, step: int):
        self.step, self.values = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            m = pl_module.structure.masks
            parts = [m.head(i) for i in range(m.num_layers)] + [m.neuron(i) for i in range(m.num_layers)]
            self.values = sorted({round(v, 6) for v in torch.cat([*parts, m.hidden]).tolist()})


@pytest.mark.parametrize("accumulate", [1, 4])
def test_mask_decay_counts_optimizer_steps_not_micro_batches(backbone, tmp_path, accumulate):
    """One event at step 6 opens a 5-step window (alpha 0.1): after optimizer step 8 the pruned blocks
    have moved three times (to 0.7), however many micro-batches each step accumulated."""
    model = make_module(backbone)
    pruning = AdaptivePruning(
        target_sparsity=0.5,
        start_step=0,
        end_step=6,
        num_events=1,
        decay_steps=5,
        decay_alpha=0.1,
        compact_at="never",
        plot=False,
    )
    probe = MaskValuesAt(8)
    trainer = quiet_trainer(
        max_steps=12,
        callbacks=[pruning, probe],
        accumulate_grad_batches=accumulate,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=repeated_batch_loader(12 * accumulate))
    assert probe.values == [0.7, 1.0]
    assert model.structure.masks.is_hard()  # the window ended (step 11) with hard masks


def test_readme_scorer_example_runs_through_compaction(backbone, tmp_path):
    """The custom scorer in README.md, verbatim, survives pruning events with compaction between them."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("```python\n# my_scorers.py\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    scorer = namespace["ActivationScorer"](ema=0.9)
    pruning = AdaptivePruning(
        target_sparsity=0.5, start_step=2, end_step=8, num_events=3, decay_steps=1, scorer=scorer, plot=False
    )
    model = make_module(backbone)
    quiet_trainer(max_steps=10, callbacks=[pruning], default_root_dir=tmp_path).fit(
        model, train_dataloaders=repeated_batch_loader(10)
    )
    assert len(pruning.history) == 3
    assert pruning.history[-1]["achieved_sparsity"] == pytest.approx(0.5, abs=0.06)
