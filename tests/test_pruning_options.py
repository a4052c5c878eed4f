"""The pruning-side options of docs/method.md sections 4-5 (issue "Faithful APT"): kurtosis forms, the
branch-gradient hidden salience, the mask-decay window before events with re-selection, sparsity warm-up.
Each test also shows the old behaviour (the option's other value) failing the new property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_count, bert_shapes
from helpers_apt import SaveAt, make_module, quiet_trainer, repeated_batch_loader, synthetic_batch
from lightning import Callback
from test_pruning import observed_step, set_test_masks

from apt_lightning.adapters import AdapterConfig
from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.pruning import (
    BlockTensors,
    CubicSchedule,
    OutlierAwareSalience,
    Scorer,
    UniformScorer,
    block_costs,
    select_blocks,
)
from apt_lightning.pruning.scorers import kurtosis_form, scale_within_kind
from apt_lightning.structure import MaskedLayerNorm

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- kurtosis forms
def test_kurtosis_forms_and_old_booleans():
    assert [kurtosis_form(v) for v in ("off", "paper", "scaled", True, False)] == [
        "off",
        "paper",
        "scaled",
        "paper",
        "off",
    ]
    for bad in (1, 0, "on", "Paper", None):
        with pytest.raises(ValueError, match=r"kurtosis must be one of off, paper, scaled \(or true = paper"):
            kurtosis_form(bad)
    with pytest.raises(ValueError, match="kurtosis must be one of"):
        OutlierAwareSalience(kurtosis="yes")
    scorer = OutlierAwareSalience(kurtosis=True)  # an old config
    assert scorer.kurtosis == "paper"
    scorer.kurtosis = False  # attribute assignment maps too
    assert scorer.kurtosis == "off"
    with pytest.raises(ValueError, match="hidden_salience must be one of total, branch"):
        OutlierAwareSalience(hidden_salience="residual")


def constructed_case(seed: int = 0):
    """Two layers of 4 heads (d_h 8) and 48 neurons, 32 hidden dims. Salience densities: hidden 3, heads 2,
    neurons 1 (x 1e-6), equal within a kind; outlier terms U(0.8, 1.2) per block, like sqrt(Kurt) values."""
    shapes = bert_shapes([4, 4], [48, 48], 32, 8)
    costs = block_costs(shapes)
    rho = 1e-6
    salience = BlockTensors(
        [2 * rho * c for c in costs.heads], [rho * c for c in costs.neurons], 3 * rho * costs.hidden
    )
    g = torch.Generator().manual_seed(seed)
    terms = BlockTensors.full(shapes).map(lambda t: 0.8 + 0.4 * torch.rand(t.shape, generator=g))
    budget = int(0.4 * bert_count(shapes.heads, shapes.neurons, shapes.hidden, 8))
    return shapes, salience, terms, budget


def add(a: BlockTensors, b: BlockTensors) -> BlockTensors:
    return a.combine(b, torch.add)


def kept_heads(keep: BlockTensors) -> set[tuple[int, int]]:
    return {(layer, int(j)) for layer, t in enumerate(keep.heads) for j in torch.nonzero(t).flatten()}


def test_scaled_kurtosis_leaves_the_balance_between_kinds_to_the_salience():
    shapes, salience, terms, budget = constructed_case()
    live = BlockTensors.full(shapes)

    def search(form: str, scale: float = 1.0) -> BlockTensors:
        t = terms.map(lambda x: x * scale)
        scores = {
            "off": salience,
            "paper": add(salience, t),
            "scaled": add(salience, scale_within_kind(salience, t, live)),
        }[form]
        return select_blocks(scores, shapes, budget)

    off, paper, scaled = search("off"), search("paper"), search("scaled")
    # salience alone keeps 5 heads (hidden dims first, then heads, no neuron fits); the paper's unscaled term
    # is worth 64x more density on a neuron than on a head and removes all attention
    assert sum(off.counts()[0]) == 5 and sum(off.counts()[1]) == 0
    assert sum(paper.counts()[0]) == 0 and sum(paper.counts()[1]) > 0
    # scaled: the same numbers per kind as salience alone ...
    assert sum(scaled.counts()[0]) == 5 and sum(scaled.counts()[1]) == 0
    assert scaled.counts()[2] == off.counts()[2]
    # ... but within the kind the outlier term picks which heads: the five with the largest terms
    flat = torch.cat(terms.heads)
    top = {divmod(int(i), 4) for i in torch.topk(flat, 5).indices}
    assert kept_heads(scaled) == top != kept_heads(off)
    # invariant to the terms' units (and hence to the salience's: loss scale, batch, sequence length); the
    # paper's form is not
    for scale in (1e-6, 1e3):
        assert torch.equal(search("scaled", scale).flat(), scaled.flat())
    assert not torch.equal(search("paper", 1e-6).flat(), paper.flat())


def test_scaled_term_sums_to_each_kinds_salience_over_live_blocks():
    shapes, salience, terms, _ = constructed_case(seed=1)
    live = BlockTensors.full(shapes)
    live.heads[0][1] = 0.0  # a pruned head does not count
    scaled = scale_within_kind(salience, terms, live)
    alive = torch.cat(live.heads) > 0
    torch.testing.assert_close(torch.cat(scaled.heads)[alive].sum(), torch.cat(salience.heads)[alive].sum())
    torch.testing.assert_close(torch.cat(scaled.neurons).sum(), torch.cat(salience.neurons).sum())
    torch.testing.assert_close(scaled.hidden.sum(), salience.hidden.sum())
    zero = scale_within_kind(salience, terms.map(torch.zeros_like), live)  # no term: nothing added
    assert float(zero.flat().abs().sum()) == 0.0


def test_scaled_kurtosis_on_a_model_follows_the_salience_units(backbone):
    """On a real model: multiplying every salience value by c (another loss scale or batch size) multiplies
    the `scaled` scores by c, so the search decides the same; `paper` scores are not proportional."""
    model = make_module(backbone)
    structure = model.structure
    structure.install_masks()
    scorer = OutlierAwareSalience(ema=0.0, kurtosis="off")
    scorer.attach(structure)
    observed_step(model, scorer, synthetic_batch())
    base = {form: None for form in ("off", "paper", "scaled")}
    for form in base:
        scorer.kurtosis = form
        base[form] = scorer.compute(structure).flat()
    scorer.salience = {k: 1000.0 * v for k, v in scorer.salience.items()}
    scorer.kurtosis = "scaled"
    torch.testing.assert_close(scorer.compute(structure).flat(), 1000.0 * base["scaled"], rtol=1e-5, atol=0)
    scorer.kurtosis = "paper"
    assert not torch.allclose(scorer.compute(structure).flat(), 1000.0 * base["paper"], rtol=1e-2)
    # the scaled term is there (it reorders) and doubles each kind's total
    assert not torch.allclose(base["scaled"], 2 * base["off"], rtol=1e-3)
    torch.testing.assert_close(base["scaled"].sum(), 2 * base["off"].sum(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ branch gradient
def branch_reference(model, batch: dict) -> torch.Tensor:
    """Hidden-dim salience of the branch form by autograd: at the input x of each layer's Q/K/V and FFN-in,
    (sum |x|) * (sum |g|) with g = the vector-Jacobian product of dL/dq, dL/dk, dL/dv (dL/d FFN-in output)
    through those projections alone; at the last LayerNorm output, the total gradient."""
    structure = model.structure
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []

    def grad_leaf(x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # everything upstream frozen
            x.requires_grad_(True)
        return x

    def take_input(key):
        def hook(module, args):
            inputs[key] = grad_leaf(args[0])

        return hook

    def take_output(key):
        def hook(module, args, out):
            outputs.setdefault(key, []).append(out)

        return hook

    for i, layer in enumerate(structure.layers):
        att = layer.attention.self
        handles.append(att.query.register_forward_pre_hook(take_input(f"att{i}")))
        handles += [p.register_forward_hook(take_output(f"att{i}")) for p in (att.query, att.key, att.value)]
        ffn = layer.intermediate.dense
        handles.append(ffn.register_forward_pre_hook(take_input(f"ffn{i}")))
        handles.append(ffn.register_forward_hook(take_output(f"ffn{i}")))

    def take_final(module, args, out) -> None:
        outputs["final"] = [grad_leaf(out)]

    last = [m for m in model.modules() if isinstance(m, MaskedLayerNorm)][-1]
    handles.append(last.register_forward_hook(take_final))
    try:
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = F.cross_entropy(model(**model_inputs).logits, batch["labels"])
        keys = list(inputs)
        flat = [t for k in keys for t in outputs[k]] + outputs["final"]
        grads = list(torch.autograd.grad(loss, flat, retain_graph=True))
        final_grad = grads.pop()
        total = 0
        for key in keys:
            outs = outputs[key]
            g_out, grads = grads[: len(outs)], grads[len(outs) :]
            (g,) = torch.autograd.grad(outs, inputs[key], g_out, retain_graph=True)
            x = inputs[key]
            total = total + x.detach().abs().flatten(0, 1).sum(0) * g.abs().flatten(0, 1).sum(0)
    finally:
        for h in handles:
            h.remove()
    x = outputs["final"][0]
    return total + x.detach().abs().flatten(0, 1).sum(0) * final_grad.abs().flatten(0, 1).sum(0)


@pytest.mark.parametrize("targets", [None, ["intermediate.dense"]], ids=["qv_ffn", "ffn_only"])
def test_branch_hidden_salience_equals_autograd_on_the_branch_inputs(backbone, targets):
    # ffn_only: nothing upstream of layer 0's attention is trainable, yet its branch gradient is measured
    model = make_module(backbone, **({"adapters": AdapterConfig(targets=targets)} if targets else {}))
    structure = model.structure
    set_test_masks(structure.install_masks())
    batch = synthetic_batch()
    want = branch_reference(model, batch)
    model.zero_grad(set_to_none=True)
    branch = OutlierAwareSalience(ema=0.0, kurtosis="off", hidden_salience="branch")
    total = OutlierAwareSalience(ema=0.0, kurtosis="off", hidden_salience="total")
    for scorer in (branch, total):
        scorer.attach(structure)
        observed_step(model, scorer, batch)
    assert {k for k in branch.salience if k[0] == "branch"} == {("branch", b) for b in range(6)}
    assert not any(k[0] == "branch" for k in total.salience)  # the hooks stay quiet for the total form
    got, old = branch.compute(structure), total.compute(structure)
    torch.testing.assert_close(got.hidden, want, rtol=1e-5, atol=1e-9)
    assert float(want.sum()) > 0
    assert not torch.allclose(old.hidden, want, rtol=1e-2)  # the residual stream's share is gone
    for a, b in zip(got.heads + got.neurons, old.heads + old.neurons, strict=True):
        torch.testing.assert_close(a, b)  # heads and neurons are scored the same way in both forms


def test_branch_hooks_leave_the_model_and_compaction_alone(backbone):
    """The branch hooks change no output, and a compaction that removes a whole sublayer drops them (a
    dead hook handle would break `copy.deepcopy`, which export uses)."""
    import copy

    model = make_module(backbone)
    structure = model.structure
    masks = structure.install_masks()
    batch = {k: v for k, v in synthetic_batch().items() if k != "labels"}
    plain = model(**batch).logits.detach()
    watching = OutlierAwareSalience(ema=0.0, kurtosis="off", hidden_salience="branch")
    watching.attach(structure)
    masks.observer = watching
    torch.testing.assert_close(model(**batch).logits.detach(), plain, rtol=0, atol=0)
    masks.observer = None
    masks.set("head", torch.zeros(4), 0)
    masks.set("neuron", torch.zeros(48), 1)
    model.compact()
    copy.deepcopy(structure.model)
    scorer = OutlierAwareSalience(ema=0.0, kurtosis="off", hidden_salience="branch")
    scorer.attach(structure)
    observed_step(model, scorer, synthetic_batch())
    assert {k for k in scorer.salience if k[0] == "branch"} == {("branch", b) for b in (1, 2, 4, 5)}


def test_branch_form_on_a_pre_norm_decoder_is_the_total_form():
    """LLaMA-type decoders read each norm output by one branch only: both forms give the same scores."""
    from test_llama import batch as decoder_batch
    from test_llama import tiny_decoder, with_adapters

    from apt_lightning.structure import get_structure

    model = with_adapters(tiny_decoder("cls"))
    structure = get_structure(model)
    structure.install_masks()
    assert structure.branch_input_sites() == set(range(2 * len(structure.layers) + 1))
    scores = []
    for form in ("branch", "total"):
        scorer = OutlierAwareSalience(ema=0.0, kurtosis="off", hidden_salience=form)
        scorer.attach(structure)
        structure.masks.observer = scorer
        model.train()
        F.cross_entropy(model(**decoder_batch()).logits, torch.tensor([0, 1, 2])).backward()
        scorer.step()
        structure.masks.observer = None
        model.zero_grad(set_to_none=True)
        assert not any(k[0] == "branch" for k in scorer.salience)
        scores.append(scorer.compute(structure).flat())
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
    assert float(scores[0].sum()) > 0


def test_branch_form_needs_a_family_that_names_branch_inputs():
    class Bare:  # a custom family without branch_input_sites
        pass

    OutlierAwareSalience(hidden_salience="total").attach(Bare())
    with pytest.raises(ValueError, match="branch_input_sites"):
        OutlierAwareSalience(hidden_salience="branch").attach(Bare())


# ----------------------------------------------------------------------------------------------- mask decay
class RisingScorer(Scorer):
    """Uniform scores (every group keeps the same fraction), except head 0 of layer 0: 0 for the first
    `low` calls (pruned first), then the densest block of all."""

    def __init__(self, low: int = 2) -> None:
        self.low, self.calls = low, 0

    def compute(self, structure) -> BlockTensors:
        self.calls += 1
        scores = UniformScorer().compute(structure)
        cost = float(block_costs(structure.shapes()).heads[0][0])
        scores.heads[0][0] = 0.0 if self.calls <= self.low else 10.0 * cost
        return scores


class MaskTrace(Callback):
    """After each optimizer step: head 0 of layer 0's mask, the lowest mask value, whether all are hard."""

    def __init__(self) -> None:
        self.target, self.lowest, self.hard = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module.structure.masks
        step = trainer.global_step
        self.target[step] = float(m.head(0)[0])
        parts = [m.head(i) for i in range(m.num_layers)] + [m.neuron(i) for i in range(m.num_layers)]
        self.lowest[step] = float(torch.cat([*parts, m.hidden]).min())
        self.hard[step] = m.is_hard()


