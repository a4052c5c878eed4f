"""APTLinear and adapter injection: sharing, rank growth, slicing, merging, and their error messages."""

import pytest
import torch
from conftest import logits, tiny_batch, tiny_model
from torch import nn

from apt_lightning.adapters import AdapterConfig, APTLinear, adapter_modules, inject_adapters, merge_adapters
from apt_lightning.structure.slicing import slice_linear

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def random_adapter(in_f=12, out_f=10, rank=4, alpha=8.0, seed=0) -> APTLinear:
    torch.manual_seed(seed)
    layer = APTLinear(in_f, out_f, rank=rank, alpha=alpha)
    nn.init.normal_(layer.lora_B, std=0.5)  # B = 0 at init would hide every adapter bug
    return layer


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


# ---------------------------------------------------------------- the layer
def test_from_linear_shares_weights_freezes_them_and_starts_as_identity():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    ad = APTLinear.from_linear(lin, rank=4, alpha=8.0)
    assert ad.weight.data_ptr() == lin.weight.data_ptr() and ad.bias.data_ptr() == lin.bias.data_ptr()
    assert not ad.weight.requires_grad and not ad.bias.requires_grad
    assert ad.lora_A.requires_grad and ad.lora_B.requires_grad
    assert ad.lora_A.shape == (4, 12) and ad.lora_B.shape == (10, 4) and ad.rank == 4
    assert ad.scaling == 2.0
    assert ad.lora_A.abs().sum() > 0 and ad.lora_B.abs().sum() == 0
    x = torch.randn(3, 12)
    torch.testing.assert_close(ad(x), lin(x), rtol=0, atol=0)


def test_forward_is_w_plus_scaled_ba():
    ad = random_adapter()
    x = torch.randn(5, 12)
    w = ad.weight + ad.scaling * ad.lora_B @ ad.lora_A
    torch.testing.assert_close(ad(x), x @ w.T + ad.bias, rtol=1e-5, atol=1e-5)
    assert (ad(x) - nn.functional.linear(x, ad.weight, ad.bias)).abs().max() > 1e-2  # the adapter matters


def test_grow_rank_keeps_output_and_scaling_then_new_factors_learn():
    ad = random_adapter(rank=4, alpha=8.0)
    x, target = torch.randn(6, 12), torch.randn(6, 10)
    before = ad(x).detach()
    old_a, old_b, s = ad.lora_A.detach().clone(), ad.lora_B.detach().clone(), ad.scaling
    ad.grow_rank(7)
    assert ad.rank == 7 and ad.lora_A.shape == (7, 12) and ad.lora_B.shape == (10, 7)
    assert ad.scaling == s  # s = alpha / r0 stays: growth must not rescale the old factors
    torch.testing.assert_close(ad.lora_A[:4], old_a, rtol=0, atol=0)
    torch.testing.assert_close(ad.lora_B[:, :4], old_b, rtol=0, atol=0)
    assert (ad.lora_A[4:].abs().sum(1) > 0).all() and ad.lora_B[:, 4:].abs().sum() == 0
    torch.testing.assert_close(ad(x).detach(), before)
    assert ad.lora_A.requires_grad and ad.lora_B.requires_grad

    opt = torch.optim.SGD([ad.lora_A, ad.lora_B], lr=0.1)  # no weight decay: only gradients move weights
    new_a0 = ad.lora_A[4:].detach().clone()
    # step 1: B's new columns see (A_new x) != 0 and get gradient; A's new rows see B_new = 0 and get none
    nn.functional.mse_loss(ad(x), target).backward()
    assert (ad.lora_B.grad[:, 4:].abs().sum(0) > 0).all()
    assert ad.lora_A.grad[4:].abs().sum() == 0
    opt.step()
    opt.zero_grad()
    assert (ad.lora_B[:, 4:].abs().sum(0) > 0).all()
    torch.testing.assert_close(ad.lora_A[4:].detach(), new_a0, rtol=0, atol=0)
    # step 2: now that B's new columns are non-zero, A's new rows get gradient and move
    nn.functional.mse_loss(ad(x), target).backward()
    assert (ad.lora_A.grad[4:].abs().sum(1) > 0).all()
    opt.step()
    assert ((ad.lora_A[4:].detach() - new_a0).abs().sum(1) > 0).all()


def test_grow_rank_to_same_rank_is_a_no_op_and_smaller_raises():
    ad = random_adapter(rank=4)
    a = ad.lora_A
    ad.grow_rank(4)
    assert ad.lora_A is a
    with pytest.raises(ValueError, match="below the current rank 4"):
        ad.grow_rank(3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=0), "rank must be >= 1"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_aptlinear_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        APTLinear(4, 4, **kw)


