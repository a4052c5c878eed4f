"""The causal LM and tokenizer `apt-eval` scores: an apt-export folder (pruned) or a dense backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from apt_lightning.backbone import load_tokenizer, resolve_backbone
from apt_lightning.export import DTYPES, SIDECAR, load_pruned

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_causal_lm(
    model_dir: str | Path | None = None,
    backbone: str | None = None,
    tokenizer: str | None = None,
    dtype: str | torch.dtype = "float32",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Exactly one of `model_dir` (a folder written by apt-export / export_pruned, loaded by `load_pruned`
    at its pruned widths) and `backbone` (a hub id, local folder or alias such as 'smollm2-135m', loaded
    dense with AutoModelForCausalLM). `tokenizer`: a backbone name or folder to take the tokenizer from
    (default: the model folder or backbone). `dtype`: a torch dtype or a name in
    `apt_lightning.export.DTYPES`."""
    if (model_dir is None) == (backbone is None):
        raise ValueError("give exactly one of model_dir (an apt-export folder) and backbone")
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    if model_dir is not None:
        folder = Path(model_dir)
        if not (folder / SIDECAR).is_file():
            raise FileNotFoundError(
                f"{folder} has no {SIDECAR}: not a folder written by apt-export; for a plain transformers "
                "model folder use --backbone <folder>"
            )
        if tokenizer is None and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{folder} holds no tokenizer files; pass --tokenizer <the backbone it was trained from>"
            )
        return load_pruned(folder, dtype), load_tokenizer(tokenizer or str(folder))
    model = AutoModelForCausalLM.from_pretrained(resolve_backbone(backbone), dtype=dtype)
    return model.eval(), load_tokenizer(tokenizer or backbone)
