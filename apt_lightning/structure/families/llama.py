"""LLaMA-type decoders (LLaMA, Mistral and Qwen2 share this layout; transformers' `*ForCausalLM` and
`*ForSequenceClassification`).

Per layer: `self_attn.{q,k,v,o}_proj` with grouped-query attention (query heads in groups sharing one
key/value head), `mlp.{gate,up,down}_proj` (SwiGLU), pre-norm RMSNorms `input_layernorm` and
`post_attention_layernorm`; then a final `model.norm` read by `lm_head` (often tied to the input
embedding) or by the classifier `score`.

Blocks and costs per hidden dim: a query head 2 d_h (q rows, o columns), a key/value head 2 d_h (k and v
rows; removed once its group has no query head left), a SwiGLU neuron 3 (gate and up rows, down column).
The hidden mask sits on the output of every RMSNorm (the input of each sublayer and of the head): the
residual stream is only ever read through those norms, which compute their statistics over kept dims,
so masked and compacted models agree without touching the residual adds. Hidden-mask sites: 2i is layer
i's attention input, 2i+1 its FFN input, 2L the final norm.

After compaction, a layer whose KV groups kept equal numbers of query heads is plain GQA
(`num_key_value_groups` = that number). A layer with unequal groups gets an index mapping each query head
to its KV head (`apt_kv_index`) and the attention function `apt_grouped_kv`, which gathers k/v per query
head before the model's own attention implementation; the cache still holds only the kept KV heads.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

from apt_lightning.structure.base import ModelShapes, UnitCosts, first_n, register_family
from apt_lightning.structure.common import FamilyStructure
from apt_lightning.structure.hooks import head_channels, new_masks
from apt_lightning.structure.masks import MaskedRMSNorm, PruningMasks
from apt_lightning.structure.slicing import slice_embedding, slice_layernorm, slice_linear

GROUPED_ATTENTION = "apt_grouped_kv"


class SkippedSelfAttention(nn.Module):
    """Stands in for an attention block with every query head removed: adds nothing to the residual
    stream, but still appends an empty (zero-head) key/value entry to the cache, so the cache length that
    generation reads from any layer stays right."""

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for an FFN with every neuron removed: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _zero_attention(args: tuple, output: tuple) -> tuple:
    return (torch.zeros_like(output[0]), *output[1:])


def _zero_output(args: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


class _GroupedConfigView:
    """The model's config as one attention layer sees it: every attribute the model's, except the attention
    implementation, which is `apt_grouped_kv` (it then calls the model's own implementation)."""

    _attn_implementation = GROUPED_ATTENTION

    def __init__(self, config) -> None:
        object.__setattr__(self, "_model_config", config)

    def __getattr__(self, name: str):
        if name == "_model_config":
            raise AttributeError(name)
        return getattr(self._model_config, name)


def _grouped_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Each query head reads the key/value head of its own group (`module.apt_kv_index`), then the model's
    configured attention runs with one query head per key/value head."""
    from transformers import AttentionInterface

    index = module.apt_kv_index
    key, value = key.index_select(1, index), value.index_select(1, index)
    name = module.config._model_config._attn_implementation
    if name == "eager" or name is None:
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = AttentionInterface._global_mapping[name]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, _grouped_attention)


_register_grouped_attention()


def _preset(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool):
    def build(num_labels: int = 2):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=ffn,
            vocab_size=vocab,
            max_position_embeddings=8192,
            tie_word_embeddings=tied,
            num_labels=num_labels,
            pad_token_id=0,
        )

    return build


@register_family
class LlamaStructure(FamilyStructure):
    """Masks and compaction for LLaMA-type decoders (see `PrunableStructure` and the module docstring)."""

    model_types = ("llama", "mistral", "qwen2")
    default_adapter_targets = ["q_proj", "v_proj"]
    head_modules = ["score"]
    presets = {
        "smollm2-135m": _preset(30, 576, 9, 3, 1536, 49152, tied=True),
        "llama-3.2-1b": _preset(16, 2048, 32, 8, 8192, 128256, tied=True),
        "llama-7b": _preset(32, 4096, 32, 32, 11008, 32000, tied=False),
    }
    fusions = ()

    def fuse(self, fusions: list[str]) -> dict[str, int]:
        raise ValueError("the LLaMA family offers no inference fusions")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.model
        self.layers = self.base.layers
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.costs = UnitCosts(head=2 * self.head_dim, kv_head=2 * self.head_dim, neuron=3)
        # the KV head of each query head, per layer, read from the modules (a compacted model's layout
        # lives there), then kept in step with compaction
        self.head_groups = [self._read_head_groups(layer) for layer in self.layers]
        self._start()

    # ----------------------------------------------------------------- structure queries
    def _read_head_groups(self, layer: nn.Module) -> list[int]:
        if not self._has_attention(layer):
            return []
        att = layer.self_attn
        index = getattr(att, "apt_kv_index", None)
        if index is not None:
            return index.tolist()
        per_group = att.num_key_value_groups
        return [h // per_group for h in range(att.q_proj.out_features // self.head_dim)]

    def _has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(layer.self_attn, SkippedSelfAttention)

    def _has_ffn(self, layer: nn.Module) -> bool:
        return not isinstance(layer.mlp, SkippedMLP)

    def hidden_consumer(self) -> nn.Linear:
        """The Linear that reads the final norm's output: the LM head or the classifier."""
        head = getattr(self.model, "lm_head", None)
        return head if head is not None else self.model.score

    def _tied(self) -> bool:
        return self.hidden_consumer().weight is self.base.embed_tokens.weight

    def shapes(self) -> ModelShapes:
        heads, neurons, groups = [], [], []
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                counts = Counter(self.head_groups[i])
                groups.append([counts[g] for g in range(max(counts) + 1)])
            else:
                groups.append([])
            heads.append(sum(groups[-1]))
            neurons.append(layer.mlp.gate_proj.out_features if self._has_ffn(layer) else 0)
        return self._shapes(heads, neurons, self.base.embed_tokens.embedding_dim, groups)

    def exact_param_count(self) -> int:
        """Every parameter inside the decoder layers and the final norm."""
        return sum(p.numel() for p in self.layers.parameters()) + self.base.norm.weight.numel()

    def head_output_weight(self, layer: int) -> torch.Tensor | None:
        mod = self.layers[layer]
        return mod.self_attn.o_proj.weight if self._has_attention(mod) else None

    def ffn_output_weight(self, layer: int) -> torch.Tensor | None:
        mod = self.layers[layer]
        return mod.mlp.down_proj.weight if self._has_ffn(mod) else None

    def hidden_input_weights(self) -> list[tuple[int, torch.Tensor]]:
        """(mask site feeding it, weight) for every Linear that reads a masked norm's output."""
        out = []
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                att = layer.self_attn
                out += [(2 * i, att.q_proj.weight), (2 * i, att.k_proj.weight), (2 * i, att.v_proj.weight)]
            if self._has_ffn(layer):
                out += [(2 * i + 1, layer.mlp.gate_proj.weight), (2 * i + 1, layer.mlp.up_proj.weight)]
        out.append((2 * len(self.layers), self.hidden_consumer().weight))
        return out

    def branch_input_sites(self) -> set[int]:
        """Every mask site: pre-norm, so each norm output is read by one branch (attention, FFN, the head)
        and never by the residual stream; the gradient there is already the branch's."""
        return set(range(2 * len(self.layers) + 1))

    # ----------------------------------------------------------------- masks
    def install_masks(self) -> PruningMasks:
        """Attach all-ones masks (`model.apt_masks`), swap RMSNorms for masked ones, add the hooks."""
        if self.masks is not None:
            return self.masks
        s = self.shapes()
        device = self.base.embed_tokens.weight.device
        masks = self.masks = new_masks(self.model, s.heads, s.neurons, s.hidden, device)
        for i, layer in enumerate(self.layers):
            layer.input_layernorm = MaskedRMSNorm(layer.input_layernorm, masks, 2 * i)
            layer.post_attention_layernorm = MaskedRMSNorm(layer.post_attention_layernorm, masks, 2 * i + 1)
            if self._has_attention(layer):
                self.hooks.mask_input(layer.self_attn.o_proj, "head", i)
                self.hooks.skip_output(layer.self_attn, "head", i, _zero_attention)
            if self._has_ffn(layer):
                self.hooks.mask_input(layer.mlp.down_proj, "neuron", i)
                self.hooks.skip_output(layer.mlp, "neuron", i, _zero_output)
        self.base.norm = MaskedRMSNorm(self.base.norm, masks, 2 * len(self.layers))
        return masks

    # ----------------------------------------------------------------- compaction
    def _compact_hidden(self, hid: torch.Tensor, cut) -> None:
        """Hidden dims leave the embedding, every norm and the head; tied embeddings stay tied. (A KV head
        goes once its group has no query head left: `_compact_attention`.)"""
        tied, emb, consumer = self._tied(), self.base.embed_tokens, self.hidden_consumer()
        cut(emb, slice_embedding(emb, hid))
        if tied:
            consumer.weight = emb.weight
            consumer.in_features = emb.embedding_dim
        else:
            cut(consumer, slice_linear(consumer, in_index=hid))
        for norm in (self.base.norm, *(n for lay in self.layers for n in self._norms(lay))):
            cut(norm, slice_layernorm(norm, hid))

    @staticmethod
    def _norms(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.input_layernorm, layer.post_attention_layernorm

    def _compact_attention(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None:
        masks, att = self.masks, layer.self_attn
        if masks.head_zero[i]:
            self.hooks.drop(att, att.o_proj)
            layer.self_attn = SkippedSelfAttention(att.layer_idx, self.head_dim)
            self.head_groups[i] = []
            return
        q_chan = kv_chan = None
        if not masks.head_full[i]:
            heads = masks.kept("head", i).cpu()
            groups = [self.head_groups[i][h] for h in heads.tolist()]
            alive = sorted(set(groups))
            q_chan = head_channels(heads, self.head_dim)
            if len(alive) < max(self.head_groups[i]) + 1:
                kv_chan = head_channels(torch.tensor(alive), self.head_dim)
            self.head_groups[i] = [alive.index(g) for g in groups]
        if q_chan is None and hid is None:
            return
        cut(att.q_proj, slice_linear(att.q_proj, out_index=q_chan, in_index=hid))
        for proj in (att.k_proj, att.v_proj):
            cut(proj, slice_linear(proj, out_index=kv_chan, in_index=hid))
        cut(att.o_proj, slice_linear(att.o_proj, out_index=hid, in_index=q_chan))
        self._set_grouping(att, self.head_groups[i])

    def _set_grouping(self, att: nn.Module, groups: list[int]) -> None:
        """Plain GQA when every KV head serves as many query heads as the others; else gathering attention."""
        counts = set(Counter(groups).values())
        if len(counts) == 1:
            att.num_key_value_groups = counts.pop()
            if isinstance(att.config, _GroupedConfigView):
                att.config = att.config._model_config
            if hasattr(att, "apt_kv_index"):
                del att.apt_kv_index
            return
        att.num_key_value_groups = 1
        if not isinstance(att.config, _GroupedConfigView):
            att.config = _GroupedConfigView(att.config)
        index = torch.tensor(groups, dtype=torch.long, device=att.q_proj.weight.device)
        att.register_buffer("apt_kv_index", index, persistent=False)

    def _compact_ffn(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None:
        masks, mlp = self.masks, layer.mlp
        if masks.neuron_zero[i]:
            self.hooks.drop(mlp, mlp.down_proj)
            layer.mlp = SkippedMLP()
            return
        neurons = None if masks.neuron_full[i] else masks.kept("neuron", i)
        if neurons is None and hid is None:
            return
        for proj in (mlp.gate_proj, mlp.up_proj):
            cut(proj, slice_linear(proj, out_index=neurons, in_index=hid))
        cut(mlp.down_proj, slice_linear(mlp.down_proj, out_index=hid, in_index=neurons))

    def _reshape_heads(self, masks: PruningMasks, shapes: ModelShapes, current: ModelShapes) -> None:
        """Keep the first query heads of each saved KV group (groups beyond the saved ones go)."""
        for i in range(shapes.num_layers):
            want, have = shapes.kv_groups[i], current.kv_groups[i]
            if len(want) > len(have):
                raise ValueError(f"KV groups of layer {i}: {len(want)} exceeds the model's {len(have)}")
            keep = [
                first_n(want[g] if g < len(want) else 0, n, f"query heads of KV group {g} in layer {i}")
                for g, n in enumerate(have)
            ]
            masks.set("head", torch.cat(keep) if keep else torch.zeros(0), i)
