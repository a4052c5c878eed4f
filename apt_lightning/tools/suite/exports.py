"""The exported model of a causal-LM run (``<run>/export/``): what its generation benchmark loads and
its zero-shot evaluation scores. Classifier runs are not exported (their benchmark times the compacted
checkpoint, as before).

A run is a causal LM when its trained model is one: the export's recorded model class, else the student
in ``final.ckpt`` (`apt_lightning.tools.bench.is_causal_lm`), never the variant's or task's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apt_lightning.tools.suite.layout import CONFIG, EXPORT_DIR, FINAL_CKPT


def exported_kind(run_dir: Path) -> str | None:
    """causal-lm or classifier, from the model class ``<run>/export/`` records; None without an export."""
    from apt_lightning.export import SIDECAR

    try:
        model_class = json.loads((run_dir / EXPORT_DIR / SIDECAR).read_text()).get("model_class", "")
    except (OSError, ValueError, AttributeError):
        return None
    return "causal-lm" if str(model_class).endswith("ForCausalLM") else "classifier"


def export_causal_lm(run_dir: Path, module: Any) -> Path:
    """Write ``<run>/export/`` from a trained APTModule (adapters merged, pruned blocks removed, the
    backbone's tokenizer beside it) unless it is there; returns the folder."""
    folder = run_dir / EXPORT_DIR
    if exported_kind(run_dir) == "causal-lm":
        return folder
    from apt_lightning.backbone import load_tokenizer
    from apt_lightning.export import export_pruned

    config = run_dir / CONFIG
    return export_pruned(
        module.student,
        folder,
        tokenizer=load_tokenizer(module.hparams["backbone"]),
        overwrite=True,
        training=config.read_text() if config.is_file() else None,
        command=f"apt-ablate (run folder {run_dir})",
    )


def causal_lm_export(run_dir: Path) -> Path | None:
    """The export folder of a causal-LM run, written from ``final.ckpt`` on first use; None for a
    classifier run, or when the run has neither an export nor a final checkpoint."""
    kind = exported_kind(run_dir)
    if kind is not None:
        return run_dir / EXPORT_DIR if kind == "causal-lm" else None
    if not (run_dir / FINAL_CKPT).is_file():
        return None
    from apt_lightning.tools.bench import is_causal_lm
    from apt_lightning.tools.suite import inference

    module = inference.load_final_module(run_dir / FINAL_CKPT)
    if not is_causal_lm(module.student):
        return None
    return export_causal_lm(run_dir, module)
