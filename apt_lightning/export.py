"""Export a trained APT model as a small, plain transformers model, and load it back.

`export_pruned` merges the adapters, removes pruned blocks physically, drops the masks and writes a
folder with `save_pretrained` weights, the tokenizer and a sidecar (`apt_shapes.json`) holding the
per-layer widths. `load_pruned` rebuilds the same transformers class at those widths in any process.
`apt-export` turns a training checkpoint into such a folder.

The folder is also a Hugging Face model folder of a custom architecture (`apt_lightning.export_remote`):
`AutoModelFor...from_pretrained(folder, trust_remote_code=True)` and `pipeline(..., trust_remote_code=True)`
load it without apt-lightning, through the self-contained modeling files copied into it; its config.json
names a model type of its own, so that without `trust_remote_code` transformers refuses it. It carries the
task's label names, a model card (README.md) and the modes a folder gets under the umask.

The folder is written under a hidden temporary name beside it (``.<name>.apt-tmp.<host>.<pid>.<random>``)
and renamed into place, so a reader never sees half an export. An export that is killed leaves its
temporary folder behind; the next export into the same parent folder removes every such folder whose
process (on this machine) is no longer alive.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from apt_lightning import export_remote
from apt_lightning.adapters import merge_adapters
from apt_lightning.files import make_temp_dir, remove_stale_temp_dirs
from apt_lightning.structure import ModelShapes, get_structure

SIDECAR = "apt_shapes.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: shapes carry the family's unit costs and KV groups
READABLE_VERSIONS = (1, 2)  # 1: BERT only, no unit costs in the sidecar (the family's are used)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ExportFormatError(ValueError):
    """An export folder that `load_pruned` cannot read: the message names the folder, the file and why."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint written by apt-fit: the message names the file and why."""


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


def export_pruned(
    model: nn.Module,
    folder: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    *,
    labels: Sequence[str] | None = None,
    training: dict | str | None = None,
    command: str | None = None,
) -> Path:
    """Write `folder` atomically (a temporary folder renamed into place). `model` is left untouched.

    `labels`: the class names (the task's), written as `id2label` / `label2id`; `training` (the run's
    hyperparameters, or its config.yaml text) and `command` go into the model card."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"export folder {folder} exists; pass overwrite=True (--overwrite) to replace it"
        )
    if labels is not None and len(labels) != model.config.num_labels:
        raise ValueError(f"{len(labels)} label names {list(labels)}; the model has {model.config.num_labels}")
    model = compact_for_inference(copy.deepcopy(model)).eval()
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    structure = get_structure(model)
    shapes = structure.shapes()
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(folder.parent)  # left by exports that were killed
    tmp = make_temp_dir(folder)
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
        config = export_remote.write_remote_code(tmp, sidecar["model_class"], shapes)
        (tmp / "README.md").write_text(export_remote.model_card(config, sidecar, training, command))
        export_remote.make_readable(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_pruned(folder: str | Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Rebuild the exported transformers model at its pruned widths and load its weights (eval mode).

    `dtype`: a floating torch dtype or one of the strings in `DTYPES` (float32, fp16, bf16, ...). Raises
    `ExportFormatError` (a ValueError) naming the folder and file when the sidecar is unreadable, of a
    format this install does not read, or disagrees with the weights, and when a weight is not floating
    point or holds NaN / inf.
    """
    folder = Path(folder)
    dtype = _as_dtype(dtype)
    sidecar = _read_sidecar(folder)
    cls = getattr(transformers, sidecar["model_class"], None)
    if cls is None:
        raise ValueError(f"{SIDECAR} names model class {sidecar['model_class']!r}, unknown to transformers")
    model = cls(_read_config(folder, cls))
    structure = get_structure(model)
    shapes = dict(sidecar["shapes"])
    shapes.setdefault("costs", structure.costs)  # format 1 (BERT only) had no costs in the sidecar
    try:
        parsed = ModelShapes.from_dict(shapes)
    except (TypeError, ValueError) as err:
        raise ExportFormatError(f"{folder / SIDECAR}: 'shapes' is not valid: {err}") from err
    structure.reshape(parsed)
    state = _read_weights(folder)
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
            f"{folder}: {SIDECAR} disagrees with {WEIGHTS}: "
            + "; ".join(
                bad[:5] + [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
            )
        )
    _check_values(folder, state, expected)
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(
        f"load_pruned: dtype {dtype!r} is not supported; use a floating torch dtype or one of "
        + ", ".join(DTYPES)
    )


