"""Helpers shared by test_pruning.py, test_tuning.py and test_distillation.py.

- `check_backbone`: the dimensions these tests assume of conftest's `tiny_backbone_dir`.
- `repeated_batch_loader`: a DataLoader whose batches are all identical, so a resumed run sees the same
  data as an uninterrupted one whatever Lightning does with a mid-epoch restart.
- `CountingScorer`: a custom `Scorer` subclass that a YAML config selects by `class_path`.
- `make_module`: a seeded `APTModule` on the tiny backbone (conftest's `backbone` fixture).
- `quickstart_args`: apt-fit arguments running a recipe (the CPU quickstart) on a backbone with small data.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning import Callback
from torch.utils.data import DataLoader

from apt_lightning import APTModule
from apt_lightning.pruning import BlockTensors, Scorer


def check_backbone(folder: Path) -> Path:
    """The tests count heads / neurons / hidden dims of conftest's `tiny_backbone_dir`: fail clearly if it
    changes."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    dims = tuple(cfg[k] for k in keys)
    assert dims == (32, 3, 4, 48), f"tiny_backbone_dir changed: (hidden, layers, heads, ffn) = {dims}"
    assert cfg.get("hidden_dropout_prob") == 0.0 and cfg.get("attention_probs_dropout_prob") == 0.0
    return Path(folder)


def synthetic_batch(batch: int = 8, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # some padding
    labels = torch.arange(batch) % 2
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def repeated_batch_loader(num_batches: int, batch: int = 8, length: int = 12, seed: int = 0) -> DataLoader:
    base = synthetic_batch(batch, length, seed)
    rows = [{k: v[i] for k, v in base.items()} for i in range(batch)]
    return DataLoader([rows[i % batch] for i in range(num_batches * batch)], batch_size=batch, shuffle=False)


def quickstart_args(backbone, tmp_path, *extra, config: Path | None = None) -> list[str]:
    """apt-fit arguments (no subcommand) for `config` (default: the CPU quickstart) on `backbone`: 160
    SST-2 sentences from the shared data, 2 epochs, logs under `tmp_path`."""
    from conftest import GLUE_DIR, REPO

    return [
        "--config",
        str(config or REPO / "configs" / "quickstart_cpu.yaml"),
        f"--model.init_args.backbone={backbone}",
        f"--data.init_args.data_dir={GLUE_DIR / 'sst2'}",
        "--data.init_args.train_limit=160",
        "--data.init_args.eval_limit=32",
        "--data.init_args.batch_size=8",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def quiet_trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


class CountSteps(Callback):
    """Counts training batches started (to show that a bad config failed before any training)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


class SaveAt(Callback):
    """Saves a checkpoint right after the given optimizer steps (put it after the callbacks under test)."""

    def __init__(self, folder: Path, steps: list[int]) -> None:
        self.folder, self.steps = Path(folder), set(steps)
        self.paths: dict[int, Path] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.paths:
            self.paths[step] = self.folder / f"step{step}.ckpt"
            trainer.save_checkpoint(self.paths[step])


class CountingScorer(Scorer):
    """Scores every block of layer `zero_layer` 0 and every other block 1, and counts its calls."""

    def __init__(self, zero_layer: int = 0) -> None:
        self.zero_layer = zero_layer
        self.calls = 0
        self.attached = None

    def attach(self, structure) -> None:
        super().attach(structure)
        self.attached = structure

    def compute(self, structure) -> BlockTensors:
        self.calls += 1
        scores = BlockTensors.full(structure.shapes(), 1.0)
        scores.heads[self.zero_layer].zero_()
        scores.neurons[self.zero_layer].zero_()
        return scores


def make_module(backbone, **kw) -> APTModule:
    torch.manual_seed(0)
    return APTModule(backbone=str(backbone), task="sst2", **kw)
