"""Every shipped YAML parses, instantiates (model, data, trainer with callbacks) and prints its config."""

from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, REPO

from apt_lightning.cli import CALLBACK_GROUPS, main, run_cli
from apt_lightning.data import GLUEDataModule, InstructionDataModule
from apt_lightning.module import APTModule

ALPACA_DIR = REPO.parent / "shared" / "data" / "alpaca"

CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "suites" not in p.parts and "ablations" not in p.parts
)


@pytest.fixture(scope="module")
def causal_backbone(tmp_path_factory):
    """A tiny random LLaMA causal LM with a tokenizer that has an EOS, for the instruction recipes."""
    from helpers_causal import save_tiny_causal_backbone

    return save_tiny_causal_backbone(tmp_path_factory.mktemp("causal_backbone"))


def _partial(spec: dict) -> bool:
    """A partial config (logger/, schedules/) names no model class: it is added to a full recipe."""
    return "class_path" not in spec.get("model", {})


def _scalar_leaves(spec: dict, path: tuple = ()):
    for key, value in spec.items():
        if isinstance(value, dict):
            yield from _scalar_leaves(value, (*path, key))
        elif isinstance(value, int | float | str | bool):
            yield (*path, key), value


def _local_overrides(config: Path, backbone: Path) -> list[str]:
    """Point hub-only configs at local stand-ins so they instantiate offline; the YAML itself is unchanged."""
    spec = yaml.safe_load(config.read_text())
    args = []
    if "model" in spec:
        args += [f"--model.init_args.backbone={backbone}"]
    task = spec.get("model", {}).get("init_args", {}).get("task", "sst2")
    if task == "instruction":  # Alpaca from the shared data (the recipes' own folder), ALPACA_DIR
        return args + [f"--data.init_args.data_dir={ALPACA_DIR}"]
    if "data" in spec and isinstance(task, str):  # a user's own task (a mapping) keeps its data_dir
        folder = GLUE_DIR / ("mnli_subset" if task == "mnli" else task)
        args += [f"--data.init_args.data_dir={folder}"]
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config, tiny_backbone_dir, causal_backbone, monkeypatch):
    if not GLUE_DIR.exists():
        pytest.skip("shared GLUE data not present")
    spec = yaml.safe_load(config.read_text())
    instruction = spec.get("model", {}).get("init_args", {}).get("task") == "instruction"
    if instruction and not ALPACA_DIR.exists():
        pytest.skip("shared Alpaca data not present")
    backbone = causal_backbone if instruction else tiny_backbone_dir
    if _partial(spec):
        base = REPO / "configs" / "quickstart_cpu.yaml"
        args = ["--config", str(base), "--config", str(config)] + _local_overrides(base, backbone)
    else:
        args = ["--config", str(config)] + _local_overrides(config, backbone)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = run_cli(args, run=False)
    assert isinstance(cli.model, APTModule)
    assert isinstance(cli.datamodule, InstructionDataModule if instruction else GLUEDataModule)
    assert cli.model.causal_lm == instruction
    assert cli.datamodule.hparams.task == cli.model.hparams.task  # linked
    declared = [c["class_path"].rsplit(".", 1)[-1] for c in spec.get("trainer", {}).get("callbacks", [])]
    present = [type(c).__name__ for c in cli.trainer.callbacks]
    assert all(name in present for name in declared)
    # apt-fit's callback groups: on exactly where the recipe configures them, with the recipe's arguments
    if _partial(spec):
        spec = {**yaml.safe_load((REPO / "configs" / "quickstart_cpu.yaml").read_text()), **spec}
    for key, cls in CALLBACK_GROUPS.items():
        built = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
        assert len(built) == (spec.get(key) is not None), key
        for arg, value in (spec.get(key) or {}).items():
            attr = getattr(built[0], arg, None)
            if isinstance(value, int | float | str) and isinstance(attr, int | float | str):
                assert attr == value, (key, arg)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_print_config(config, capsys):
    spec = yaml.safe_load(config.read_text())
    args = ["fit", "--config", str(config), "--print_config"]
    if _partial(spec):
        args = [
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart_cpu.yaml"),
            "--config",
            str(config),
            "--print_config",
        ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "apt_lightning.APTModule"
    for path, value in _scalar_leaves(spec) if _partial(spec) else ():  # a partial overrides its base
        node = printed
        for key in path:
            node = node[key]
        assert node == value, path
    assert "task" not in printed["data"]["init_args"]  # derived from model.init_args.task by the link
