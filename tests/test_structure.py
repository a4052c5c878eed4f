"""BERT/RoBERTa structure: masks, masked LayerNorm, compaction (masked == compacted), counters, reshape."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_count, bert_exact_count, bert_shapes, tiny_batch, tiny_model
from torch import nn

from apt_lightning.adapters import AdapterConfig, adapter_modules, inject_adapters, merge_adapters
from apt_lightning.structure import (
    MaskedLayerNorm,
    ModelShapes,
    PruningMasks,
    get_structure,
)
from apt_lightning.structure.families.bert import SkippedAttention, SkippedFFNOutput

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ATOL = 1e-5
LAYERS, HEADS, HEAD_DIM, NEURONS, HIDDEN = 3, 4, 8, 48, 32  # conftest.tiny_config


def adapted_model(family: str, seed: int = 0, targets=ALL_LINEARS) -> nn.Module:
    """A tiny model with weights large enough that logits are O(1), and adapters with random non-zero B
    on every Linear of the encoder (so slicing the adapters' factors matters)."""
    model = tiny_model(family, seed=seed, initializer_range=0.2)
    inject_adapters(model, AdapterConfig(targets=targets, rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model.eval()


def forward(model, batch=None):
    with torch.no_grad():
        return model(**(batch or tiny_batch()), output_hidden_states=True)


def random_hard_masks(
    masks: PruningMasks,
    seed: int,
    zero_heads: int | None,
    zero_neurons: int | None,
    hidden_drop: float = 0.25,
) -> dict:
    """Random 0/1 masks; layer `zero_heads` loses every head, `zero_neurons` every neuron. Returns the
    kept counts the masks imply."""
    g = torch.Generator().manual_seed(seed)
    sizes = masks.sizes()
    heads, neurons = [], []
    for i in range(masks.num_layers):
        h = (torch.rand(sizes["heads"][i], generator=g) > 0.5).float()
        f = (torch.rand(sizes["neurons"][i], generator=g) > 0.5).float()
        if i == zero_heads:
            h.zero_()
        if i == zero_neurons:
            f.zero_()
        masks.set("head", h, i)
        masks.set("neuron", f, i)
        heads.append(int(h.sum()))
        neurons.append(int(f.sum()))
    hid = (torch.rand(sizes["hidden"], generator=g) > hidden_drop).float()
    hid[0] = 1.0
    masks.set("hidden", hid)
    return {"heads": heads, "neurons": neurons, "hidden": int(hid.sum()), "hidden_mask": hid}


def assert_masked_equals_compacted(model, masks, kept_hidden, batch=None):
    structure = get_structure(model)
    masked = forward(model, batch)
    masks.enabled = False
    unmasked = forward(model, batch)
    masks.enabled = True
    assert (masked.logits - unmasked.logits).abs().max() > 1e-3, "the masks should change the output"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = structure.compact()
    compact = forward(model, batch)
    torch.testing.assert_close(compact.logits, masked.logits, rtol=0, atol=ATOL)
    assert len(compact.hidden_states) == len(masked.hidden_states)
    for hm, hc in zip(masked.hidden_states, compact.hidden_states, strict=True):
        assert hc.shape[-1] == len(kept_hidden)
        torch.testing.assert_close(hc, hm[..., kept_hidden], rtol=0, atol=ATOL)
        pruned = torch.ones(hm.shape[-1], dtype=torch.bool)
        pruned[kept_hidden] = False
        if pruned.any():
            assert hm[..., pruned].abs().max().item() == 0  # masked model: pruned dims are exactly 0
    # the slice log replays the compaction on any tensors named like the parameters
    replayed = log.apply(before)
    for name, p in model.named_parameters():
        torch.testing.assert_close(replayed[name], p.detach(), rtol=0, atol=0)
    return compact


# ---------------------------------------------------------------- masked == compacted
@pytest.mark.parametrize("seed, zero_heads, zero_neurons", [(0, 0, 1), (1, 2, 0), (2, 1, 2), (3, 1, 1)])
def test_masked_equals_compacted(family, seed, zero_heads, zero_neurons):
    model = adapted_model(family, seed)
    structure = get_structure(model)
    masks = structure.install_masks()
    kept = random_hard_masks(masks, seed, zero_heads, zero_neurons)
    kept_hidden = kept["hidden_mask"].nonzero().flatten()
    assert 0 < kept["hidden"] < HIDDEN
    assert_masked_equals_compacted(model, masks, kept_hidden)

    s = structure.shapes()
    assert (s.heads, s.neurons, s.hidden) == (kept["heads"], kept["neurons"], kept["hidden"])
    assert (s.full_heads, s.full_neurons, s.full_hidden) == ([HEADS] * LAYERS, [NEURONS] * LAYERS, HIDDEN)
    layers = model.base_model.encoder.layer
    assert isinstance(layers[zero_heads].attention, SkippedAttention)
    assert isinstance(layers[zero_neurons].output, SkippedFFNOutput)
    assert masks.sizes() == {"heads": s.heads, "neurons": s.neurons, "hidden": s.hidden}
    assert all(bool((t == 1).all()) for t in masks.buffers())
    assert adapter_modules(model), "adapters survive compaction"
    for m in adapter_modules(model).values():
        assert m.lora_A.shape[1] == m.in_features and m.lora_B.shape[0] == m.out_features

    # a second round of pruning on the compacted model (training compacts several times)
    kept2 = random_hard_masks(masks, seed + 100, None, None, hidden_drop=0.2)
    kept_hidden2 = kept2["hidden_mask"].nonzero().flatten()
    out = assert_masked_equals_compacted(model, masks, kept_hidden2)

    # removing the (all-ones) masks leaves a plain model computing the same thing
    structure.remove_masks()
    assert not any(isinstance(m, MaskedLayerNorm) for m in model.modules())
    assert not any(k.startswith("apt_masks.") for k in model.state_dict())
    torch.testing.assert_close(forward(model).logits, out.logits, rtol=0, atol=ATOL)

    # ... and merging the adapters of the compacted model changes nothing either
    merge_adapters(model)
    torch.testing.assert_close(forward(model).logits, out.logits, rtol=0, atol=ATOL)


def test_whole_layer_skipped_and_growth_after_compaction(family):
    model = adapted_model(family, seed=5)
    structure = get_structure(model)
    masks = structure.install_masks()
    masks.set("head", torch.zeros(HEADS), 1)
    masks.set("neuron", torch.zeros(NEURONS), 1)
    masks.set("head", torch.tensor([0.0, 1, 0, 1]), 2)
    kept_hidden = torch.arange(HIDDEN)
    out = assert_masked_equals_compacted(model, masks, kept_hidden)
    layer = model.base_model.encoder.layer[1]
    torch.testing.assert_close(out.hidden_states[2], out.hidden_states[1], rtol=0, atol=0)  # identity layer
    assert isinstance(layer.intermediate, nn.Identity)
    for m in adapter_modules(model).values():
        m.grow_rank(m.rank + 5)
    torch.testing.assert_close(forward(model).logits, out.logits)


def test_masks_disabled_or_removed_give_the_unmasked_model(family):
    model = adapted_model(family, seed=6)
    reference = forward(model).logits
    structure = get_structure(model)
    masks = structure.install_masks()
    assert structure.install_masks() is masks and model.apt_masks is masks
    torch.testing.assert_close(forward(model).logits, reference, rtol=0, atol=ATOL)  # all-ones masks
    random_hard_masks(masks, 6, 0, 2)
    assert (forward(model).logits - reference).abs().max() > 1e-3
    keys = [k for k in model.state_dict() if k.startswith("apt_masks.")]
    assert sorted(keys) == sorted(
        [f"apt_masks.{k}_{i}" for k in ("head", "neuron") for i in range(LAYERS)] + ["apt_masks.hidden"]
    )
    structure.remove_masks()
    assert structure.masks is None and not hasattr(model, "apt_masks")
    assert type(model.base_model.embeddings.LayerNorm) is nn.LayerNorm
    torch.testing.assert_close(forward(model).logits, reference, rtol=0, atol=0)


def test_deep_copy_of_a_masked_model_follows_its_own_masks(family):
    """A deep copy (export, benchmarks, snapshots) must be driven by the copy's masks, not the original's."""
    model = adapted_model(family, seed=8)
    masks = get_structure(model).install_masks()
    masks.set("head", torch.tensor([1.0, 0, 1, 0]), 0)
    clone = copy.deepcopy(model)
    assert get_structure(clone) is not get_structure(model) and get_structure(clone).masks is clone.apt_masks
    reference = forward(clone).logits
    masks.set("head", torch.tensor([0.0, 1, 0, 1]), 0)  # change only the original
    masks.set("neuron", torch.zeros(NEURONS), 1)
    assert (forward(model).logits - reference).abs().max() > 1e-3
    torch.testing.assert_close(forward(clone).logits, reference, rtol=0, atol=0)
    clone.apt_masks.set("head", torch.tensor([0.0, 1, 0, 1]), 0)  # the copy's own masks do act on it
    clone.apt_masks.set("neuron", torch.zeros(NEURONS), 1)
    torch.testing.assert_close(forward(clone).logits, forward(model).logits, rtol=0, atol=0)


def test_mask_state_dict_round_trip_refreshes_flags():
    masks = PruningMasks([2, 2], [3, 3], 4)
    other = PruningMasks([2, 2], [3, 3], 4)
    masks.set("head", torch.zeros(2), 1)
    masks.set("neuron", torch.tensor([1.0, 0.5, 0.0]), 0)
    other.load_state_dict(masks.state_dict())
    assert other.head_zero == [False, True] and other.head_full == [True, False]
    assert other.neuron_full == [False, True] and not other.is_hard()
    torch.testing.assert_close(other.kept("neuron", 0), torch.tensor([0, 1]))


# ---------------------------------------------------------------- fractional masks
def test_fractional_head_and_neuron_masks_scale_output_projection_columns(family):
    model = adapted_model(family, seed=7, targets=["query", "value", "intermediate.dense"])
    reference = copy.deepcopy(model)
    batch = tiny_batch(seed=7)
    unmasked = forward(model, batch).logits
    head_m = torch.tensor([1.0, 0.5, 0.0, 0.25])
    neuron_m = torch.rand(NEURONS, generator=torch.Generator().manual_seed(7))
    masks = get_structure(model).install_masks()
    masks.set("head", head_m, 1)
    masks.set("neuron", neuron_m, 2)
    masks.set("head", torch.full((HEADS,), 0.5), 0)
    masked = forward(model, batch)
    assert (masked.logits - unmasked).abs().max() > 1e-3
    layers = reference.base_model.encoder.layer
    with torch.no_grad():
        layers[1].attention.output.dense.weight.mul_(head_m.repeat_interleave(HEAD_DIM))
        layers[0].attention.output.dense.weight.mul_(0.5)
        layers[2].output.dense.weight.mul_(neuron_m)
    expected = forward(reference, batch)
    torch.testing.assert_close(masked.logits, expected.logits, rtol=0, atol=ATOL)
    for hm, he in zip(masked.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(hm, he, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="needs hard 0/1 masks"):
        get_structure(model).compact()


def _masked_ln(hidden_mask: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    masks = PruningMasks([1], [1], len(hidden_mask))
    masks.set("hidden", hidden_mask)
    ln = nn.LayerNorm(len(hidden_mask), eps=1e-5)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    return MaskedLayerNorm.from_layernorm(ln, masks, site=0), ln, masks


def test_masked_layernorm_with_hard_mask_is_layernorm_over_kept_dims():
    m = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0])
    mln, ln, _ = _masked_ln(m)
    assert mln.weight is ln.weight and mln.bias is ln.bias
    x = torch.randn(3, 5, 8) * 3 + 1
    out = mln(x)
    keep = m.bool()
    expected = F.layer_norm(x[..., keep], (int(keep.sum()),), ln.weight[keep], ln.bias[keep], 1e-5)
    torch.testing.assert_close(out[..., keep], expected, rtol=0, atol=1e-5)
    assert out[..., ~keep].abs().max() == 0
    assert (out[..., keep] - ln(x)[..., keep]).abs().max() > 1e-2  # differs from plain LayerNorm


def test_masked_layernorm_fractional_mask_uses_weighted_statistics():
    # weights 1 and 0.5: the weighted mean/variance equal those of the vector in which every
    # weight-1 entry appears twice and every weight-0.5 entry once (population statistics)
    m = torch.tensor([1.0, 0.5, 1, 0.5, 0.5, 1, 0, 1])
    mln, ln, _ = _masked_ln(m, seed=1)
    x = torch.randn(4, 8) * 2 - 1
    out = mln(x)
    for row, o in zip(x, out, strict=True):
        expanded = torch.cat([row[m == 1], row[m == 1], row[m == 0.5]])
        mu, var = expanded.mean(), expanded.var(unbiased=False)
        expected = ((row - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias) * m
        torch.testing.assert_close(o, expected, rtol=0, atol=1e-5)


def test_masked_layernorm_uniform_fraction_scales_plain_layernorm():
    mln, ln, masks = _masked_ln(torch.full((8,), 0.3), seed=2)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(mln(x), 0.3 * ln(x))
    masks.enabled = False  # inactive masks: a plain LayerNorm
    torch.testing.assert_close(mln(x), ln(x), rtol=0, atol=0)
    masks.enabled = True
    plain = mln.to_layernorm()
    assert type(plain) is nn.LayerNorm and plain.weight is ln.weight
    torch.testing.assert_close(plain(x), ln(x), rtol=0, atol=0)


def test_empty_layer_list_masks():
    masks = PruningMasks([], [], 4)  # no layers: flags are empty tuples, the hidden mask still works
    assert masks.head_full == [] and masks.neuron_zero == []
    masks.set("hidden", torch.tensor([1.0, 0, 1, 1]))
    assert not masks.hidden_full and masks.is_hard()


# ---------------------------------------------------------------- counters
def encoder_counts(model) -> tuple[int, int]:
    """(APT-counted weights, every parameter) inside the encoder layers, counted from the tensors."""
    apt = exact = 0
    for name, p in model.named_parameters():
        if ".encoder.layer." not in name:
            continue
        exact += p.numel()
        if name.endswith(".weight") and "LayerNorm" not in name:
            apt += p.numel()
    return apt, exact


def test_counters_on_the_full_model(family):
    model = tiny_model(family)
    s = get_structure(model).shapes()
    assert (
        bert_count(s.heads, s.neurons, s.hidden, s.head_dim)
        == HIDDEN * LAYERS * (4 * HEADS * HEAD_DIM + 2 * NEURONS)
        == 21504
    )
    assert encoder_counts(model) == (
        bert_count(s.heads, s.neurons, s.hidden, s.head_dim),
        bert_exact_count(s.heads, s.neurons, s.hidden, s.head_dim),
    )


@pytest.mark.parametrize(
    "seed, zero_heads, zero_neurons", [(10, 0, 2), (11, None, 1), (12, 2, None), (13, 0, 0)]
)
def test_counters_match_compacted_models(family, seed, zero_heads, zero_neurons):
    model = adapted_model(family, seed)
    structure = get_structure(model)
    masks = structure.install_masks()
    kept = random_hard_masks(masks, seed, zero_heads, zero_neurons)
    expected = (
        bert_count(kept["heads"], kept["neurons"], kept["hidden"], HEAD_DIM),
        bert_exact_count(kept["heads"], kept["neurons"], kept["hidden"], HEAD_DIM),
    )
    structure.compact()
    structure.remove_masks()
    merge_adapters(model)
    assert encoder_counts(model) == expected
    s = structure.shapes()
    assert s.counted_params() == expected[0]  # the family's count, from its unit costs
    assert structure.exact_param_count() == expected[1]
    assert expected[0] < 21504


def test_model_shapes_dict_round_trip():
    s = bert_shapes([2, 0], [5, 7], 6, 4, [4, 4], [8, 8], 8)
    assert ModelShapes.from_dict(s.to_dict()) == s
    assert s.num_layers == 2
    fresh = bert_shapes([2, 3], [5, 7], 6, 4)
    assert (fresh.full_heads, fresh.full_neurons, fresh.full_hidden) == ([2, 3], [5, 7], 6)


# ---------------------------------------------------------------- reshape (the skeleton for loading)
def test_reshape_a_fresh_model_then_load_a_compacted_state_dict(family):
    source = adapted_model(family, seed=20)
    structure = get_structure(source)
    masks = structure.install_masks()
    kept = random_hard_masks(masks, 20, 1, 2)
    structure.compact()
    structure.remove_masks()
    merge_adapters(source)
    target = tiny_model(family, seed=99)
    get_structure(target).reshape(get_structure(source).shapes())
    assert get_structure(target).masks is None  # reshape leaves no masks behind when there were none
    assert get_structure(target).shapes() == get_structure(source).shapes()
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(forward(target).logits, forward(source).logits, rtol=0, atol=0)
    assert get_structure(target).shapes().heads == kept["heads"]


def test_reshape_rejects_mismatched_shapes():
    structure = get_structure(tiny_model("bert"))
    with pytest.raises(ValueError, match="shapes describe 2 layers, the model has 3"):
        structure.reshape(bert_shapes([4, 4], [48, 48], 32, 8))
    with pytest.raises(ValueError, match="heads of layer 1: 5 exceeds the model's 4"):
        structure.reshape(bert_shapes([4, 5, 4], [48, 48, 48], 32, 8))


# ---------------------------------------------------------------- registry and bad input
def test_get_structure_is_cached_and_rejects_unknown_families():
    model = tiny_model("roberta")
    assert get_structure(model) is get_structure(model)
    unknown = nn.Linear(2, 2)
    unknown.config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(
        ValueError,
        match=r"model type 'gpt2' has no prunable-structure family; "
        r"supported: .*bert",
    ):
        get_structure(unknown)


@pytest.mark.parametrize(
    "kind, values, layer, match",
    [
        ("head", torch.ones(5), 0, r"head mask of layer 0 must have length 4, got shape \(5,\)"),
        ("neuron", torch.ones(4), 2, "neuron mask of layer 2 must have length 48"),
        ("hidden", torch.ones(31), None, "hidden mask must have length 32"),
        ("head", torch.tensor([1.0, 1.5, 0, 0]), 1, r"values must lie in \[0, 1\], got min 0, max 1.5"),
        ("neuron", -torch.ones(48), 0, r"values must lie in \[0, 1\], got min -1"),
        ("hidden", torch.full((32,), float("nan")), None, r"must lie in \[0, 1\]"),
        ("hidden", torch.zeros(32), None, "cannot prune every hidden dimension"),
        ("heads", torch.ones(4), 0, "unknown mask kind 'heads'"),
        ("head", torch.ones(4), 3, r"head mask needs a layer in \[0, 3\), got 3"),
        ("neuron", torch.ones(48), None, r"neuron mask needs a layer in \[0, 3\), got None"),
    ],
)
def test_bad_masks_raise_clear_errors(kind, values, layer, match):
    masks = get_structure(tiny_model("bert")).install_masks()
    before = {k: v.clone() for k, v in masks.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        masks.set(kind, values, layer)
    for k, v in masks.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # nothing was half-applied


def test_compact_needs_installed_hard_masks():
    structure = get_structure(tiny_model("bert"))
    with pytest.raises(RuntimeError, match="needs installed masks"):
        structure.compact()
    masks = structure.install_masks()
    masks.set("hidden", torch.full((HIDDEN,), 0.99))
    with pytest.raises(ValueError, match="compact\\(\\) needs hard 0/1 masks"):
        structure.compact()
    assert structure.shapes().hidden == HIDDEN


# ---------------------------------------------------------------- the real packaged MiniLM
@pytest.mark.slow
def test_invariants_on_the_packaged_minilm():
    from transformers import AutoModelForSequenceClassification

    from apt_lightning.backbone import load_tokenizer, resolve_backbone

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_backbone("minilm-l6"), num_labels=2, attn_implementation="eager"
    ).eval()
    tok = load_tokenizer("minilm-l6")
    batch = dict(
        tok(
            ["a gripping, beautifully shot film.", "dull and far too long", "it is fine, i guess"],
            padding=True,
            return_tensors="pt",
        )
    )
    cfg = model.config
    n_layers, n_heads, n_ff, hidden = (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.hidden_size,
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)  # a new head: make the logits O(1) so 1e-5 is a real test
    plain = forward(model, batch).logits
    inject_adapters(model, AdapterConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    adapted = forward(model, batch)
    assert (adapted.logits - plain).abs().max() > 1e-3

    # growth leaves the outputs unchanged; merging a copy equals the unmerged model
    for m in adapter_modules(model).values():
        m.grow_rank(16)
    torch.testing.assert_close(forward(model, batch).logits, adapted.logits, rtol=0, atol=1e-5)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.lora_B[:, 8:].normal_(0, 0.02, generator=g)
    grown = forward(model, batch).logits
    merged = copy.deepcopy(model)
    assert merge_adapters(merged) == 3 * n_layers
    torch.testing.assert_close(forward(merged, batch).logits, grown, rtol=0, atol=1e-5)

    # masked == compacted with a layer without heads, a layer without neurons and pruned hidden dims
    structure = get_structure(model)
    masks = structure.install_masks()
    gm = torch.Generator().manual_seed(1)
    for i in range(n_layers):
        heads = (torch.rand(n_heads, generator=gm) > 0.4).float()
        neurons = (torch.rand(n_ff, generator=gm) > 0.4).float()
        masks.set("head", heads * (i != 1), i)  # layer 1 loses every head
        masks.set("neuron", neurons * (i != 3), i)  # layer 3 loses every neuron
    hid = (torch.rand(hidden, generator=gm) > 0.1).float()
    masks.set("hidden", hid)
    masked = forward(model, batch)
    assert (masked.logits - grown).abs().max() > 1e-2
    structure.compact()
    compact = forward(model, batch)
    torch.testing.assert_close(compact.logits, masked.logits, rtol=0, atol=1e-5)
    kept = hid.nonzero().flatten()
    for hm, hc in zip(masked.hidden_states, compact.hidden_states, strict=True):
        torch.testing.assert_close(hc, hm[..., kept], rtol=1e-5, atol=1e-5)
    s = structure.shapes()
    assert s.heads[1] == 0 and s.neurons[3] == 0 and s.hidden == len(kept) < hidden
    merge_adapters(model)
    structure.remove_masks()
    torch.testing.assert_close(forward(model, batch).logits, masked.logits, rtol=0, atol=1e-5)
