"""What every family's structure does the same way: shapes with the full widths attached, the order of a
compaction, removing masks, and cutting a fresh model to saved shapes. A family subclasses `FamilyStructure`
and supplies the architecture: where widths are read, how the hidden dims, a layer's attention and its FFN
are sliced, and which heads a saved layout keeps."""

from __future__ import annotations

import torch
from torch import nn

from apt_lightning.structure.base import ModelShapes, UnitCosts, first_n
from apt_lightning.structure.hooks import MaskHooks, start_compaction
from apt_lightning.structure.masks import PruningMasks
from apt_lightning.structure.slicing import SliceLog


class FamilyStructure:
    """Base of the family structures (see `PrunableStructure` for the protocol). Subclasses set `model`,
    `layers`, `head_dim` and `costs`, then call `_start()`."""

    model: nn.Module
    layers: nn.ModuleList
    head_dim: int
    costs: UnitCosts

    def _start(self) -> None:
        self.masks: PruningMasks | None = None
        self.hooks = MaskHooks(self)
        self._full: ModelShapes | None = None
        self._full = self.shapes()

    # ----------------------------------------------------------------- supplied by the family
    def shapes(self) -> ModelShapes: ...

    def install_masks(self) -> PruningMasks: ...

    def _has_attention(self, layer: nn.Module) -> bool: ...

    def _has_ffn(self, layer: nn.Module) -> bool: ...

    def _compact_hidden(self, hid: torch.Tensor, cut) -> None: ...

    def _compact_attention(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None: ...

    def _compact_ffn(self, i: int, layer: nn.Module, hid: torch.Tensor | None, cut) -> None: ...

    def _reshape_heads(self, masks: PruningMasks, shapes: ModelShapes, current: ModelShapes) -> None: ...

    # ----------------------------------------------------------------- shared
    def _shapes(self, heads: list[int], neurons: list[int], hidden: int, kv_groups=()) -> ModelShapes:
        """Current widths with the family's costs and the full (unpruned) widths attached."""
        full = self._full
        if full is None:
            return ModelShapes(heads, neurons, hidden, self.head_dim, self.costs, list(kv_groups))
        return ModelShapes(
            heads,
            neurons,
            hidden,
            self.head_dim,
            self.costs,
            list(kv_groups),
            full.full_heads,
            full.full_neurons,
            full.full_hidden,
            full.full_kv_groups,
        )

    def remove_masks(self) -> None:
        """Drop hooks and masks and restore plain norms (for export)."""
        self.hooks.remove_all(self.model)
        self.masks = None

    def compact(self) -> SliceLog:
        """Physically remove every block whose mask is 0; masks must be hard (0/1). Returns the slice log."""
        masks = self.masks
        log, cut = start_compaction(self.model, masks)
        hid = None if masks.hidden_full else masks.kept("hidden")
        if hid is not None:
            self._compact_hidden(hid, cut)
        for i, layer in enumerate(self.layers):
            if self._has_attention(layer):
                self._compact_attention(i, layer, hid, cut)
            if self._has_ffn(layer):
                self._compact_ffn(i, layer, hid, cut)
        s = self.shapes()
        masks.resize(s.heads, s.neurons, s.hidden)
        return log

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
        self._reshape_heads(masks, shapes, current)
        for i in range(shapes.num_layers):
            masks.set("neuron", first_n(shapes.neurons[i], current.neurons[i], f"neurons of layer {i}"), i)
        masks.set("hidden", first_n(shapes.hidden, current.hidden, "hidden size"))
        self.compact()
        self._full = shapes
        if not had_masks:
            self.remove_masks()
