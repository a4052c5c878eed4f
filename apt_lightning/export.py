"""Export a trained APT model as a small, plain transformers model, and load it back.

`export_pruned` merges the adapters, removes pruned blocks physically, drops the masks and writes a
folder with `save_pretrained` weights, the tokenizer and a sidecar (`apt_shapes.json`) holding the
per-layer widths. `load_pruned` rebuilds the same transformers class at those widths in any process.
`apt-export` turns a training checkpoint into such a folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from apt_lightning.adapters import merge_adapters
from apt_lightning.structure import ModelShapes, get_structure

SIDECAR = "apt_shapes.json"
FORMAT_VERSION = 2  # 2: shapes carry the family's unit costs and KV groups


def compact_for_inference(model: nn.Module) -> nn.Module:
    """Merge adapters, compact hard masks, remove masks: the model left is a plain transformers model."""
    merge_adapters(model)
    structure = get_structure(model)
    if structure.masks is not None:
        if not structure.masks.is_hard():
            raise ValueError(
                "the model's pruning masks are fractional (mid decay window); export after they are hard"
            )
        structure.compact()
        structure.remove_masks()
    return model


def export_pruned(model: nn.Module, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `folder` atomically (a temporary folder renamed into place). `model` is left untouched."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"export folder {folder} exists; pass overwrite=True (--overwrite) to replace it"
        )
    model = compact_for_inference(copy.deepcopy(model)).eval()
    structure = get_structure(model)
    shapes = structure.shapes()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sidecar = {
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "shapes": shapes.to_dict(),
            "apt_param_count": shapes.counted_params(),
            "full_apt_param_count": shapes.full().counted_params(),
            "encoder_param_count": structure.exact_param_count(),
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the exported transformers model at its pruned widths and load its weights (eval mode)."""
    folder = Path(folder)
    sidecar_path = folder / SIDECAR
    if not sidecar_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {SIDECAR}: not a folder written by apt-export / export_pruned"
        )
    sidecar = json.loads(sidecar_path.read_text())
    cls = getattr(transformers, sidecar["model_class"], None)
    if cls is None:
        raise ValueError(f"{SIDECAR} names model class {sidecar['model_class']!r}, unknown to transformers")
    model = cls(AutoConfig.from_pretrained(folder))
    structure = get_structure(model)
    shapes = dict(sidecar["shapes"])
    shapes.setdefault("costs", structure.costs)  # format 1 (BERT only) had no costs in the sidecar
    structure.reshape(ModelShapes.from_dict(shapes))
    state = load_file(str(folder / "model.safetensors"))
    expected = model.state_dict()
    bad = [
        f"{k}: sidecar shape {tuple(expected[k].shape)}, weights {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    missing = sorted(set(expected) - set(state) - _non_persistent(model) - _tied_copies(model, state))
    unexpected = sorted(set(state) - set(expected))  # e.g. weights of a sublayer the sidecar says is skipped
    if bad or missing or unexpected:
        raise ValueError(
            f"{folder}: {SIDECAR} disagrees with model.safetensors: "
            + "; ".join(
                bad[:5] + [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
            )
        )
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


def _tied_copies(model: nn.Module, present) -> set[str]:
    """Names of parameters that share their tensor with a saved one (tied embeddings are saved once)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {n for names in by_tensor.values() if any(m in present for m in names) for n in names}


def _non_persistent(model: nn.Module) -> set[str]:
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() for b in m._non_persistent_buffers_set}


def module_from_checkpoint(path: str | Path):
    """Rebuild an `APTModule` from a Lightning checkpoint at its saved shapes and ranks (student only)."""
    from apt_lightning.module import APTModule

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    # LightningCLI adds _class_path / _instantiator to the saved hyperparameters
    module = APTModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    apt_state = {
        k: v for k, v in ckpt.get("apt", {}).items() if k != "teacher"
    }  # the teacher is not exported
    module.on_load_checkpoint({"apt": apt_state, "state_dict": ckpt["state_dict"]})
    state = {k[len("student.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    module.student.load_state_dict(state)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="apt-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by apt-fit")
    parser.add_argument("output", help="folder to write (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} not found")
    module = module_from_checkpoint(args.checkpoint)
    from apt_lightning.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(module.hparams.backbone))
    out = export_pruned(module.student, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
    sidecar = json.loads((out / SIDECAR).read_text())
    kept = sidecar["apt_param_count"] / sidecar["full_apt_param_count"]
    print(f"exported to {out}: {kept:.1%} of the counted encoder parameters kept")


if __name__ == "__main__":
    main()
