"""Models pruned with APT (apt-lightning), loadable with `from_pretrained(folder, trust_remote_code=True)`.

Each class is the transformers class of its family. `__init__` builds the model at the unpruned sizes of
the configuration, then cuts it to the widths in `config.apt_widths` (the pruned model keeps the first
blocks; the saved weights were compacted the same way), so the saved state dict loads with no missing or
unexpected keys:

- ``hidden``: the size of the residual stream (embeddings, norms, every input and output projection);
- ``heads`` / ``kv_groups``: query heads per layer, and for grouped-query attention the query heads kept in
  each surviving key/value group; a layer with no head left skips its attention sublayer;
- ``neurons``: FFN neurons per layer; a layer with none skips its FFN sublayer.

A decoder layer whose KV groups kept unequal numbers of query heads gathers, for each query head, the
key/value head of its group before the model's own attention implementation runs.

This file is copied into every exported folder: it imports only torch and transformers.
"""

import sys

import torch
from torch import nn
from transformers import (
    AutoModel,
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    RobertaForSequenceClassification,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .configuration_apt_pruned import (
    AptPrunedBertConfig,
    AptPrunedLlamaConfig,
    AptPrunedMistralConfig,
    AptPrunedQwen2Config,
    AptPrunedRobertaConfig,
)

GATHER_ATTENTION = "apt_pruned_gather_kv"


# ------------------------------------------------------------------------------ new modules at given sizes
def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    w = old.weight
    return nn.Linear(n_in, n_out, bias=old.bias is not None, device=w.device, dtype=w.dtype)


def _embedding(old: nn.Embedding, dim: int) -> nn.Embedding:
    w = old.weight
    return nn.Embedding(old.num_embeddings, dim, padding_idx=old.padding_idx, device=w.device, dtype=w.dtype)


def _layernorm(old: nn.LayerNorm, dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=old.eps, device=old.weight.device, dtype=old.weight.dtype)


def _rmsnorm(old: nn.Module, dim: int) -> nn.Module:
    return type(old)(dim, eps=old.variance_epsilon).to(device=old.weight.device, dtype=old.weight.dtype)


# ------------------------------------------------------------------------------ BERT-like encoders
class SkippedAttention(nn.Module):
    """An attention block with every head removed: the sublayer is the identity."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


class SkippedFFNOutput(nn.Module):
    """The FFN output block of a layer with every neuron removed: returns the residual input."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


def cut_encoder(model: nn.Module, widths: dict) -> None:
    """Cut a BERT / RoBERTa model built at its unpruned sizes to `widths`."""
    base, hidden, dh = model.base_model, widths["hidden"], widths["head_dim"]
    emb = base.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if getattr(emb, name, None) is not None:
            setattr(emb, name, _embedding(getattr(emb, name), hidden))
    emb.LayerNorm = _layernorm(emb.LayerNorm, hidden)
    for layer, heads, neurons in zip(base.encoder.layer, widths["heads"], widths["neurons"], strict=True):
        if heads == 0:
            layer.attention = SkippedAttention()
        else:
            att, out = layer.attention.self, layer.attention.output
            att.num_attention_heads, att.all_head_size = heads, heads * dh
            for name in ("query", "key", "value"):
                setattr(att, name, _linear(getattr(att, name), hidden, heads * dh))
            out.dense = _linear(out.dense, heads * dh, hidden)
            out.LayerNorm = _layernorm(out.LayerNorm, hidden)
        if neurons == 0:
            layer.intermediate, layer.output = nn.Identity(), SkippedFFNOutput()
        else:
            layer.intermediate.dense = _linear(layer.intermediate.dense, hidden, neurons)
            layer.output.dense = _linear(layer.output.dense, neurons, hidden)
            layer.output.LayerNorm = _layernorm(layer.output.LayerNorm, hidden)
    # the first reader of the final hidden state: the pooler (BERT), the head's dense layer (RoBERTa)
    pooler, head = getattr(base, "pooler", None), getattr(model, "classifier", None)
    owner = pooler if pooler is not None else head if hasattr(head, "dense") else None
    if owner is not None:
        owner.dense = _linear(owner.dense, hidden, owner.dense.out_features)
    elif isinstance(head, nn.Linear):
        model.classifier = _linear(head, hidden, head.out_features)


# ------------------------------------------------------------------------------ LLaMA-type decoders
class SkippedSelfAttention(nn.Module):
    """An attention block with every query head removed: adds nothing to the residual stream, but appends an
    empty (zero-head) key/value entry to the cache, so the cache length generation reads stays right."""

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An FFN with every neuron removed: adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class GatherConfigView:
    """The model's configuration as one attention layer with uneven KV groups sees it: every attribute the
    model's, except the attention implementation, which gathers k/v per query head first."""

    _attn_implementation = GATHER_ATTENTION

    def __init__(self, config) -> None:
        object.__setattr__(self, "model_config", config)

    def __getattr__(self, name: str):
        if name == "model_config":
            raise AttributeError(name)
        return getattr(self.model_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.model_config, name, value)


def gather_kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Each query head reads the key/value head of its own group (`module.apt_kv_heads`), then the model's
    configured attention runs with one query head per key/value head."""
    index = torch.tensor(module.apt_kv_heads, dtype=torch.long, device=key.device)
    key, value = key.index_select(1, index), value.index_select(1, index)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(module.config.model_config._attn_implementation, eager)
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(GATHER_ATTENTION, gather_kv_attention)


def cut_decoder(model: nn.Module, widths: dict) -> None:
    """Cut a LLaMA / Mistral / Qwen2 model built at its unpruned sizes to `widths` (tied embeddings stay
    tied)."""
    base, hidden, dh = model.model, widths["hidden"], widths["head_dim"]
    base.embed_tokens = _embedding(base.embed_tokens, hidden)
    base.norm = _rmsnorm(base.norm, hidden)
    for i, layer in enumerate(base.layers):
        layer.input_layernorm = _rmsnorm(layer.input_layernorm, hidden)
        layer.post_attention_layernorm = _rmsnorm(layer.post_attention_layernorm, hidden)
        groups = [n for n in widths["kv_groups"][i] if n > 0]
        att, heads = layer.self_attn, sum(groups)
        if heads == 0:
            layer.self_attn = SkippedSelfAttention(att.layer_idx, dh)
        else:
            att.q_proj = _linear(att.q_proj, hidden, heads * dh)
            att.k_proj = _linear(att.k_proj, hidden, len(groups) * dh)
            att.v_proj = _linear(att.v_proj, hidden, len(groups) * dh)
            att.o_proj = _linear(att.o_proj, heads * dh, hidden)
            if len(set(groups)) == 1:  # plain grouped-query attention
                att.num_key_value_groups = groups[0]
            else:
                att.num_key_value_groups = 1
                att.apt_kv_heads = [g for g, n in enumerate(groups) for _ in range(n)]
                att.config = GatherConfigView(att.config)
        neurons = widths["neurons"][i]
        if neurons == 0:
            layer.mlp = SkippedMLP()
        else:
            mlp = layer.mlp
            mlp.gate_proj = _linear(mlp.gate_proj, hidden, neurons)
            mlp.up_proj = _linear(mlp.up_proj, hidden, neurons)
            mlp.down_proj = _linear(mlp.down_proj, neurons, hidden)
    head = getattr(model, "lm_head", None)
    if head is not None:
        model.lm_head = _linear(head, hidden, head.out_features)
        if getattr(model.config, "tie_word_embeddings", False):
            model.lm_head.weight = base.embed_tokens.weight
    else:
        model.score = _linear(model.score, hidden, model.score.out_features)


# ------------------------------------------------------------------------------ the model classes
_BACKBONES: dict = {}


def register_backbone(config_class: type, model_class: type) -> None:
    """Sequence classification of decoders builds its backbone with `AutoModel.from_config(config)`: make
    the configuration class, as transformers loaded it (each folder's files are a module of their own),
    known to AutoModel."""
    if config_class not in _BACKBONES:
        backbone = type(f"AptPruned{model_class.__name__}", (model_class,), {"config_class": config_class})
        AutoModel.register(config_class, backbone, exist_ok=True)
        _BACKBONES[config_class] = backbone


class AptPrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = AptPrunedBertConfig

    def __init__(self, config):
        super().__init__(config)
        cut_encoder(self, config.apt_widths)


class AptPrunedRobertaForSequenceClassification(RobertaForSequenceClassification):
    config_class = AptPrunedRobertaConfig

    def __init__(self, config):
        super().__init__(config)
        cut_encoder(self, config.apt_widths)


class AptPrunedLlamaForSequenceClassification(LlamaForSequenceClassification):
    config_class = AptPrunedLlamaConfig

    def __init__(self, config):
        register_backbone(type(config), LlamaModel)
        super().__init__(config)
        cut_decoder(self, config.apt_widths)


class AptPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = AptPrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        cut_decoder(self, config.apt_widths)


class AptPrunedMistralForSequenceClassification(MistralForSequenceClassification):
    config_class = AptPrunedMistralConfig

    def __init__(self, config):
        register_backbone(type(config), MistralModel)
        super().__init__(config)
        cut_decoder(self, config.apt_widths)


class AptPrunedMistralForCausalLM(MistralForCausalLM):
    config_class = AptPrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        cut_decoder(self, config.apt_widths)


class AptPrunedQwen2ForSequenceClassification(Qwen2ForSequenceClassification):
    config_class = AptPrunedQwen2Config

    def __init__(self, config):
        register_backbone(type(config), Qwen2Model)
        super().__init__(config)
        cut_decoder(self, config.apt_widths)


class AptPrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = AptPrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        cut_decoder(self, config.apt_widths)
