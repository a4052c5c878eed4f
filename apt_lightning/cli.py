"""`apt-fit`: a thin LightningCLI. Model and data are in subclass mode, so any `class_path` can be swapped;
the task and the tokenizer follow the model's settings; the config is saved next to the run."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from apt_lightning.data import GLUEDataModule
from apt_lightning.module import APTModule


class APTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.task", "data.init_args.task")
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")


def run_cli(args: list[str] | None = None, run: bool = True) -> APTCLI:
    """Build (and with `run`, run) the CLI; returns it (`.trainer`, `.model`, `.datamodule`) for programmatic
    use and tests. `run=False` takes no subcommand: it only parses and instantiates."""
    return APTCLI(
        APTModule,
        GLUEDataModule,
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
