"""Inference fusions: fused == unfused (dense and pruned, with padding), idempotence, errors, the GPU path."""

import copy

import pytest
import torch
from conftest import logits, tiny_batch, tiny_model

from apt_lightning.fusion import fuse_for_inference
from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure.families.bert_fusion import FusedSelfAttention, LinearGelu, _linear_gelu

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_model_computes_what_the_original_does(family, attn, pruned):
    # with attention dropout configured, as in real checkpoints: an eval model must not apply it
    model = tiny_model(family, seed=3, attention_probs_dropout_prob=0.5)
    if pruned:  # per-layer head counts differ; at 0.6 the search may also drop a whole sublayer
        prune_to_sparsity(model, 0.6, "random")
    model.set_attn_implementation(attn)
    batch = tiny_batch()  # row 0 is padded: the fused attention must honour the mask
    expected = logits(model, batch)
    fused = copy.deepcopy(model)
    counts = fuse_for_inference(fused)
    layers = fused.base_model.encoder.layer
    assert counts["qkv"] == sum(
        isinstance(getattr(x.attention, "self", None), FusedSelfAttention) for x in layers
    )
    assert counts["gelu"] == sum(isinstance(x.intermediate, LinearGelu) for x in layers)
    assert counts["qkv"] > 0 and counts["gelu"] > 0
    torch.testing.assert_close(logits(fused, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ran_before_fusing", [True, False])
def test_fused_attention_still_reports_attentions(ran_before_fusing):
    """transformers records `output_attentions` through hooks on modules of the replaced class, installed at
    the model's first forward: the fused module is of that class and takes over hooks already installed."""
    model = tiny_model("roberta")
    batch = tiny_batch()
    with torch.no_grad():
        expected = copy.deepcopy(model)(**batch, output_attentions=True).attentions
        if ran_before_fusing:
            model(**batch, output_attentions=True)
    fuse_for_inference(model, ["qkv"])
    with torch.no_grad():
        got = model(**batch, output_attentions=True).attentions
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_model_trains():
    """Gradients reach the fused projection (the GELU epilogue, which has none, is skipped under autograd)
    and `train()` / `eval()` switch the fused attention's dropout like the original's."""
    model = tiny_model("bert", attention_probs_dropout_prob=0.5)
    fuse_for_inference(model)
    layer = model.bert.encoder.layer[0]
    assert not layer.attention.self.training and not layer.intermediate.training  # like the model
    model.train()
    assert layer.attention.self.training
    model(**tiny_batch(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.qkv.weight.grad.abs().sum() > 0


def test_fusing_twice_changes_nothing():
    model = tiny_model("bert")
    assert fuse_for_inference(model) == {"qkv": 3, "gelu": 3}
    before = logits(model, tiny_batch())
    assert fuse_for_inference(model) == {"qkv": 0, "gelu": 0}
    torch.testing.assert_close(logits(model, tiny_batch()), before)


def test_one_fusion_at_a_time():
    model = tiny_model("roberta")
    assert fuse_for_inference(model, ["gelu"]) == {"gelu": 3}
    assert not any(isinstance(x.attention.self, FusedSelfAttention) for x in model.roberta.encoder.layer)


def test_fused_attention_refuses_cross_attention():
    model = tiny_model("bert")
    fuse_for_inference(model, ["qkv"])
    attn = model.bert.encoder.layer[0].attention.self
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="no cross-attention"):
        attn(x, encoder_hidden_states=x)


def _tiny_llama():
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize(
    "make, fusions, match",
    [
        (lambda: tiny_model("bert"), ["rope"], "unknown fusion"),
        (lambda: tiny_model("bert", hidden_act="relu"), ["gelu"], "hidden_act 'relu'"),
        (lambda: tiny_model("bert", is_decoder=True), ["qkv"], "is_decoder=True"),
        (lambda: torch.nn.Linear(2, 2), ["qkv"], "no prunable-structure family"),
        (lambda: _tiny_llama(), ["qkv"], "model type 'llama' offers no fusion"),
    ],
)
def test_fuse_errors(make, fusions, match):
    model = make()
    if not hasattr(model, "config"):
        model.config = type("Config", (), {"model_type": "linear"})()
    with pytest.raises(ValueError, match=match):
        fuse_for_inference(model, fusions)


def test_relu_models_still_fuse_qkv():
    model = tiny_model("bert", hidden_act="relu")
    expected = logits(model, tiny_batch())
    assert fuse_for_inference(model, ["qkv"]) == {"qkv": 3}
    torch.testing.assert_close(logits(model, tiny_batch()), expected, atol=1e-5, rtol=1e-5)


def test_linear_gelu_op_registration():
    """The custom op's schema and fake kernel agree with its real kernel (exact GELU on a CPU)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
    torch.library.opcheck(_linear_gelu, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_linear_gelu(x, w, b), torch.nn.functional.gelu(x @ w.T + b))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_model_on_cuda_matches_within_the_gelu_approximation(compiled):
    """On CUDA the epilogue computes tanh-GELU (|error| <= 5e-4 per activation) and TorchInductor keeps it."""
    model = tiny_model("roberta", seed=1).cuda()
    model.set_attn_implementation("sdpa")
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    expected = logits(model, batch)
    fuse_for_inference(model)
    forward = torch.compile(model, dynamic=False) if compiled else model
    torch.testing.assert_close(logits(forward, batch), expected, atol=5e-3, rtol=5e-3)
    if not compiled:  # under autograd the epilogue is skipped: exact GELU again, and gradients flow
        torch.testing.assert_close(forward(**batch).logits, expected, atol=1e-5, rtol=1e-5)