def _read_sidecar(folder: Path) -> dict:
    """The sidecar, checked: valid JSON, a version this install reads, a model class and shapes."""
    path = folder / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {SIDECAR}: not a folder written by apt-export / export_pruned"
        )
    where = f"{folder}: {SIDECAR}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ExportFormatError(f"{where} cannot be read: {err}") from err
    if not text.strip():
        raise ExportFormatError(f"{where} is empty (an interrupted copy?); export the model again")
    try:
        sidecar = json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{where} is not valid JSON (truncated or corrupted?): {err}") from err
    if not isinstance(sidecar, dict):
        raise ExportFormatError(f"{where} holds a {type(sidecar).__name__}, not the sidecar's JSON object")
    version = sidecar.get("format_version")
    if version not in READABLE_VERSIONS:
        said = "has no format_version" if version is None else f"has format_version {version!r}"
        newer = isinstance(version, int) and version > max(READABLE_VERSIONS)
        raise ExportFormatError(
            f"{where} {said}; this install of apt-lightning reads versions "
            + ", ".join(map(str, READABLE_VERSIONS))
            + (" (it was written by a newer apt-lightning: upgrade to load it)" if newer else "")
        )
    for key, kind in (("model_class", str), ("shapes", dict)):
        if key not in sidecar:
            raise ExportFormatError(
                f"{where} has no {key!r}: not a complete sidecar (export the model again)"
            )
        if not isinstance(sidecar[key], kind):
            raise ExportFormatError(
                f"{where}: {key!r} is a {type(sidecar[key]).__name__}, not a {kind.__name__}"
            )
    return sidecar


def _read_config(folder: Path, cls: type):
    """The config of `cls` from config.json: exports of format 2 with remote code name a model type of their
    own (`apt_pruned_<family>`), read back as the family's config; older exports the family's own."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportFormatError(f"{path} cannot be read (missing, truncated or corrupted?): {err}") from err
    if not isinstance(data, dict) or export_remote.BASE_TYPE_KEY not in data:
        return AutoConfig.from_pretrained(folder)
    return cls.config_class.from_dict(export_remote.base_config_dict(data))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        raise ExportFormatError(f"{folder} has {SIDECAR} but no {WEIGHTS}")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportFormatError(f"{path} cannot be read (truncated or corrupted?): {err}") from err


def _check_values(folder: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Weights where the model has floating ones must be floating too, and finite."""
    for name, tensor in state.items():
        if name not in expected or not expected[name].is_floating_point():
            continue
        if not tensor.is_floating_point():
            raise ExportFormatError(
                f"{folder / WEIGHTS}: tensor {name} is {tensor.dtype}, not floating point (quantized "
                "weights are not an export of apt-export; load_pruned reads float32 / float16 / bfloat16)"
            )
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            kinds = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise ExportFormatError(
                f"{folder / WEIGHTS}: tensor {name} holds {bad} non-finite value(s) ({kinds} among them)"
            )


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

    ckpt = _read_checkpoint(Path(path))
    # LightningCLI adds _class_path / _instantiator to the saved hyperparameters
    module = APTModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    apt_state = {
        k: v for k, v in ckpt.get("apt", {}).items() if k != "teacher"
    }  # the teacher is not exported
    module.on_load_checkpoint({"apt": apt_state, "state_dict": ckpt["state_dict"]})
    state = {k[len("student.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    module.student.load_state_dict(state)
    return module


def _read_checkpoint(path: Path) -> dict:
    """torch.load of an apt-fit checkpoint; `CheckpointError` naming the file when it is none."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError (zip), ...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file?): "
            f"{type(err).__name__}: {err}"
        ) from err
    missing = [k for k in ("hyper_parameters", "state_dict") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint written by apt-fit: no {' or '.join(missing)}"
        )
    return ckpt


def _training_config(checkpoint: Path, module) -> dict | str:
    """The run's config.yaml (LightningCLI writes it into the log folder above `checkpoints/`), else the
    hyperparameters saved in the checkpoint."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            try:
                return path.read_text()
            except (OSError, UnicodeDecodeError):
                break
    return {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="apt-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by apt-fit")
    parser.add_argument("output", help="folder to write (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} not found")
    if Path(args.output).exists() and not args.overwrite:  # before the (slow) checkpoint load
        raise FileExistsError(
            f"export folder {args.output} exists; pass overwrite=True (--overwrite) to replace it"
        )
    try:
        module = module_from_checkpoint(args.checkpoint)
    except CheckpointError as err:
        parser.error(str(err))
    from apt_lightning.backbone import load_tokenizer

    tokenizer = load_tokenizer(module.hparams.backbone)  # with the pad token the model was trained with
    out = export_pruned(
        module.student,
        args.output,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
        labels=module.task.label_names or None,
        training=_training_config(Path(args.checkpoint), module),
        command=shlex.join(["apt-export", *(sys.argv[1:] if argv is None else argv)]),
    )
    sidecar = json.loads((out / SIDECAR).read_text())
    kept = sidecar["apt_param_count"] / sidecar["full_apt_param_count"]
    print(f"exported to {out}: {kept:.1%} of the counted encoder parameters kept")


if __name__ == "__main__":
    main()
