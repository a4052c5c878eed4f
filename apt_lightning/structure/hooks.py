"""The forward hooks every family installs: head / neuron masks at their sites, skipped sublayers, and
the common steps of removing masks and starting a compaction."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from apt_lightning.structure.masks import MaskedLayerNorm, MaskedRMSNorm, PruningMasks
from apt_lightning.structure.slicing import SliceLog


class MaskHooks:
    """Hook handles of one structure. The hooks are partials of bound methods, not closures:
    `copy.deepcopy` of a masked model then binds the copy's hooks to the copy's structure and masks (a
    closure would keep reading the original's)."""

    def __init__(self, structure) -> None:
        self.structure = structure
        self.handles: list = []

    def mask_input(self, module: nn.Module, kind: str, layer: int) -> None:
        """Multiply the input of `module` by the head (channels of each head) or neuron mask of `layer`."""
        self.handles.append(module.register_forward_pre_hook(functools.partial(self._mask, kind, layer)))

    def _mask(self, kind: str, layer: int, module: nn.Module, args: tuple) -> tuple:
        x, masks = args[0], self.structure.masks
        if masks.enabled and not (masks.head_full if kind == "head" else masks.neuron_full)[layer]:
            m = masks.get(kind, layer).to(x.dtype)
            x = x * (m.repeat_interleave(self.structure.head_dim) if kind == "head" else m)
        if masks.observing():
            masks.observer.observe(kind, layer, x)
        return (x, *args[1:])

    def observe_branch(self, module: nn.Module, index: int) -> None:
        """Show an observer that asks for it (`observes_branches`) the first input of `module`, a branch
        that reads the hidden state beside the residual stream (a post-norm encoder's attention block or
        FFN), as kind "branch". The module then computes on a view of its input, its own autograd node, so
        the gradient there is the branch's alone, not the total at the norm output."""
        self.handles.append(module.register_forward_pre_hook(functools.partial(self._branch, index)))

    def _branch(self, index: int, module: nn.Module, args: tuple) -> tuple | None:
        masks = self.structure.masks
        if not (masks.observing() and getattr(masks.observer, "observes_branches", False)):
            return None
        x = args[0].view_as(args[0])
        masks.observer.observe("branch", index, x)
        return (x, *args[1:])

    def skip_output(self, module: nn.Module, kind: str, layer: int, skipped: Callable) -> None:
        """While every head (neuron) of `layer` is masked to 0, `module` returns `skipped(args, output)`:
        what the compacted model's stand-in for the removed sublayer returns."""
        self.handles.append(module.register_forward_hook(functools.partial(self._skip, kind, layer, skipped)))

    def _skip(self, kind: str, layer: int, skipped: Callable, module: nn.Module, args: tuple, output):
        masks = self.structure.masks
        if masks.enabled and (masks.head_zero if kind == "head" else masks.neuron_zero)[layer]:
            return skipped(args, output)
        return output

    def drop(self, *modules: nn.Module) -> None:
        """Remove the hooks of modules about to be replaced: their handles would otherwise point at freed
        hook dicts, and `copy.deepcopy` of the model (export) fails on such dead handles."""
        dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        keep = []
        for handle in self.handles:
            if any(handle.hooks_dict_ref() is d for d in dicts):
                handle.remove()
            else:
                keep.append(handle)
        self.handles = keep

    def remove_all(self, model: nn.Module) -> None:
        """Drop every hook, restore plain norms and delete `model.apt_masks` (for export)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, MaskedLayerNorm):
                    setattr(module, name, child.to_layernorm())
                elif isinstance(child, MaskedRMSNorm):
                    setattr(module, name, child.to_norm())
        if hasattr(model, "apt_masks"):
            del model.apt_masks


def new_masks(model: nn.Module, heads: list[int], neurons: list[int], hidden: int, device) -> PruningMasks:
    """All-ones masks at these widths, attached as `model.apt_masks` (saved in checkpoints)."""
    masks = PruningMasks(heads, neurons, hidden).to(device)
    model.apt_masks = masks
    return masks


def start_compaction(model: nn.Module, masks: PruningMasks | None):
    """Check that masks are installed and hard; return the slice log and a `cut(module, ops)` recorder."""
    if masks is None:
        raise RuntimeError("compact() needs installed masks (call install_masks first)")
    if not masks.is_hard():
        raise ValueError("compact() needs hard 0/1 masks; finish the mask-decay window first")
    names = {m: n for n, m in model.named_modules()}
    log = SliceLog()

    def cut(module: nn.Module, ops: list) -> None:
        log.record(names[module], ops)

    return log, cut


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channel indices of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def residual_input(args: tuple, output):
    """A skipped BERT output block returns its residual input (the second argument)."""
    return args[1]