def run_rising(backbone, tmp_path, mask_decay: str, decay_alpha: float | None = None):
    pruning = AdaptivePruning(
        target_sparsity=0.5,
        start_step=0,
        end_step=6,
        num_events=1,
        decay_steps=4,
        mask_decay=mask_decay,
        decay_alpha=decay_alpha,
        scorer=RisingScorer(low=2),
        compact_at="never",
        plot=False,
    )
    trace = MaskTrace()
    trainer = quiet_trainer(max_steps=12, callbacks=[pruning, trace], default_root_dir=tmp_path)
    trainer.fit(make_module(backbone), train_dataloaders=repeated_batch_loader(12))
    return pruning, trace


def test_window_before_the_event_reselects_a_block_whose_score_rises(backbone, tmp_path):
    """The event at step 6 has a window over steps 2-5 (alpha 1/4): the head scores 0 in the first two
    searches and moves down, then scores highest, moves back up and is kept when the masks go hard at 6."""
    pruning, trace = run_rising(backbone, tmp_path, "before")
    assert pruning.alpha == 0.25
    assert [trace.target[s] for s in range(1, 8)] == [1.0, 0.75, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert not any(trace.hard[s] for s in (2, 3, 4, 5)) and trace.hard[6] and trace.hard[12]
    assert trace.lowest[4] == 0.25 and trace.lowest[5] == 0.0  # pruned in every search: 0 by the event
    record = pruning.history[0]
    assert (record["step"], record["window_start"], record["searches"]) == (6, 2, 5)
    assert record["reselected"] >= 1
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=0.06)
    # the old behaviour (one search at the event, decay after it) prunes the head for good
    old, old_trace = run_rising(backbone, tmp_path, "after")
    assert old_trace.target[10] == 0.0 and old_trace.hard[10] and old.scorer.calls == 1


