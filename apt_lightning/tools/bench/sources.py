"""Where `apt-bench`'s timed models come from: an exported folder, a training checkpoint (adapters merged,
pruned blocks removed), or an architecture (`--backbone`, `--preset`, `--config-json`) pruned here by the
project's block search; the dense reference beside each."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure import preset_config
from apt_lightning.tools.bench.models import (
    PRESETS,
    config_from_json,
    dense_like,
    is_causal_lm,
    model_from_config,
)


def source_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The transformers config of --backbone / --preset / --config-json."""
    if args.preset:
        return preset_config(args.preset)
    if args.config_json:
        return config_from_json(args.config_json)
    from transformers import AutoConfig

    from apt_lightning.backbone import BackboneNotFoundError, resolve_backbone

    try:
        path = resolve_backbone(args.backbone)
    except BackboneNotFoundError as err:
        hint = f"; for its shapes offline use --preset {args.backbone}" if args.backbone in PRESETS else ""
        parser.error(f"{err}{hint}")
    return AutoConfig.from_pretrained(path, num_labels=2)


def load_models(
    parser: argparse.ArgumentParser, args: argparse.Namespace, kind: str | None
) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The dense reference first, then the pruned model(s); plus pruning records per pruned model. `kind`
    None: a checkpoint's, whatever it holds."""
    records: dict[str, dict] = {}
    torch.manual_seed(args.seed)  # random weights (presets, --random-weights), hence the pruned structure
    if args.model_dir or args.checkpoint:
        if args.model_dir:
            from apt_lightning.export import load_pruned

            pruned, name = load_pruned(args.model_dir), Path(args.model_dir).name
        else:
            from apt_lightning.export import compact_for_inference, module_from_checkpoint

            pruned, name = (
                compact_for_inference(module_from_checkpoint(args.checkpoint).student),
                Path(args.checkpoint).stem,
            )
        if name == "dense":  # the reference's name
            name = f"dense ({'model-dir' if args.model_dir else 'checkpoint'})"
        if kind is not None and (kind == "causal-lm") != is_causal_lm(pruned):
            parser.error(f"--model-kind {kind}: {name} holds a {type(pruned).__name__}")
        pruned.set_attn_implementation(args.attn)
        return {"dense": dense_like(pruned, args.attn), name: pruned.eval()}, records
    causal = kind == "causal-lm"
    config = source_config(parser, args)
    if args.backbone and not args.random_weights:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from apt_lightning.backbone import resolve_backbone

        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        kw = {} if causal else {"num_labels": 2}
        dense = auto.from_pretrained(
            resolve_backbone(args.backbone), attn_implementation=args.attn, dtype=torch.float32, **kw
        ).eval()
    else:
        dense = model_from_config(config, args.attn, causal_lm=causal)
    models = {"dense": dense}
    for s in args.sparsity:
        model = copy.deepcopy(dense)
        record = prune_to_sparsity(model, s, args.scorer, args.multiple_of, args.even_kv_groups)
        name = f"pruned {s:g}" + (f" (x{args.multiple_of})" if args.multiple_of > 1 else "")
        name += " (even KV groups)" if args.even_kv_groups else ""
        models[name], records[name] = model.eval(), record
    return models, records
