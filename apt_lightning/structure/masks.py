"""Pruning masks for heads, FFN neurons and hidden dimensions, and the masked LayerNorm they need.

Mask semantics (docs/method.md section 3), for values m in [0, 1]:
- head mask m_h multiplies head h's context vector before the attention output projection;
- neuron mask m_j multiplies FFN activation j before the FFN output projection;
- hidden mask m_k multiplies dimension k of the embedding output and of every sublayer output, and
  LayerNorm statistics are the m-weighted mean and variance over dimensions (for 0/1 masks: over the
  kept dimensions only), so a masked model equals the physically compacted one.
- a layer whose heads (neurons) are all exactly 0 skips that sublayer: its output is its input.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MaskObserver(Protocol):
    """Receives the masked tensors at every mask site during training (e.g. a salience scorer)."""

    def observe(self, kind: str, index: int, tensor: torch.Tensor) -> None: ...


class PruningMasks(nn.Module):
    """Per-layer head and neuron masks and one shared hidden mask, kept as buffers so they are saved in
    checkpoints and follow the model across devices. Python-side flags (all ones / all zeros) avoid a
    device sync per forward."""

    def __init__(self, heads: list[int], neurons: list[int], hidden: int) -> None:
        super().__init__()
        self.num_layers = len(heads)
        self.enabled = True
        self.observer: MaskObserver | None = None
        for layer, (h, f) in enumerate(zip(heads, neurons, strict=True)):
            self.register_buffer(f"head_{layer}", torch.ones(h))
            self.register_buffer(f"neuron_{layer}", torch.ones(f))
        self.register_buffer("hidden", torch.ones(hidden))
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())
        self.refresh()

    def head(self, layer: int) -> torch.Tensor:
        return getattr(self, f"head_{layer}")

    def neuron(self, layer: int) -> torch.Tensor:
        return getattr(self, f"neuron_{layer}")

    def get(self, kind: str, layer: int | None = None) -> torch.Tensor:
        return self.hidden if kind == "hidden" else getattr(self, f"{kind}_{layer}")

    def set(self, kind: str, values: torch.Tensor, layer: int | None = None) -> None:
        """Replace one mask after checking its length and range. Values given on the CPU are checked there,
        so setting a mask of a model on a GPU costs a host-to-device copy and no device sync."""
        if kind not in ("head", "neuron", "hidden"):
            raise ValueError(f"unknown mask kind {kind!r}; allowed: head, neuron, hidden")
        if kind != "hidden" and (layer is None or not 0 <= int(layer) < self.num_layers):
            raise ValueError(f"{kind} mask needs a layer in [0, {self.num_layers}), got {layer!r}")
        current = self.get(kind, layer)
        values = torch.as_tensor(values, dtype=current.dtype)
        where = f"{kind} mask" + (f" of layer {layer}" if kind != "hidden" else "")
        if values.shape != current.shape:
            raise ValueError(f"{where} must have length {current.numel()}, got shape {tuple(values.shape)}")
        full = zero = True  # an empty mask (a removed sublayer) is both
        if values.numel():
            lo, hi = (v.item() for v in torch.aminmax(values))
            if not 0 <= lo <= hi <= 1:  # also false for NaN
                raise ValueError(f"{where} values must lie in [0, 1], got min {lo:g}, max {hi:g}")
            if kind == "hidden" and hi == 0:
                raise ValueError("cannot prune every hidden dimension: the model would have no width left")
            full, zero = lo == 1, hi == 0
        current.copy_(values)
        if kind == "hidden":
            self.hidden_full = full
        else:
            getattr(self, f"{kind}_full")[layer] = full
            getattr(self, f"{kind}_zero")[layer] = zero

    def refresh(self) -> None:
        """Recompute the Python-side flags from the buffers (after loading or resizing)."""

        def flags(t: torch.Tensor) -> tuple[bool, bool]:
            return bool((t == 1).all()), bool((t == 0).all())

        heads = [flags(self.head(i)) for i in range(self.num_layers)]
        neurons = [flags(self.neuron(i)) for i in range(self.num_layers)]
        self.head_full, self.head_zero = [f for f, _ in heads], [z for _, z in heads]
        self.neuron_full, self.neuron_zero = [f for f, _ in neurons], [z for _, z in neurons]
        self.hidden_full = flags(self.hidden)[0]

    def is_hard(self) -> bool:
        return all(((t == 0) | (t == 1)).all() for t in self.buffers())

    def kept(self, kind: str, layer: int | None = None) -> torch.Tensor:
        return torch.nonzero(self.get(kind, layer) > 0).flatten()

    def resize(self, heads: list[int], neurons: list[int], hidden: int) -> None:
        """Reset to all-ones masks of new sizes (after compaction)."""
        device = self.hidden.device
        for layer, (h, f) in enumerate(zip(heads, neurons, strict=True)):
            setattr(self, f"head_{layer}", torch.ones(h, device=device))
            setattr(self, f"neuron_{layer}", torch.ones(f, device=device))
        self.hidden = torch.ones(hidden, device=device)
        self.refresh()

    def sizes(self) -> dict:
        return {
            "heads": [self.head(i).numel() for i in range(self.num_layers)],
            "neurons": [self.neuron(i).numel() for i in range(self.num_layers)],
            "hidden": self.hidden.numel(),
        }

    def observing(self) -> bool:
        return self.observer is not None and torch.is_grad_enabled()


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are weighted by the hidden mask and whose output is multiplied by it."""

    def __init__(self, normalized_shape: int, eps: float, masks: PruningMasks, site: int, **kw) -> None:
        super().__init__(normalized_shape, eps=eps, **kw)
        object.__setattr__(self, "masks", masks)  # shared, not a submodule: saved once, by the model
        self.site = site

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, masks: PruningMasks, site: int) -> MaskedLayerNorm:
        new = cls(ln.normalized_shape[0], ln.eps, masks, site, device=ln.weight.device, dtype=ln.weight.dtype)
        new.weight, new.bias = ln.weight, ln.bias
        return new

    def to_layernorm(self) -> nn.LayerNorm:
        ln = nn.LayerNorm(
            self.normalized_shape[0], eps=self.eps, device=self.weight.device, dtype=self.weight.dtype
        )
        ln.weight, ln.bias = self.weight, self.bias
        return ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.masks
        if not masks.enabled or masks.hidden_full:
            out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            m = masks.hidden.to(x.dtype)
            total = m.sum()
            mean = (x * m).sum(-1, keepdim=True) / total
            var = ((x - mean).pow(2) * m).sum(-1, keepdim=True) / total
            out = ((x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias) * m
        if masks.observing():
            masks.observer.observe("hidden", self.site, out)
        return out


class MaskedRMSNorm(nn.Module):
    """RMSNorm (LLaMA, Mistral, Qwen2: weight * x / rms(x), computed in fp32) whose mean square is
    weighted by the hidden mask and whose output is multiplied by it; `to_norm` gives the original back."""

    def __init__(self, norm: nn.Module, masks: PruningMasks, site: int) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        object.__setattr__(self, "masks", masks)  # shared, not a submodule: saved once, by the model
        object.__setattr__(self, "norm_class", type(norm))
        self.site = site

    def to_norm(self) -> nn.Module:
        norm = self.norm_class(self.weight.shape[0], eps=self.eps)
        norm.weight = self.weight
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks, dtype = self.masks, x.dtype
        h = x.float()
        if not masks.enabled or masks.hidden_full:
            out = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        else:
            m = masks.hidden.float()
            var = (h.pow(2) * m).sum(-1, keepdim=True) / m.sum()
            out = self.weight * (h * torch.rsqrt(var + self.eps)).to(dtype) * m.to(dtype)
        if masks.observing():
            masks.observer.observe("hidden", self.site, out)
        return out
