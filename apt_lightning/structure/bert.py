"""BERT-like encoders (BERT, RoBERTa and the packaged MiniLM share this layout).

Per layer: `attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
`intermediate.dense`, `output.{dense,LayerNorm}`; embeddings end in a LayerNorm; the first consumer of
the hidden state after the encoder is the pooler's dense layer (BERT) or the classification head's
dense layer (RoBERTa).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from apt_lightning.structure.base import ModelShapes, register_family
from apt_lightning.structure.masks import MaskedLayerNorm, PruningMasks
from apt_lightning.structure.slicing import SliceLog, slice_embedding, slice_layernorm, slice_linear


class SkippedAttention(nn.Module):
    """Stands in for an attention block with every head removed: the sublayer is the identity."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states, None


class SkippedFFNOutput(nn.Module):
    """Stands in for the FFN output block when every neuron is removed: returns the residual input."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


@register_family("bert", "roberta")
class BertStructure:
    """Masks and compaction for BERT-like encoders (see `PrunableStructure`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.base_model
        self.layers = self.base.encoder.layer
        config = model.config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.masks: PruningMasks | None = None
        self._hooks: list = []
        self._full = None
        self._full = self.shapes()

    # ----------------------------------------------------------------- structure queries
    def _has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(layer.attention, SkippedAttention)

    def _has_ffn(self, layer: nn.Module) -> bool:
        return not isinstance(layer.output, SkippedFFNOutput)

    def hidden_consumer(self) -> nn.Linear:
        """The first Linear that reads the final hidden state (its input columns follow hidden pruning)."""
        pooler = getattr(self.base, "pooler", None)
        if pooler is not None:
            return pooler.dense
        head = self.model.classifier
        return head.dense if hasattr(head, "dense") else head

    def shapes(self) -> ModelShapes:
        heads, neurons = [], []
        for layer in self.layers:
            heads.append(
                layer.attention.self.query.out_features // self.head_dim if self._has_attention(layer) else 0
            )
            neurons.append(layer.intermediate.dense.out_features if self._has_ffn(layer) else 0)
        hidden = self.base.embeddings.word_embeddings.embedding_dim
        full = self._full
        if full is None:
            return ModelShapes(heads, neurons, hidden, self.head_dim)
        return ModelShapes(
            heads, neurons, hidden, self.head_dim, full.full_heads, full.full_neurons, full.full_hidden
        )

    def head_output_weight(self, layer: int) -> torch.Tensor | None:
        mod = self.layers[layer]
        return mod.attention.output.dense.weight if self._has_attention(mod) else None

    def ffn_output_weight(self, layer: int) -> torch.Tensor | None:
        mod = self.layers[layer]
        return mod.output.dense.weight if self._has_ffn(mod) else None

    def hidden_input_weights(self) -> list[tuple[int, torch.Tensor]]:
        """(mask site feeding it, weight) for every Linear whose input is the hidden state. Sites are the
        masked LayerNorms: 0 after the embeddings, 2i+1 after layer i's attention, 2i+2 after its FFN; a
        skipped sublayer has no LayerNorm, so the next reader takes the last site before it."""
        out, site = [], 0
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                att = layer.attention.self
                out += [(site, att.query.weight), (site, att.key.weight), (site, att.value.weight)]
                site = 2 * i + 1
            if self._has_ffn(layer):
                out.append((site, layer.intermediate.dense.weight))
                site = 2 * i + 2
        out.append((site, self.hidden_consumer().weight))
        return out

    # ----------------------------------------------------------------- masks
    def install_masks(self) -> PruningMasks:
        """Attach all-ones masks (`model.apt_masks`), swap LayerNorms for masked ones, add the hooks."""
        if self.masks is not None:
            return self.masks
        s = self.shapes()
        masks = PruningMasks(s.heads, s.neurons, s.hidden).to(
            self.base.embeddings.word_embeddings.weight.device
        )
        self.model.apt_masks = masks
        self.masks = masks
        emb = self.base.embeddings
        emb.LayerNorm = MaskedLayerNorm.from_layernorm(emb.LayerNorm, masks, 0)
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                out = layer.attention.output
                out.LayerNorm = MaskedLayerNorm.from_layernorm(out.LayerNorm, masks, 2 * i + 1)
                self._hooks.append(out.dense.register_forward_pre_hook(self._mask_hook("head", i)))
                self._hooks.append(out.register_forward_hook(self._skip_hook("head", i)))
            if self._has_ffn(layer):
                out = layer.output
                out.LayerNorm = MaskedLayerNorm.from_layernorm(out.LayerNorm, masks, 2 * i + 2)
                self._hooks.append(out.dense.register_forward_pre_hook(self._mask_hook("neuron", i)))
                self._hooks.append(out.register_forward_hook(self._skip_hook("neuron", i)))
        return masks

    # The hooks are partials of bound methods, not closures: `copy.deepcopy` of a masked model then binds
    # the copy's hooks to the copy's structure and masks (a closure would keep reading the original's).
    def _mask_hook(self, kind: str, layer: int):
        return functools.partial(self._apply_mask, kind, layer)

    def _apply_mask(self, kind: str, layer: int, module: nn.Module, args: tuple) -> tuple:
        x, masks = args[0], self.masks
        if masks.enabled and not (masks.head_full if kind == "head" else masks.neuron_full)[layer]:
            m = masks.get(kind, layer).to(x.dtype)
            x = x * (m.repeat_interleave(self.head_dim) if kind == "head" else m)
        if masks.observing():
            masks.observer.observe(kind, layer, x)
        return (x, *args[1:])

    def _skip_hook(self, kind: str, layer: int):
        return functools.partial(self._apply_skip, kind, layer)

    def _apply_skip(self, kind: str, layer: int, module: nn.Module, args: tuple, output: torch.Tensor):
        masks = self.masks
        if masks.enabled and (masks.head_zero if kind == "head" else masks.neuron_zero)[layer]:
            return args[1]  # the residual input: the sublayer is skipped
        return output

    def _drop_hooks(self, *modules: nn.Module) -> None:
        """Remove the mask hooks of modules about to be replaced: their handles would otherwise point at
        freed hook dicts, and `copy.deepcopy` of the model (export) fails on such dead handles."""
        dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        keep = []
        for handle in self._hooks:
            if any(handle.hooks_dict_ref() is d for d in dicts):
                handle.remove()
            else:
                keep.append(handle)
        self._hooks = keep

    def remove_masks(self) -> None:
        """Drop hooks and masks and restore plain LayerNorms (for export)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module in list(self.model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, MaskedLayerNorm):
                    setattr(module, name, child.to_layernorm())
        if hasattr(self.model, "apt_masks"):
            del self.model.apt_masks
        self.masks = None

    # ----------------------------------------------------------------- compaction
    def compact(self) -> SliceLog:
        """Physically remove every block whose mask is 0; masks must be hard (0/1). Returns the slice log."""
        masks = self.masks
        if masks is None:
            raise RuntimeError("compact() needs installed masks (call install_masks first)")
        if not masks.is_hard():
            raise ValueError("compact() needs hard 0/1 masks; finish the mask-decay window first")
        names = {m: n for n, m in self.model.named_modules()}
        log = SliceLog()

        def cut(module: nn.Module, ops: list) -> None:
            log.record(names[module], ops)

        hid = None if masks.hidden_full else masks.kept("hidden")
        if hid is not None:
            emb = self.base.embeddings
            for e in (
                emb.word_embeddings,
                emb.position_embeddings,
                getattr(emb, "token_type_embeddings", None),
            ):
                if e is not None:
                    cut(e, slice_embedding(e, hid))
            cut(emb.LayerNorm, slice_layernorm(emb.LayerNorm, hid))
            consumer = self.hidden_consumer()
            cut(consumer, slice_linear(consumer, in_index=hid))
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                self._compact_attention(i, layer, hid, cut)
            if self._has_ffn(layer):
                self._compact_ffn(i, layer, hid, cut)
        s = self.shapes()
        masks.resize(s.heads, s.neurons, s.hidden)
        return log

    def _compact_attention(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None:
        masks = self.masks
        if masks.head_zero[i]:
            self._drop_hooks(layer.attention.output, layer.attention.output.dense)
            layer.attention = SkippedAttention()
            return
        att, out = layer.attention.self, layer.attention.output
        chan = None
        if not masks.head_full[i]:
            heads = masks.kept("head", i)
            chan = (
                heads[:, None] * self.head_dim + torch.arange(self.head_dim, device=heads.device)
            ).flatten()
            att.num_attention_heads = len(heads)
            att.all_head_size = len(chan)
        if chan is None and hid is None:
            return
        for proj in (att.query, att.key, att.value):
            cut(proj, slice_linear(proj, out_index=chan, in_index=hid))
        cut(out.dense, slice_linear(out.dense, out_index=hid, in_index=chan))
        if hid is not None:
            cut(out.LayerNorm, slice_layernorm(out.LayerNorm, hid))

    def _compact_ffn(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None:
        masks = self.masks
        if masks.neuron_zero[i]:
            self._drop_hooks(layer.output, layer.output.dense)
            layer.intermediate, layer.output = nn.Identity(), SkippedFFNOutput()
            return
        neurons = None if masks.neuron_full[i] else masks.kept("neuron", i)
        if neurons is None and hid is None:
            return
        cut(layer.intermediate.dense, slice_linear(layer.intermediate.dense, out_index=neurons, in_index=hid))
        cut(layer.output.dense, slice_linear(layer.output.dense, out_index=hid, in_index=neurons))
        if hid is not None:
            cut(layer.output.LayerNorm, slice_layernorm(layer.output.LayerNorm, hid))

    def reshape(self, shapes: ModelShapes) -> None:
        """Cut a freshly built model to `shapes` (keeping the first blocks): the skeleton a saved state
        dict of a compacted model is then loaded into."""
        current = self.shapes()
        if current.num_layers != shapes.num_layers:
            raise ValueError(
                f"shapes describe {shapes.num_layers} layers, the model has {current.num_layers}"
            )
        had_masks = self.masks is not None
        masks = self.install_masks()

        def first(n: int, total: int, what: str) -> torch.Tensor:
            if n > total:
                raise ValueError(f"{what}: {n} exceeds the model's {total}")
            return (torch.arange(total) < n).float()

        for i in range(shapes.num_layers):
            masks.set("head", first(shapes.heads[i], current.heads[i], f"heads of layer {i}"), i)
            masks.set("neuron", first(shapes.neurons[i], current.neurons[i], f"neurons of layer {i}"), i)
        masks.set("hidden", first(shapes.hidden, current.hidden, "hidden size"))
        self.compact()
        self._full = ModelShapes(
            self.shapes().heads,
            self.shapes().neurons,
            shapes.hidden,
            self.head_dim,
            shapes.full_heads,
            shapes.full_neurons,
            shapes.full_hidden,
        )
        if not had_masks:
            self.remove_masks()
