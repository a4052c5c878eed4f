"""apt-fit's callback groups (`--pruning.*`, `--tuning.*`, `--distillation.*`): set from the command line,
switched off with null, beside extra `trainer.callbacks`; ablation overlays are partial apt-fit configs in
the same keys; a `class_path` in the working directory imports without PYTHONPATH."""

import sys
import textwrap

import pytest
import yaml
from conftest import GLUE_DIR, REPO
from helpers_apt import quickstart_args

from apt_lightning.callbacks import AdaptivePruning, AdaptiveTuning, SelfDistillation
from apt_lightning.cli import CALLBACK_GROUPS, run_cli
from apt_lightning.tools.suite.overlay import apply_overlay, load_overlay, resolve_refs

pytestmark = pytest.mark.skipif(not GLUE_DIR.exists(), reason="shared GLUE data not present")

QUICKSTART = REPO / "configs" / "quickstart_cpu.yaml"
APT_BASE = REPO / "configs" / "minilm_sst2_apt.yaml"
APT = (AdaptivePruning, AdaptiveTuning, SelfDistillation)


def _args(backbone, tmp_path, *extra, config=QUICKSTART):
    return quickstart_args(backbone, tmp_path, *extra, config=config)


def _apt(cli) -> list:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, APT)]


def test_pruning_target_from_the_command_line(tiny_backbone_dir, tmp_path):
    """The acceptance run: the quickstart with --pruning.target_sparsity 0.5 prunes to 0.5, not its 0.4."""
    cli = run_cli(["fit", *_args(tiny_backbone_dir, tmp_path, "--pruning.target_sparsity", "0.5")])
    (pruning,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptivePruning)]
    assert pruning.target_sparsity == 0.5 and pruning.num_events == 4  # the rest is the recipe's
    assert pruning.history[-1]["achieved_sparsity"] == pytest.approx(0.5, abs=0.05)
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["pruning"]["init_args"]["target_sparsity"] == 0.5  # the run's config records it


def test_groups_set_switch_off_and_order(tiny_backbone_dir, tmp_path):
    cli = run_cli(
        _args(
            tiny_backbone_dir,
            tmp_path,
            "--tuning.max_rank=32",
            "--distillation.mu_max=1.0",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
        ),
        run=False,
    )
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert names[:4] == ["AdaptivePruning", "AdaptiveTuning", "SelfDistillation", "LearningRateMonitor"]
    tuning, distillation = _apt(cli)[1:]
    assert tuning.strategy.max_rank == 32 and tuning.budget_multiple == 2.0  # recipe value kept
    assert distillation.mu_max == 1.0 and distillation.tau == 4.0
    # null switches a group off; FT and LoRA recipes leave all three out
    cli = run_cli(_args(tiny_backbone_dir, tmp_path, "--distillation", "null"), run=False)
    assert [type(cb) for cb in _apt(cli)] == [AdaptivePruning, AdaptiveTuning]
    for recipe in ("minilm_sst2_ft.yaml", "minilm_sst2_lora.yaml"):
        cli = run_cli(_args(tiny_backbone_dir, tmp_path, config=REPO / "configs" / recipe), run=False)
        assert _apt(cli) == []
    # an argument given to a group that is off switches it on (the class defaults for the rest)
    off = ["--pruning=null", "--pruning.target_sparsity=0.3"]
    (pruning,) = _apt(
        run_cli(_args(tiny_backbone_dir, tmp_path, "--tuning=null", "--distillation=null", *off), run=False)
    )
    assert pruning.target_sparsity == 0.3 and pruning.start_step == 200


def test_a_group_class_configured_twice_is_refused(tiny_backbone_dir, tmp_path):
    extra = '--trainer.callbacks+={"class_path": "apt_lightning.callbacks.AdaptivePruning"}'
    with pytest.raises(ValueError, match="AdaptivePruning is configured twice: as `pruning`"):
        run_cli(_args(tiny_backbone_dir, tmp_path, extra), run=False)
    with pytest.raises(SystemExit):  # a misspelt argument fails while parsing
        run_cli(_args(tiny_backbone_dir, tmp_path, "--pruning.target_sparsty=0.5"), run=False)