def test_merge_equals_unmerged_and_is_a_plain_linear():
    ad = random_adapter()
    ad.grow_rank(6)
    nn.init.normal_(ad.lora_B, std=0.5)
    x = torch.randn(5, 12)
    merged = ad.merge()
    assert type(merged) is nn.Linear and not hasattr(merged, "lora_A")
    torch.testing.assert_close(merged(x), ad(x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.bias, ad.bias, rtol=0, atol=0)
    assert merged.weight.data_ptr() != ad.weight.data_ptr()  # the frozen W is not modified in place


def test_merge_without_bias():
    torch.manual_seed(0)
    ad = APTLinear.from_linear(nn.Linear(6, 5, bias=False), rank=2, alpha=4.0)
    nn.init.normal_(ad.lora_B)
    x = torch.randn(3, 6)
    merged = ad.merge()
    assert merged.bias is None
    torch.testing.assert_close(merged(x), ad(x).detach(), rtol=1e-5, atol=1e-5)


def test_slice_ops_keep_rows_and_columns_of_w_and_the_factors():
    ad = random_adapter(in_f=12, out_f=10, rank=4)
    out_idx, in_idx = torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 5, 7, 11])
    x = torch.randn(5, 12)
    x_masked = torch.zeros_like(x)
    x_masked[:, in_idx] = x[:, in_idx]
    expected = ad(x_masked).detach()[:, out_idx]
    ops = slice_linear(ad, out_index=out_idx, in_index=in_idx)
    assert {(op.param, op.dim) for op in ops} == {
        ("weight", 0),
        ("weight", 1),
        ("bias", 0),
        ("lora_B", 0),
        ("lora_A", 1),
    }
    assert (ad.in_features, ad.out_features) == (5, 4) and ad.rank == 4
    assert ad.lora_A.shape == (4, 5) and ad.lora_B.shape == (4, 4)
    assert ad.lora_A.requires_grad and not ad.weight.requires_grad
    torch.testing.assert_close(ad(x[:, in_idx]).detach(), expected)


# ---------------------------------------------------------------- injection into a model
def test_inject_default_targets(family):
    model = tiny_model(family)
    added = inject_adapters(model, AdapterConfig())
    n_layers = model.config.num_hidden_layers
    assert len(added) == 3 * n_layers
    suffixes = sorted({name.split("layer.0.")[-1] for name in added if ".layer.0." in name})
    assert suffixes == ["attention.self.query", "attention.self.value", "intermediate.dense"]
    assert adapter_modules(model) == {n: m for n, m in added.items()}
    for m in added.values():
        assert m.rank == 8 and m.scaling == 2.0
        assert not m.weight.requires_grad and m.lora_A.requires_grad
    # B = 0 at injection: the model computes exactly what it did before
    plain = tiny_model(family)
    torch.testing.assert_close(logits(model, tiny_batch()), logits(plain, tiny_batch()), rtol=0, atol=0)


def test_inject_matches_at_dot_boundaries_only(family):
    model = tiny_model(family)
    added = inject_adapters(model, AdapterConfig(targets=["attention.output.dense"], rank=2, alpha=2.0))
    assert len(added) == model.config.num_hidden_layers
    assert all(n.endswith(".attention.output.dense") for n in added)
    assert all(m.rank == 2 and m.scaling == 1.0 for m in added.values())
    with pytest.raises(ValueError, match="matches no Linear module"):
        inject_adapters(tiny_model(family), AdapterConfig(targets=["uery"]))  # not "query"


def test_inject_target_matching_nothing_raises_with_examples():
    with pytest.raises(
        ValueError,
        match=r"adapter target 'q_proj' matches no Linear module in "
        r"BertForSequenceClassification; names end like: .*query",
    ):
        inject_adapters(tiny_model("bert"), AdapterConfig(targets=["query", "q_proj"]))


@pytest.mark.parametrize(
    "kw, match", [(dict(targets=[]), "at least one module"), (dict(rank=0), "rank must be")]
)
def test_adapter_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kw)


def test_merge_adapters_equals_unmerged_on_the_whole_model(family):
    model = tiny_model(family, seed=1, initializer_range=0.2)
    inject_adapters(model, AdapterConfig(targets=ALL_LINEARS, rank=4, alpha=8.0))
    randomize_adapters(model, seed=1)
    next(iter(adapter_modules(model).values())).grow_rank(9)  # mixed ranks
    batch = tiny_batch(seed=1)
    before = logits(model, batch)
    plain = tiny_model(family, seed=1, initializer_range=0.2)
    assert (before - logits(plain, batch)).abs().max() > 1e-2  # the adapters matter
    n = len(adapter_modules(model))
    assert merge_adapters(model) == n == 6 * model.config.num_hidden_layers
    assert not adapter_modules(model)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-5, atol=1e-5)
    assert merge_adapters(model) == 0


def test_rank_growth_on_the_whole_model_leaves_logits_unchanged(family):
    model = tiny_model(family, seed=2, initializer_range=0.2)
    inject_adapters(model, AdapterConfig())
    randomize_adapters(model, seed=2)
    batch = tiny_batch(seed=2)
    before = logits(model, batch)
    for i, m in enumerate(adapter_modules(model).values()):
        m.grow_rank(8 + 3 * (i % 4))
    assert sorted({m.rank for m in adapter_modules(model).values()}) == [8, 11, 14, 17]
    torch.testing.assert_close(logits(model, batch), before)
