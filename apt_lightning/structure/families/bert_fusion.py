"""The BERT family's inference-time fusions (BERT, RoBERTa, MiniLM): fewer, larger kernels per layer.

- `qkv`: one matrix product for the query, key and value projections instead of three (the same function:
  the weights concatenated; results agree up to floating-point rounding, as another matrix-product kernel
  may run). A pruned layer's three products are narrow (heads x d_h columns each) and use the GPU poorly;
  the fused one is three times wider.
- `gelu`: the FFN's first projection and its GELU in one cuBLASLt call (bias + GELU epilogue), so the wide
  FFN activation is written once instead of written, read and written again. On CUDA the epilogue computes
  the tanh approximation of GELU: for models trained with exact GELU ("gelu") each activation differs by at
  most 5e-4, below bf16's resolution for values above 0.13. On CPU, or where gradients are needed (the
  epilogue has no backward), the model's own activation runs.

Fusion is for serving. Apply it to a merged, compacted model (after `apt-export` / `compact_for_inference`):
pruning needs the original module layout, so fuse last; and save the unfused model (the fused one's state
dict has `qkv` keys that `from_pretrained` does not know). `apt-bench --fuse` fuses the dense reference and
the pruned models alike. Called through `apt_lightning.fusion.fuse_for_inference`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("qkv", "gelu")
_GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


class FusedSelfAttention(nn.Module):
    """BERT-style self-attention whose Q/K/V projections are one `nn.Linear` (outputs stacked q, k, v);
    attention runs through the model's configured implementation, like the module it replaces. Built
    through `fused_attention(attn)`, whose class also subclasses the replaced one: transformers records
    `output_attentions` from modules of that class."""

    def __init__(self, attn: nn.Module) -> None:
        nn.Module.__init__(self)  # not the replaced class's __init__: it would build q, k and v again
        q, k, v = attn.query, attn.key, attn.value
        for name in ("config", "attention_head_size", "scaling", "is_causal", "dropout"):
            setattr(self, name, getattr(attn, name))
        for name in ("num_attention_heads", "all_head_size", "layer_idx", "is_decoder"):
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        self._eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.train(attn.training)  # a new module starts in training mode: attention dropout would run

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None or cache is not None or past_key_values is not None:
            raise ValueError("FusedSelfAttention is for encoder self-attention: no cross-attention or cache")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        b, t, _ = hidden_states.shape
        q, k, v = (
            self.qkv(hidden_states)
            .view(b, t, 3, -1, self.attention_head_size)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._eager
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return out.reshape(b, t, -1).contiguous(), weights


@functools.cache
def _fused_class(cls: type[nn.Module]) -> type[FusedSelfAttention]:
    return type(f"Fused{cls.__name__}", (FusedSelfAttention, cls), {"__module__": __name__})


def fused_attention(attn: nn.Module) -> FusedSelfAttention:
    """`attn` (a BERT-style self-attention) with its Q/K/V projections fused; see `FusedSelfAttention`."""
    return _take_over_hooks(attn, _fused_class(type(attn))(attn))


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _take_over_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give `new` the forward hooks of the module it replaces: transformers installs its output-recording
    hooks (`output_attentions`) once per model, at the first forward, so a module swapped in later would
    otherwise be skipped; users' own hooks carry over too."""
    for name in _HOOK_DICTS:
        getattr(new, name).update(getattr(old, name))
    return new


# the schema spelled out: older torch cannot read it from postponed (string) annotations
@torch.library.custom_op(
    "apt_lightning::linear_gelu", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor"
)
def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias + x @ weight.T, then GELU, in one cuBLASLt call. Registered as an op so that TorchInductor keeps
    the call whole instead of splitting it back into a matrix product and a pointwise kernel."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@_linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class LinearGelu(nn.Module):
    """A BERT-style FFN input block (`dense` then GELU) with the GELU in the matrix product's epilogue on
    CUDA without gradients (tanh approximation, module docstring); otherwise the model's own activation."""

    def __init__(self, intermediate: nn.Module) -> None:
        super().__init__()
        self.dense = intermediate.dense
        self.act = intermediate.intermediate_act_fn
        self.train(intermediate.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w, b = self.dense.weight, self.dense.bias
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or w.requires_grad)
        if not hidden_states.is_cuda or needs_grad:
            return self.act(F.linear(hidden_states, w, b))
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return _linear_gelu(flat, w, b).view(*hidden_states.shape[:-1], w.shape[0])


def fuse_bert(model: nn.Module, fusions: list[str]) -> dict[str, int]:
    """Replace, in place, each layer's Q/K/V projections (`qkv`) and FFN input + GELU (`gelu`) by fused
    modules (module docstring). Returns how many modules each fusion replaced; layers whose attention or
    FFN was pruned away entirely have nothing to fuse. Raises ValueError for decoders and for `gelu` on a
    model whose activation is not GELU."""
    config = model.config
    layers = model.base_model.encoder.layer
    if getattr(config, "is_decoder", False):
        raise ValueError("fuse_for_inference is for encoders; this model's config has is_decoder=True")
    act = getattr(config, "hidden_act", None)
    if "gelu" in fusions and act not in _GELUS:
        raise ValueError(
            f"the 'gelu' fusion needs a GELU activation ({', '.join(_GELUS)}); got hidden_act {act!r}"
        )
    done = dict.fromkeys(fusions, 0)
    for layer in layers:
        attn = getattr(layer.attention, "self", None)
        if "qkv" in fusions and all(
            isinstance(getattr(attn, n, None), nn.Linear) for n in ("query", "key", "value")
        ):
            layer.attention.self = fused_attention(attn)
            done["qkv"] += 1
        inter = layer.intermediate
        if (
            "gelu" in fusions
            and not isinstance(inter, LinearGelu)
            and isinstance(getattr(inter, "dense", None), nn.Linear)
        ):
            layer.intermediate = LinearGelu(inter)
            done["gelu"] += 1
    return done