def test_window_before_the_event_keeps_a_block_out_once_its_mask_reaches_0(backbone, tmp_path):
    """The documented limit: with alpha 1/2 the head's mask reaches 0 after its two low searches; it then
    scores 0 (masked), so its rise does not bring it back."""
    pruning, trace = run_rising(backbone, tmp_path, "before", decay_alpha=0.5)
    assert [trace.target[s] for s in range(1, 8)] == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert pruning.scorer.calls == 5 and trace.hard[6]  # it was scored high in the last three searches


def test_resume_inside_a_window_before_an_event_matches_an_uninterrupted_run(backbone, tmp_path):
    def fit(ckpt_path=None, save_steps=()):
        model = make_module(backbone)
        pruning = AdaptivePruning(
            target_sparsity=0.5,
            start_step=2,
            end_step=8,
            num_events=3,
            decay_steps=1,
            decay_alpha=0.5,
            mask_decay="before",
            plot=False,
        )
        saver = SaveAt(tmp_path, list(save_steps))
        trainer = quiet_trainer(max_steps=10, callbacks=[pruning, saver], default_root_dir=tmp_path)
        loader = repeated_batch_loader(10)
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
        return model, pruning, saver

    # windows open at 3, 5, 7 (one soft step each); masks hard at 4, 6, 8; compaction as each window opens
    ref, ref_cb, saver = fit(save_steps=[5])
    assert [(e["window_start"], e["step"]) for e in ref_cb.history] == [(3, 4), (5, 6), (7, 8)]
    mid = torch.load(saver.paths[5], weights_only=False)
    state = next(v for k, v in mid["callbacks"].items() if "AdaptivePruning" in k)
    assert state["window_masks"] is not None
    assert any(((v > 0) & (v < 1)).any() for k, v in mid["state_dict"].items() if "apt_masks" in k)
    model, cb, _ = fit(ckpt_path=saver.paths[5])
    assert model.structure.shapes() == ref.structure.shapes()
    timing = ("score_s", "search_s")
    assert [{k: v for k, v in e.items() if k not in timing} for e in cb.history] == [
        {k: v for k, v in e.items() if k not in timing} for e in ref_cb.history
    ]
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_mask_decay_and_alpha_arguments():
    assert AdaptivePruning(plot=False).alpha == 0.01  # today's default, unchanged
    assert AdaptivePruning(mask_decay="before", decay_steps=20, plot=False).alpha == 0.05
    assert AdaptivePruning(mask_decay="before", decay_steps=200, decay_alpha=0.01, plot=False).alpha == 0.01
    with pytest.raises(ValueError, match="mask_decay must be one of after, before, got 'during'"):
        AdaptivePruning(mask_decay="during")
    s = CubicSchedule(0.5, 10, 30, num_events=2, decay_steps=4, mask_decay="before")
    assert [s.window(k) for k in range(2)] == [(16, 20), (26, 30)] and s.last_step == 30
    s = CubicSchedule(0.5, 10, 30, num_events=2, decay_steps=4)
    assert [s.window(k) for k in range(2)] == [(20, 24), (30, 34)] and s.last_step == 34


