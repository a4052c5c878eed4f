"""BERT-like encoders (BERT, RoBERTa and the packaged MiniLM share this layout).

Per layer: `attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
`intermediate.dense`, `output.{dense,LayerNorm}`; embeddings end in a LayerNorm; the first consumer of
the hidden state after the encoder is the pooler's dense layer (BERT) or the classification head's
dense layer (RoBERTa).
"""

from __future__ import annotations

import torch
from torch import nn

from apt_lightning.structure.base import ModelShapes, UnitCosts, first_n, register_family
from apt_lightning.structure.common import FamilyStructure
from apt_lightning.structure.hooks import (
    head_channels,
    new_masks,
    residual_input,
)
from apt_lightning.structure.masks import MaskedLayerNorm, PruningMasks
from apt_lightning.structure.slicing import slice_embedding, slice_layernorm, slice_linear


class SkippedAttention(nn.Module):
    """Stands in for an attention block with every head removed: the sublayer is the identity."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states, None


class SkippedFFNOutput(nn.Module):
    """Stands in for the FFN output block when every neuron is removed: returns the residual input."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


def _preset(
    cls_name: str,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    vocab: int,
    positions: int,
    types: int,
    **extra,
):
    def build(num_labels: int = 2):
        import transformers

        return getattr(transformers, cls_name)(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            vocab_size=vocab,
            max_position_embeddings=positions,
            type_vocab_size=types,
            num_labels=num_labels,
            **extra,
        )

    return build


@register_family
class BertStructure(FamilyStructure):
    """Masks and compaction for BERT-like encoders (see `PrunableStructure`).

    Costs per hidden dim: a head 4 d_h (its q, k, v rows and o columns), a GELU FFN neuron 2 (its FFN-in
    row and FFN-out column)."""

    model_types = ("bert", "roberta")
    default_adapter_targets = ["query", "value", "intermediate.dense"]
    head_modules = ["classifier", "pooler"]
    presets = {
        "roberta-base": _preset("RobertaConfig", 768, 12, 12, 3072, 50265, 514, 1, pad_token_id=1),
        "bert-base": _preset("BertConfig", 768, 12, 12, 3072, 30522, 512, 2),
        "minilm-l6": _preset("BertConfig", 384, 6, 12, 1536, 30522, 512, 2),
    }
    fusions = ("qkv", "gelu")

    def fuse(self, fusions: list[str]) -> dict[str, int]:
        """Inference fusions (`apt_lightning.fusion`): one Q/K/V product, GELU in the FFN epilogue."""
        from apt_lightning.structure.families.bert_fusion import fuse_bert

        return fuse_bert(self.model, fusions)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.base_model
        self.layers = self.base.encoder.layer
        config = model.config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.costs = UnitCosts(head=4 * self.head_dim, kv_head=0, neuron=2)
        self._start()

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
        return self._shapes(heads, neurons, self.base.embeddings.word_embeddings.embedding_dim)

    def exact_param_count(self) -> int:
        """Every parameter inside the encoder layers: the APT count plus biases and LayerNorms."""
        return sum(p.numel() for p in self.layers.parameters())

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

    def branch_input_sites(self) -> set[int]:
        """Mask sites whose norm output only a branch reads: the last (the pooler or classifier reads it).
        Every other site also feeds the residual stream; its readers, the attention block (branch 2i) and
        the FFN (2i + 1) of each layer, report their own inputs (`MaskHooks.observe_branch`)."""
        return {self.hidden_input_weights()[-1][0]}

    # ----------------------------------------------------------------- masks
    def install_masks(self) -> PruningMasks:
        """Attach all-ones masks (`model.apt_masks`), swap LayerNorms for masked ones, add the hooks."""
        if self.masks is not None:
            return self.masks
        s = self.shapes()
        device = self.base.embeddings.word_embeddings.weight.device
        masks = self.masks = new_masks(self.model, s.heads, s.neurons, s.hidden, device)
        emb = self.base.embeddings
        emb.LayerNorm = MaskedLayerNorm.from_layernorm(emb.LayerNorm, masks, 0)
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                out = layer.attention.output
                out.LayerNorm = MaskedLayerNorm.from_layernorm(out.LayerNorm, masks, 2 * i + 1)
                self.hooks.mask_input(out.dense, "head", i)
                self.hooks.skip_output(out, "head", i, residual_input)
                self.hooks.observe_branch(layer.attention.self, 2 * i)
            if self._has_ffn(layer):
                out = layer.output
                out.LayerNorm = MaskedLayerNorm.from_layernorm(out.LayerNorm, masks, 2 * i + 2)
                self.hooks.mask_input(out.dense, "neuron", i)
                self.hooks.skip_output(out, "neuron", i, residual_input)
                self.hooks.observe_branch(layer.intermediate, 2 * i + 1)
        return masks

    # ----------------------------------------------------------------- compaction
    def _compact_hidden(self, hid: torch.Tensor, cut) -> None:
        emb = self.base.embeddings
        for e in (emb.word_embeddings, emb.position_embeddings, getattr(emb, "token_type_embeddings", None)):
            if e is not None:
                cut(e, slice_embedding(e, hid))
        cut(emb.LayerNorm, slice_layernorm(emb.LayerNorm, hid))
        consumer = self.hidden_consumer()
        cut(consumer, slice_linear(consumer, in_index=hid))

    def _compact_attention(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None:
        masks = self.masks
        if masks.head_zero[i]:
            self.hooks.drop(layer.attention.output, layer.attention.output.dense, layer.attention.self)
            layer.attention = SkippedAttention()
            return
        att, out = layer.attention.self, layer.attention.output
        chan = None
        if not masks.head_full[i]:
            heads = masks.kept("head", i)
            chan = head_channels(heads, self.head_dim)
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
            self.hooks.drop(layer.output, layer.output.dense, layer.intermediate)
            layer.intermediate, layer.output = nn.Identity(), SkippedFFNOutput()
            return
        neurons = None if masks.neuron_full[i] else masks.kept("neuron", i)
        if neurons is None and hid is None:
            return
        cut(layer.intermediate.dense, slice_linear(layer.intermediate.dense, out_index=neurons, in_index=hid))
        cut(layer.output.dense, slice_linear(layer.output.dense, out_index=hid, in_index=neurons))
        if hid is not None:
            cut(layer.output.LayerNorm, slice_layernorm(layer.output.LayerNorm, hid))

    def _reshape_heads(self, masks: PruningMasks, shapes: ModelShapes, current: ModelShapes) -> None:
        for i in range(shapes.num_layers):
            masks.set("head", first_n(shapes.heads[i], current.heads[i], f"heads of layer {i}"), i)
