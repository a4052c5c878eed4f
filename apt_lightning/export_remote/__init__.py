"""Make an export folder a Hugging Face model folder of a custom architecture: loadable with
`AutoModelFor...from_pretrained(folder, trust_remote_code=True)` and `transformers.pipeline(...,
trust_remote_code=True)` where apt-lightning is not installed.

`write_remote_code` copies the two self-contained files beside this module into the folder and rewrites
its config.json: a model type of apt-lightning's own (``apt_pruned_<family>``, which transformers refuses
without `trust_remote_code` rather than building the unpruned model with random weights), the base model
type, the pruned widths (`apt_widths`) and the `auto_map` naming the classes. `model_card` writes the
folder's README.md; `make_readable` undoes the private mode of the temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REMOTE_FILES = ("configuration_apt_pruned.py", "modeling_apt_pruned.py")
TYPE_PREFIX = "apt_pruned_"
BASE_TYPE_KEY = "apt_base_model_type"
WIDTHS_KEY = "apt_widths"
# config.model_type -> the class-name stem of the family in the remote files
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
AUTO_CLASSES = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForCausalLM": "AutoModelForCausalLM",
}
_HERE = Path(__file__).resolve().parent


def widths(shapes) -> dict:
    """The pruned widths the remote model is cut to (from `ModelShapes`)."""
    return {
        "hidden": shapes.hidden,
        "head_dim": shapes.head_dim,
        "heads": list(shapes.heads),
        "neurons": list(shapes.neurons),
        "kv_groups": [list(g) for g in shapes.kv_groups],
    }


def remote_class(model_class: str, base_type: str) -> tuple[str, str] | None:
    """(auto class, remote class name) for an exported transformers class, or None when not provided."""
    stem = FAMILIES.get(base_type)
    for suffix, auto in AUTO_CLASSES.items():
        if stem is not None and model_class == f"{stem}{suffix}":
            return auto, f"AptPruned{model_class}"
    return None


def write_remote_code(folder: Path, model_class: str, shapes) -> dict:
    """Copy the remote files into `folder` and rewrite its config.json (see the module docstring); returns
    the config written. A model class without a remote class still gets the model type of its own, so
    transformers refuses it loudly; `load_pruned` reads it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    base_type = config["model_type"]
    config["model_type"] = TYPE_PREFIX + base_type
    config[BASE_TYPE_KEY] = base_type
    config[WIDTHS_KEY] = widths(shapes)
    remote = remote_class(model_class, base_type)
    if remote is not None:
        auto, name = remote
        stem = FAMILIES[base_type]
        config["auto_map"] = {
            "AutoConfig": f"configuration_apt_pruned.AptPruned{stem}Config",
            auto: f"modeling_apt_pruned.{name}",
        }
        config["architectures"] = [name]
        for file in REMOTE_FILES:
            shutil.copyfile(_HERE / file, folder / file)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def base_config_dict(config: dict) -> dict:
    """An exported config.json read back as the config of the family's transformers class (for
    `load_pruned`): the base model type restored, the remote-code keys dropped."""
    config = dict(config)
    if BASE_TYPE_KEY in config:
        config["model_type"] = config.pop(BASE_TYPE_KEY)
    for key in (WIDTHS_KEY, "auto_map", "architectures"):
        config.pop(key, None)
    return config


def make_readable(folder: Path) -> None:
    """Give `folder` and everything in it the modes a new folder and files get under the umask (the
    temporary folder it was written into is private)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(
    config: dict, sidecar: dict, training: dict | str | None = None, command: str | None = None
) -> str:
    """The folder's README.md: how to load it, the widths, sparsity, the training configuration (a dict of
    hyperparameters, or the text of the run's config.yaml) and the command that made it."""
    shapes, name = sidecar["shapes"], config.get("architectures", [sidecar["model_class"]])[0]
    kept = sidecar["apt_param_count"] / sidecar["full_apt_param_count"]
    auto = next(iter(k for k in config.get("auto_map", {}) if k != "AutoConfig"), None)
    causal = auto == "AutoModelForCausalLM"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-generation' if causal else 'text-classification'}",
        "tags: [apt, pruning, apt-lightning, custom_code]",
        "---",
        "",
        f"# {name}: pruned with APT",
        "",
        f"A {sidecar['model_class']} pruned and tuned with APT (Adaptive Pruning and Tuning) in "
        f"apt-lightning: {_percent(kept)} of the counted parameters kept (sparsity {_percent(1 - kept)}); "
        "the adapters are merged and the pruned heads, neurons and hidden dimensions removed.",
        "",
        "## Loading",
        "",
    ]
    if auto is None:
        lines += ["No remote-code class for this architecture: use `apt_lightning.export.load_pruned`."]
    else:
        task = "text-generation" if causal else "text-classification"
        lines += [
            "The per-layer widths differ from the architecture's, so the folder carries its own modeling "
            "code (`modeling_apt_pruned.py`, `configuration_apt_pruned.py`): load it with "
            "`trust_remote_code=True` (without it transformers refuses the folder). apt-lightning need not "
            "be installed.",
            "",
            "```python",
            f"from transformers import {auto}, pipeline",
            f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)',
            f'pipe = pipeline("{task}", model="path/to/this/folder", trust_remote_code=True)',
            "```",
            "",
            "With apt-lightning: `from apt_lightning.export import load_pruned`, `load_pruned(folder)`.",
        ]
    full_neurons, full_heads = shapes["full_neurons"], shapes["full_heads"]
    lines += [
        "",
        "## Widths",
        "",
        f"Hidden size {shapes['hidden']} of {shapes['full_hidden']}; head size {shapes['head_dim']}. "
        f"Parameters in the attention and FFN weight matrices: {sidecar['apt_param_count']:,} of "
        f"{sidecar['full_apt_param_count']:,}.",
        "",
        "| layer | query heads | KV groups (query heads each) | FFN neurons |",
        "|---:|---:|---|---:|",
    ]
    groups = shapes.get("kv_groups") or [[] for _ in shapes["heads"]]
    for i, (h, f, g) in enumerate(zip(shapes["heads"], shapes["neurons"], groups, strict=True)):
        lines.append(f"| {i} | {h} / {full_heads[i]} | {g if g else '-'} | {f} / {full_neurons[i]} |")
    labels = config.get("id2label")
    if labels and not causal:
        lines += ["", "Labels: " + ", ".join(f"{k} = {v}" for k, v in sorted(labels.items(), key=_key))]
    if training:
        text = training if isinstance(training, str) else json.dumps(training, indent=1, default=str)
        lang = "yaml" if isinstance(training, str) else "json"
        lines += ["", "## Training configuration", "", f"```{lang}", text.rstrip(), "```"]
    if command:
        lines += ["", "## Made by", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def _key(item: tuple) -> tuple:
    k = str(item[0])
    return (0, int(k), k) if k.isdigit() else (1, 0, k)