# ---------------------------------------------------------------------------------------------- warm-up
def test_schedule_warmup_holds_full_density_then_ramps_to_the_end():
    old = CubicSchedule(0.6, 10, 30, num_events=4)
    same = CubicSchedule(0.6, 10, 30, num_events=4, warmup_steps=0)
    assert [same.sparsity_at(t) for t in range(40)] == [old.sparsity_at(t) for t in range(40)]
    s = CubicSchedule(0.6, 10, 30, num_events=4, warmup_steps=8)  # ramp from step 18
    assert s.event_steps() == [15, 20, 25, 30]  # events stay where they were
    assert [s.sparsity_at(t) for t in s.event_steps()][:1] == [0.0]
    assert all(s.sparsity_at(t) == 0.0 for t in range(19))
    assert s.sparsity_at(20) == pytest.approx(0.6 * (1 - (1 - 2 / 12) ** 3))
    assert s.sparsity_at(30) == pytest.approx(0.6)
    assert old.sparsity_at(15) > 0  # without warm-up the first event already prunes
    with pytest.raises(ValueError, match="warm-up .* must end before the end step"):
        CubicSchedule(0.6, 10, 30, warmup_steps=20)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        CubicSchedule(0.6, 10, 30, warmup_steps=-1)


class MaskChanges(Callback):
    """The optimizer steps after which any mask differs from all ones."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module.structure.masks
        parts = [m.head(i) for i in range(m.num_layers)] + [m.neuron(i) for i in range(m.num_layers)]
        if bool((torch.cat([*parts, m.hidden]) != 1).any()):
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("warmup", [0, 0.5, 6])
def test_sparsity_warmup_keeps_every_mask_until_it_ends(backbone, tmp_path, warmup):
    """Events at steps 2, 4, 6, 8; a warm-up of 6 steps (or half of the 12-step run) holds the first three
    at full density, and the one at 8 prunes to the target; without it pruning starts at step 2."""
    pruning = AdaptivePruning(
        target_sparsity=0.5,
        start_step=0,
        end_step=8,
        num_events=4,
        decay_steps=1,
        warmup_steps=warmup,
        compact_at="never",
        plot=False,
    )
    changes = MaskChanges()
    trainer = quiet_trainer(max_steps=12, callbacks=[pruning, changes], default_root_dir=tmp_path)
    trainer.fit(make_module(backbone), train_dataloaders=repeated_batch_loader(12))
    sparsities = [e["target_sparsity"] for e in pruning.history]
    assert [e["step"] for e in pruning.history] == [2, 4, 6, 8]
    if warmup:
        assert sparsities == [0.0, 0.0, 0.0, 0.5]
        assert [e["achieved_sparsity"] for e in pruning.history[:3]] == [0.0, 0.0, 0.0]
        assert changes.steps[0] == 8
    else:
        assert sparsities[0] > 0 and changes.steps[0] == 2
    assert pruning.history[-1]["achieved_sparsity"] == pytest.approx(0.5, abs=0.06)
