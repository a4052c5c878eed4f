"""The models apt-bench times: transformers configs from presets or config.json files, the dense reference
of a pruned model, and a model's widths and parameter counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from apt_lightning.structure import get_structure, preset_names

PRESETS = tuple(preset_names())


def config_from_json(path: str | Path, num_labels: int = 2):
    """A transformers config from a config.json file (or a folder holding one); needs `model_type`."""
    from transformers import AutoConfig

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; it must be a transformers config.json")
    if "num_labels" not in data and "id2label" not in data:
        data["num_labels"] = num_labels
    return AutoConfig.for_model(model_type, **data)


def is_causal_lm(model: Any) -> bool:
    """Whether `model` (a transformers model, or its config) is a causal LM: the model's class, or the
    config's `architectures` (what `save_pretrained` records), ends in ``ForCausalLM``."""
    if isinstance(model, nn.Module):
        return type(model).__name__.endswith("ForCausalLM")
    return any(str(a).endswith("ForCausalLM") for a in getattr(model, "architectures", None) or [])


def model_from_config(config, attn: str = "sdpa", causal_lm: bool = False) -> nn.Module:
    """Random weights of `config`: a sequence classifier, or with `causal_lm` a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    return auto.from_config(config, attn_implementation=attn).eval()


def dense_like(model: nn.Module, attn: str = "sdpa") -> nn.Module:
    """The same architecture at full width, random weights: the reference a pruned model is timed against."""
    return model_from_config(copy.deepcopy(model.config), attn, causal_lm=is_causal_lm(model))


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and widths of a (possibly compacted) model."""
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    try:
        s = get_structure(model).shapes()
    except ValueError:
        return info
    kept, full = s.counted_params(), s.full().counted_params()
    info.update(
        {
            "apt_params": kept,
            "apt_params_full": full,
            "sparsity": 1.0 - kept / full,
            "heads_per_layer": s.heads,
            "neurons_per_layer": s.neurons,
            "hidden": s.hidden,
        }
    )
    return info


def alignment_warning(name: str, info: dict[str, Any], multiple: int = 8) -> str | None:
    """A warning for a model (as :func:`describe` gives it) whose FFN widths or hidden size are not
    multiples of `multiple`: tensor-core matrix products run far slower on such shapes (docs/bench.md,
    "Alignment matters"). None when every width is aligned or the widths are unknown."""
    widths = [*info.get("neurons_per_layer", ()), *([info["hidden"]] if "hidden" in info else [])]
    odd = sorted({w for w in widths if w % multiple})
    if not odd:
        return None
    listed = ", ".join(map(str, odd[:6])) + (" ..." if len(odd) > 6 else "")
    what = f"width {listed} is not a multiple" if len(odd) == 1 else f"widths {listed} are not multiples"
    return (
        f'{name}: {what} of {multiple}, where GPU matrix products run slower (docs/bench.md, "Alignment '
        f'matters"); prune with --multiple-of {multiple} (training: pruning.multiple_of; Torch-Pruning '
        "peers: round_to)"
    )


def warn_unaligned(infos: dict[str, dict[str, Any]], stream: TextIO) -> list[str]:
    """Write :func:`alignment_warning` for every timed model but the first (the dense reference, whose
    widths are the architecture's) to `stream`; returns the warnings."""
    warnings = [w for name, info in list(infos.items())[1:] if (w := alignment_warning(name, info))]
    for warning in warnings:
        print(f"apt-bench: warning: {warning}", file=stream)
    return warnings


def unpadded_attention(model: nn.Module) -> str:
    """Switch `model` to an unpadded variant of its attention implementation (the same attention function,
    a mask function that returns None) and return the variant's name. Only for inputs without padding."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    impl = model.config._attn_implementation
    if impl.startswith("unpadded_"):
        return impl
    if impl not in AttentionInterface._global_mapping:  # "eager" lives in each model's own module
        raise ValueError(
            f"attention implementation {impl!r} cannot be captured in a CUDA graph here; "
            f"use one of {sorted(AttentionInterface._global_mapping)} (e.g. sdpa)"
        )
    name = f"unpadded_{impl}"
    AttentionInterface.register(name, AttentionInterface._global_mapping[impl])
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    model.set_attn_implementation(name)
    return name