def test_a_subclass_in_a_group(tiny_backbone_dir, tmp_path):
    text = yaml.safe_dump({"pruning": {"class_path": "test_cli_groups.MyPruning", "init_args": {"extra": 3}}})
    (tmp_path / "mine.yaml").write_text(text)
    cli = run_cli(_args(tiny_backbone_dir, tmp_path, "--config", str(tmp_path / "mine.yaml")), run=False)
    (pruning,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptivePruning)]
    assert type(pruning) is MyPruning and pruning.extra == 3


class MyPruning(AdaptivePruning):
    def __init__(self, extra: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra = extra


def test_class_path_from_the_working_directory(tiny_backbone_dir, tmp_path, monkeypatch):
    """`class_path: <module>.X` for ./<module>.py without PYTHONPATH, as `python -m` would find it."""
    module = "my_scorers_cwd_test"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from apt_lightning.pruning import Scorer

            class ActivationScorer(Scorer):
                def __init__(self, ema: float = 0.9):
                    self.ema = ema

                def compute(self, structure):
                    raise NotImplementedError
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, module, raising=False)
    scorer = f'--pruning.scorer={{"class_path": "{module}.ActivationScorer", "init_args": {{"ema": 0.5}}}}'
    cli = run_cli(_args(tiny_backbone_dir, tmp_path, scorer), run=False)
    (pruning,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptivePruning)]
    assert type(pruning.scorer).__name__ == "ActivationScorer" and pruning.scorer.ema == 0.5
    assert sys.path[0] == str(tmp_path)


OVERLAYS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_an_overlay_is_a_partial_apt_fit_config(overlay, tiny_backbone_dir, tmp_path):
    """Each overlay, its report keys left out (and ${...} references resolved, as the suite does), is a
    second `--config` for apt-fit, and builds the same callbacks as the suite's composed config."""
    spec = load_overlay(overlay)
    base = yaml.safe_load(APT_BASE.read_text())
    partial = {k: v for k, v in spec.items() if k not in ("description", "paper")}
    partial = resolve_refs(partial, apply_overlay(base, {}), 0, overlay.name)
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(partial))
    direct = run_cli(
        _args(tiny_backbone_dir, tmp_path, "--config", str(tmp_path / "overlay.yaml"), config=APT_BASE),
        run=False,
    )
    composed = apply_overlay(base, spec, seed=0)
    (tmp_path / "composed.yaml").write_text(yaml.safe_dump(composed))
    suite = run_cli(_args(tiny_backbone_dir, tmp_path, config=tmp_path / "composed.yaml"), run=False)

    def scalars(obj) -> dict:
        return {k: v for k, v in vars(obj).items() if isinstance(v, int | float | str | type(None))}

    def described(cli) -> dict:
        out = {}
        for cb in _apt(cli):
            inner = getattr(cb, "scorer", None) or getattr(cb, "strategy", None)
            out[type(cb).__name__] = (scalars(cb), type(inner).__name__, inner and scalars(inner))
        return out

    assert described(direct) == described(suite)
    on = {key for key in CALLBACK_GROUPS if composed.get(key) is not None}
    assert {type(cb) for cb in _apt(direct)} == {CALLBACK_GROUPS[key] for key in on}
    for key in on:  # what the overlay sets reaches the callback
        built = next(cb for cb in _apt(direct) if isinstance(cb, CALLBACK_GROUPS[key]))
        for arg, value in (partial.get(key) or {}).items():
            if isinstance(value, int | float) and isinstance(getattr(built, arg, None), int | float):
                assert getattr(built, arg) == value, (overlay.stem, key, arg)
    # full fine-tuning (ft, peer_tp_ft) exactly where the composed config switches the adapters off
    assert (direct.model.adapters_config is None) == (composed["model"]["init_args"].get("adapters") is None)
