"""`apt-fit`: a thin LightningCLI. Model and data are in subclass mode, so any `class_path` can be swapped;
the task and the tokenizer follow the model's settings; the config is saved next to the run.

The APT callbacks are argument groups of their own (`CALLBACK_GROUPS`), set like model and data::

    pruning: {target_sparsity: 0.6, start_step: 200}    # AdaptivePruning (--pruning.target_sparsity 0.5)
    tuning: {strategy: top_half}                        # AdaptiveTuning (--tuning.max_rank 32)
    distillation: {tau: 4.0}                            # SelfDistillation (--distillation.mu_max 1.0)

A group left out or set to null (`--pruning null`) is off, so full fine-tuning and LoRA recipes name none;
a group may take a `class_path` of a subclass (`pruning: {class_path: my_pruning.MyPruning, init_args:
{...}}`). `trainer.callbacks` stays for any other callback (`--trainer.callbacks+=...`); the groups' callbacks
run before them, in the order pruning, tuning, distillation. Configuring one of the APT classes both in its
group and in `trainer.callbacks` is an error. apt-fit also puts the working directory on `sys.path` (as
`python -m` does), so a `class_path` like `my_scorers.ActivationScorer` finds `./my_scorers.py`.

Two things the stock LightningCLI does not do:

- Periodic checkpoints: besides Lightning's end-of-epoch checkpoint, a `PeriodicCheckpoint` saves every
  `checkpoint_every_n_steps` optimizer steps (`auto`: a quarter of the pruning phase, so a crash mid-pruning
  resumes from inside it; 0 or null: off), keeping only the newest one (`periodic-epoch=E-step=S.ckpt` in
  the run's `checkpoints/`). `trainer.enable_checkpointing: false` turns both off.
- Resuming (`--ckpt_path`) with the configured optimizer and LR schedule: LightningCLI re-parses the model
  from the checkpoint's hyperparameters, and APTModule does not save its optimizer / lr_scheduler factories
  (callables), so the stock CLI silently reset them to the module defaults (`_default_optimizer`).

`validate`, `test` and `predict` take any checkpoint `fit` writes (`--ckpt_path`): the student is restored
at its pruned widths and adapter ranks, training-only state (distiller, teacher) is left out
(`APTModule.on_load_checkpoint`). `predict` writes `predictions.jsonl` (one line per example: `index`, the
row in the predicted file; `prediction`; `label_name` for classification) into the run's log folder
through a `PredictionsFile` callback, and prints where.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning.callbacks import AdaptivePruning, AdaptiveTuning, SelfDistillation
from apt_lightning.callbacks.dashboard import RunDashboard
from apt_lightning.callbacks.events import find_callback
from apt_lightning.files import write_text_atomic
from apt_lightning.module import APTModule
from apt_lightning.pruning.schedule import resolve_step

# The APT callbacks' argument groups: `--<key>.<arg>` on the command line, `<key>: {...}` in a config.
CALLBACK_GROUPS: dict[str, type[Callback]] = {
    "pruning": AdaptivePruning,
    "tuning": AdaptiveTuning,
    "distillation": SelfDistillation,
}

# Callbacks apt-fit adds to every run (after the configured ones), unless the run already has one of the
# class (configure one in trainer.callbacks to change its arguments): classes with no required arguments.
ALWAYS_ON: tuple[type[Callback], ...] = (RunDashboard,)


class PeriodicCheckpoint(ModelCheckpoint):
    """A checkpoint every `every_n_train_steps` optimizer steps, keeping the newest `save_top_k`.

    `every_n_train_steps="auto"` is resolved at set-up: a quarter of `AdaptivePruning`'s phase (at least 1
    step), so three or more resumable points fall inside pruning; without `AdaptivePruning`, a tenth of
    the run. Saved after the APT callbacks have acted on the step (Lightning runs checkpoint callbacks
    last), so a resumed run continues from exactly that step (tests/test_resume.py).
    """

    def __init__(
        self,
        every_n_train_steps: int | Literal["auto"] = "auto",
        dirpath: str | Path | None = None,
        filename: str = "periodic-{epoch}-{step}",
        save_top_k: int = 1,
    ) -> None:
        if every_n_train_steps != "auto" and (
            not isinstance(every_n_train_steps, int) or every_n_train_steps < 1
        ):
            raise ValueError(
                f"every_n_train_steps must be 'auto' or an int >= 1, got {every_n_train_steps!r}"
            )
        self.every = every_n_train_steps
        steps = 1 if every_n_train_steps == "auto" else every_n_train_steps
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=save_top_k, every_n_train_steps=steps)

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.every == "auto" and stage == "fit":  # validate/test/predict have no training steps
            self._every_n_train_steps = auto_interval(trainer)


def auto_interval(trainer: Trainer) -> int:
    """A quarter of the pruning phase in optimizer steps, or a tenth of the run without pruning."""
    total = max(1, int(trainer.estimated_stepping_batches))
    pruning = find_callback(trainer, AdaptivePruning)
    if pruning is None:
        return max(1, total // 10)
    start = resolve_step(pruning.start_step, total, "start_step")
    end = resolve_step(pruning.end_step, total, "end_step")
    return max(1, (end - start) // 4)


class PredictionsFile(Callback):
    """Collects `predict_step`'s per-example records and writes them as JSON lines, atomically, to
    `<log_dir>/<filename>` (the trainer's log folder, else its root dir) when prediction ends; prints
    where. With several processes each writes its own share (`predictions.rank<R>.jsonl`)."""

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        self.filename = filename
        self.rows: list[dict] = []
        self.path: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module) -> None:
        self.rows = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.extend(outputs or [])

    def on_predict_end(self, trainer: Trainer, pl_module) -> None:
        name = self.filename
        if trainer.world_size > 1:
            stem, _, ext = name.rpartition(".")
            name = f"{stem}.rank{trainer.global_rank}.{ext}"
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        text = "".join(json.dumps(row) + "\n" for row in sorted(self.rows, key=lambda r: r["index"]))
        self.path = write_text_atomic(folder / name, text)
        source = getattr(trainer.datamodule, "predict_source", None)
        print(f"apt-fit predict: {len(self.rows)} predictions" + (f" for {source}" if source else ""))
        print(f"apt-fit predict: wrote {self.path}")


class APTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # any LightningDataModule; GLUEDataModule when the config names none (`data: {init_args: ...}`)
        parser.set_defaults({"data": {"class_path": "apt_lightning.data.GLUEDataModule"}})
        parser.link_arguments("model.init_args.task", "data.init_args.task")
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | Literal["auto"] | None,
            default="auto",
            help="Save a resumable checkpoint every N optimizer steps, keeping the newest (auto: a quarter "
            "of the pruning phase; 0 or null: off). Lightning's end-of-epoch checkpoint is kept.",
        )
        for key, cls in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(cls, key, subclass_mode=True, required=False)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's version, except that model arguments the checkpoint does not record keep their
        configured values: APTModule leaves its optimizer and lr_scheduler factories out of the saved
        hyperparameters, and the stock re-parse reset them to the module defaults."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        configured = self.config[sub].get("model")
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        saved = set(hparams.get("dict_kwargs", hparams))
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise
        init_args = getattr(configured, "init_args", None)
        if init_args is not None:
            for key, value in vars(init_args).items():
                if key not in saved:
                    self.config[sub]["model"]["init_args"][key] = value

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer with the groups' callbacks first, then `trainer.callbacks`, then `ALWAYS_ON`;
        Lightning's end-of-epoch checkpoint (unless the config has a ModelCheckpoint) and a
        `PeriodicCheckpoint`, unless checkpointing is off; `PredictionsFile` when predicting."""
        config = self._get(self.config_init, "trainer", default={})
        every = self._get(self.config_init, "checkpoint_every_n_steps", default="auto")
        groups = {key: self._get(self.config_init, key) for key in CALLBACK_GROUPS}
        groups = {key: cb for key, cb in groups.items() if cb is not None}
        user = kwargs.get("callbacks", config.get("callbacks")) or []
        user = list(user) if isinstance(user, list) else [user]
        for key in groups:
            twice = [c for c in user if isinstance(c, CALLBACK_GROUPS[key])]
            if twice:
                raise ValueError(
                    f"{type(twice[0]).__name__} is configured twice: as `{key}` and in trainer.callbacks. "
                    f"Set its arguments under `{key}:` (--{key}.<arg>) and leave it out of "
                    f"trainer.callbacks, or switch the group off with `{key}: null` (--{key} null)."
                )
        callbacks = [*groups.values(), *user]
        callbacks += [cls() for cls in ALWAYS_ON if not any(isinstance(c, cls) for c in callbacks)]
        checkpointing = kwargs.get("enable_checkpointing", config.get("enable_checkpointing"))
        if (
            checkpointing is not False
            and every
            and not any(isinstance(c, PeriodicCheckpoint) for c in callbacks)
        ):
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                callbacks.append(ModelCheckpoint())  # what Lightning adds when the list has none
            callbacks.append(PeriodicCheckpoint(every))
        _warn_monitored_checkpoints(callbacks)
        if self.subcommand == "predict" and not any(isinstance(c, PredictionsFile) for c in callbacks):
            callbacks.append(PredictionsFile())
        # the groups' callbacks are in `callbacks` already: Lightning's own step appends nothing more
        return self._instantiate_trainer({**config, **kwargs, "callbacks": callbacks}, [])


def _warn_monitored_checkpoints(callbacks: list[Callback]) -> None:
    """A plain monitored ModelCheckpoint next to pruning (any callback with `pruning_done`, see
    `callbacks.events.structure_final`) may keep a mid-pruning (wider) model as best."""
    if not any(hasattr(c, "pruning_done") for c in callbacks):
        return
    for c in callbacks:
        if type(c) is ModelCheckpoint and c.monitor is not None:
            rank_zero_warn(
                f"ModelCheckpoint(monitor={c.monitor!r}) may keep a checkpoint from before the final "
                "structure as its best; apt_lightning.callbacks.FinalStructureCheckpoint ranks only "
                "validations after the last pruning step"
            )


def cwd_on_path() -> None:
    """Put the working directory first on `sys.path`, as `python -m` does (console scripts put their own
    folder there instead), so a config's `class_path: my_scorers.X` finds `./my_scorers.py`."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def run_cli(args: list[str] | None = None, run: bool = True) -> APTCLI:
    """Build (and with `run`, run) the CLI; returns it (`.trainer`, `.model`, `.datamodule`) for programmatic
    use and tests. `run=False` takes no subcommand: it only parses and instantiates. The working directory
    goes on `sys.path` first (`cwd_on_path`)."""
    cwd_on_path()
    return APTCLI(
        APTModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "apt"},
            }
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """The `apt-fit` console script (returns None: the script exits with status 0 after a normal run)."""
    run_cli(args)


if __name__ == "__main__":
    main()
