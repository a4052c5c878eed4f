"""configs/suites/smollm2_alpaca.yaml: the instruction-tuning suite validates, plans its 17 runs with the
causal-LM task and data, monitors the eval loss as lower-is-better, and every variant's composed config is a
valid apt-fit config (on a tiny decoder)."""

import pytest
import yaml
from conftest import REPO
from helpers_causal import save_tiny_causal_backbone

from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite
from apt_lightning.tools.suite.overlay import set_dotted

SUITE = REPO / "configs" / "suites" / "smollm2_alpaca.yaml"
ABLATIONS = {"no_pruning", "no_tuning", "random_scoring", "uniform_scoring", "no_distillation"}
SPARSITIES = {"sparsity_0.2": 0.2, "sparsity_0.5": 0.5, "sparsity_0.8": 0.8}


def group(config: dict, key: str) -> dict | None:
    value = config.get(key)
    return None if value is None else value["init_args"]


def efficiency(config: dict) -> dict:
    cbs = config["trainer"]["callbacks"]
    return next(cb["init_args"] for cb in cbs if cb["class_path"].endswith("EfficiencyMonitor"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "alpaca").mkdir()
    return plan(load_suite(SUITE, data_root=str(root)))


def test_plan_is_the_issues_runs(runs):
    seeds = {}
    for r in runs:
        seeds.setdefault(r.variant.name, set()).add(r.seed)
    assert len(runs) == 18 and runs[0].variant.name == "ft"
    assert seeds.pop("apt") == seeds.pop("lora") == {0, 1, 2}
    extra = {"ft", "uniform_prune_lora", "distill_logits_only", "even_kv_groups"}
    assert seeds == {v: {0} for v in {*extra, *ABLATIONS, *SPARSITIES}}


def test_every_run_tunes_a_causal_lm_and_selects_on_the_lowest_eval_loss(runs):
    for r in runs:
        config = r.config
        assert config["model"]["init_args"]["task"] == "instruction"
        assert config["data"]["class_path"] == "apt_lightning.data.InstructionDataModule"
        assert config["data"]["init_args"]["data_dir"].endswith("/alpaca")
        assert (efficiency(config)["monitor"], efficiency(config)["mode"]) == ("val/loss", "min")
        assert config["trainer"]["max_epochs"] == 1 and config["trainer"]["precision"] == "bf16-mixed"


def test_variants_change_what_they_say(runs):
    configs = {r.variant.name: r.config for r in runs if r.seed == 0}
    base = yaml.safe_load((REPO / "configs" / "smollm2_alpaca_apt.yaml").read_text())
    apt = configs["apt"]
    assert group(apt, "pruning")["target_sparsity"] == 0.3 == base["pruning"]["target_sparsity"]
    assert group(apt, "distillation") is not None and group(apt, "tuning")["strategy"] == "top_half"
    for name, sparsity in SPARSITIES.items():
        assert group(configs[name], "pruning")["target_sparsity"] == sparsity
    for name in ("lora", "ft"):
        assert all(configs[name].get(key) is None for key in ("pruning", "tuning", "distillation"))
    assert configs["lora"]["model"]["init_args"]["adapters"]["targets"] == ["q_proj", "v_proj"]
    assert configs["ft"]["model"]["init_args"]["adapters"] is None
    uniform = configs["uniform_prune_lora"]
    assert group(uniform, "pruning")["scorer"] == "uniform"
    assert group(uniform, "pruning")["target_sparsity"] == 0.3
    assert uniform.get("tuning") is None and uniform.get("distillation") is None
    assert uniform["model"]["init_args"]["adapters"] == apt["model"]["init_args"]["adapters"]
    even = group(configs["even_kv_groups"], "pruning")
    assert even["even_kv_groups"] is True and group(apt, "pruning").get("even_kv_groups") in (None, False)
    logits_only = group(configs["distill_logits_only"], "distillation")
    assert (
        logits_only["layer_weight"] == 0.0
        and logits_only["pred_weight"] == group(apt, "distillation")["pred_weight"]
    )


def test_every_variant_instantiates(runs, tmp_path):
    from apt_lightning.cli import run_cli
    from apt_lightning.data import InstructionDataModule

    backbone = save_tiny_causal_backbone(tmp_path / "backbone")
    for r in (r for r in runs if r.seed == 0):
        config = yaml.safe_load(yaml.safe_dump(r.config))
        set_dotted(config, "model.init_args.backbone", str(backbone))
        set_dotted(config, "trainer.accelerator", "cpu")
        path = tmp_path / f"{r.variant.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = run_cli(["--config", str(path)], run=False)
        assert cli.model.causal_lm and isinstance(cli.datamodule, InstructionDataModule), r.variant.name


def test_a_pruning_phase_too_short_is_refused_before_training():
    pruning = AdaptivePruning(target_sparsity=0.3, start_step=40, end_step=0.4, num_events=8, decay_steps=10)
    with pytest.raises(ValueError, match="too few for 8 events"):
        pruning.plan_schedule(313)
