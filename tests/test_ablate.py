"""apt-ablate: overlays, suite checks, the runner (fake and real workers) and the report."""

import copy
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, REPO

from apt_lightning.tools.report import collect_runs, effects, paper_scores, write_report
from apt_lightning.tools.report.summary import ratio_se
from apt_lightning.tools.suite import cli, compose, inference, layout, train
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite, parse_sets
from apt_lightning.tools.suite.overlay import (
    apply_overlay,
    apply_set,
    canonical_config,
    load_overlay,
    set_dotted,
)
from apt_lightning.tools.suite.spec import SuiteError

ABLATIONS = REPO / "configs" / "ablations"
SUITES = REPO / "configs" / "suites"
APT_BASE = REPO / "configs" / "minilm_sst2_apt.yaml"
if not APT_BASE.is_file():
    APT_BASE = REPO / "configs" / "quickstart_cpu.yaml"
APT_CALLBACKS = ["AdaptivePruning", "AdaptiveTuning", "SelfDistillation"]
GROUP_OF = {"AdaptivePruning": "pruning", "AdaptiveTuning": "tuning", "SelfDistillation": "distillation"}
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "sst2").is_dir(), reason="shared GLUE data not present")


def _base() -> dict:
    return yaml.safe_load(APT_BASE.read_text())


def _names(config: dict) -> list[str]:
    """The APT callbacks switched on (apt-fit's groups), then the classes in trainer.callbacks."""
    groups = [name for name, key in GROUP_OF.items() if config.get(key) is not None]
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return groups + [cb["class_path"].rsplit(".", 1)[-1] for cb in callbacks]


def _args(config: dict, name: str) -> dict:
    """A callback's arguments: its group's (flat in a recipe, init_args once composed) or its entry's."""
    if name in GROUP_OF:
        group = config[GROUP_OF[name]]
        return group["init_args"] if "init_args" in group else group
    callbacks = config["trainer"]["callbacks"]
    return next(cb.get("init_args") or {} for cb in callbacks if cb["class_path"].endswith(name))


# ---------------------------------------------------------------------- overlays
SCORER_OVERLAYS = {
    "no_kurtosis": {"kurtosis": False},
    "kurtosis_paper": {"kurtosis": "paper"},
    "kurtosis_scaled": {"kurtosis": "scaled"},
    "hidden_branch": {"hidden_salience": "branch"},
}
PRUNING_OVERLAYS = {"decay_before": {"mask_decay": "before"}, "warmup": {"warmup_steps": 0.1}}


def _check_variant(name: str, config: dict, base: dict) -> None:
    pruning = _args(base, "AdaptivePruning")
    if name in ("ft", "lora", "peer_tp_ft", "peer_tp_lora"):  # the references and the peers built on them
        peer = name.startswith("peer_")
        assert _names(config) == (["TorchPruningPeer"] if peer else [])
        adapters = config["model"]["init_args"]["adapters"]
        assert adapters is None if name.endswith("ft") else adapters["targets"] == ["query", "value"]
        if peer:  # APT's target over APT's pruning phase
            args = _args(config, "TorchPruningPeer")
            assert [args[k] for k in ("target_sparsity", "start_step", "end_step")] == [
                pruning[k] for k in ("target_sparsity", "start_step", "end_step")
            ]
        return
    expected = {
        "no_pruning": ["AdaptiveTuning", "SelfDistillation"],
        "no_distillation": ["AdaptivePruning", "AdaptiveTuning"],
    }.get(name, APT_CALLBACKS)
    assert _names(config) == expected
    if name == "no_pruning":
        for cb in ("AdaptiveTuning", "SelfDistillation"):
            assert _args(config, cb)["start_step"] == pruning["start_step"]
            assert _args(config, cb)["end_step"] == pruning["end_step"]
        assert _args(config, "AdaptiveTuning")["num_events"] == pruning.get("num_events", 10)
    elif name.startswith("sparsity_"):
        assert _args(config, "AdaptivePruning")["target_sparsity"] == float(name.split("_")[1])
    elif name == "no_tuning":
        assert _args(config, "AdaptiveTuning")["strategy"] == "none"
    elif name == "uniform_rank":
        assert _args(config, "AdaptiveTuning")["strategy"] == "uniform"
    elif name == "random_scoring":
        scorer = _args(config, "AdaptivePruning")["scorer"]
        assert scorer["class_path"].endswith("RandomScorer") and scorer["init_args"] == {"seed": 3}  # ${seed}
    elif name == "uniform_scoring":
        assert _args(config, "AdaptivePruning")["scorer"] == "uniform"
    elif name in SCORER_OVERLAYS:  # merged onto the base's scorer: only the named argument changes
        scorer = _args(config, "AdaptivePruning")["scorer"]
        assert scorer["class_path"].endswith("OutlierAwareSalience")
        assert scorer["init_args"] == {
            **_args(base, "AdaptivePruning")["scorer"]["init_args"],
            **SCORER_OVERLAYS[name],
        }
    elif name in PRUNING_OVERLAYS:
        assert _args(config, "AdaptivePruning") == {**pruning, **PRUNING_OVERLAYS[name]}
    elif name.startswith("distill_"):  # distillation options, and for the authors' phases no compaction
        spec = load_overlay(ABLATIONS / f"{name}.yaml")
        expected = canonical_config(base, "base")
        for key in ("pruning", "distillation"):
            expected[key]["init_args"].update(spec.get(key) or {})
        assert config == expected
        authors = _args(config, "SelfDistillation").get("schedule") == "authors"
        assert authors == (_args(config, "AdaptivePruning").get("compact_at") == "never")
    elif name == "train_norms":  # a model option: the base recipe with it set, nothing else
        expected = canonical_config(base, "base")
        expected["model"]["init_args"]["train_norms"] = True
        assert config == expected
    else:
        expected = canonical_config(base, "base")
        if name == "no_distillation":
            expected["distillation"] = None
        assert name in ("apt", "no_distillation") and config == expected


OVERLAYS = sorted(ABLATIONS.glob("*.yaml"))


def test_every_planned_overlay_exists():
    wanted = {
        "apt",
        "no_pruning",
        "no_tuning",
        "uniform_rank",
        "random_scoring",
        "uniform_scoring",
        "no_kurtosis",
        "kurtosis_paper",
        "kurtosis_scaled",
        "hidden_branch",
        "decay_before",
        "warmup",
        "no_distillation",
        "sparsity_0.2",
        "sparsity_0.5",
        "sparsity_0.8",
        "ft",
        "lora",
        "peer_tp_ft",
        "peer_tp_lora",
        "distill_in_pruning",
        "distill_authors",
        "distill_authors_phases",
        "distill_authors_layers",
        "train_norms",
    }
    assert wanted <= {p.stem for p in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_changes_only_what_it_says(overlay):
    base = _base()
    spec = load_overlay(overlay)
    assert spec.get("description"), "every overlay describes itself for RESULTS.md"
    config = apply_overlay(base, spec, seed=3)
    _check_variant(overlay.stem, config, base)
    assert base == _base()  # the base is not modified


@needs_glue
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_config_instantiates(overlay, tiny_backbone_dir, tmp_path):
    """The composed config is a valid apt-fit config: LightningCLI builds model, data and callbacks."""
    from apt_lightning.cli import run_cli

    config = apply_overlay(_base(), load_overlay(overlay), seed=0)
    set_dotted(config, "model.init_args.backbone", str(tiny_backbone_dir))
    set_dotted(config, "data.init_args.data_dir", str(GLUE_DIR / "sst2"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["--config", str(path)], run=False)
    present = [type(c).__name__ for c in cli.trainer.callbacks]
    assert all(name in present for name in _names(config))
    assert (cli.model.adapters_config is None) == (overlay.stem in ("ft", "peer_tp_ft"))


def test_overlay_errors_and_references():
    base = _base()
    with pytest.raises(SuiteError, match="is the old overlay syntax"):
        apply_overlay(base, {"remove_callbacks": ["SelfDistillation"]})
    with pytest.raises(SuiteError, match="unknown keys \\['prunning'\\]"):
        apply_overlay(base, {"prunning": {"target_sparsity": 0.5}})
    with pytest.raises(
        SuiteError, match="`pruning` \\(AdaptivePruning\\) has no argument\\(s\\) \\['target_sparsty'\\]"
    ):
        apply_overlay(base, {"pruning": {"target_sparsty": 0.5}})
    with pytest.raises(SuiteError, match="refers to 'nope.x', which the base config does not set"):
        apply_overlay(base, {"data": {"init_args": {"a": "${nope.x}"}}})
    with pytest.raises(SuiteError, match="AdaptivePruning is apt-fit's group: \\$\\{pruning.start_step\\}"):
        apply_overlay(base, {"tuning": {"start_step": "${AdaptivePruning.start_step}"}})
    with pytest.raises(SuiteError, match="bad reference"):
        apply_overlay(base, {"data": {"init_args": {"a": "${not a ref"}}})
    # a reference to an argument the base leaves unset reads the class default
    refs = {
        "decay": "${pruning.mask_decay}",
        "seed": "${seed}",
        "lr": "${model.init_args.optimizer.init_args.lr}",
    }
    out = apply_overlay(base, {"data": {"init_args": refs}}, seed=7)
    assert {k: out["data"]["init_args"][k] for k in refs} == {"decay": "after", "seed": 7, "lr": 0.001}
    # a group merges onto the base's: only what the overlay names changes; null switches it off
    out = apply_overlay(base, {"pruning": {"plot": False}, "distillation": None})
    assert _args(out, "AdaptivePruning") == {**_args(base, "AdaptivePruning"), "plot": False}
    assert (
        out["distillation"] is None
        and out["pruning"]["class_path"] == "apt_lightning.callbacks.AdaptivePruning"
    )
    # refs: resolved against the run's overrides when given
    refs = apply_overlay(base, {"pruning": {"start_step": 5}})
    overlay = {"pruning": None, "tuning": {"start_step": "${pruning.start_step}"}}
    assert _args(apply_overlay(base, overlay, refs=refs), "AdaptiveTuning")["start_step"] == 5
    with pytest.raises(SuiteError, match="refers to `pruning`, which is off"):
        apply_overlay(base, overlay, refs=apply_overlay(base, {"pruning": None}))
    # a base that lists an APT callback in trainer.callbacks (the old recipes) has it moved to its group
    old = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "apt_lightning.callbacks.AdaptivePruning",
                    "init_args": {"target_sparsity": 0.3},
                }
            ]
        }
    }
    out = apply_overlay(old, {"pruning": {"start_step": 4}})
    assert _args(out, "AdaptivePruning") == {"target_sparsity": 0.3, "start_step": 4}
    assert out["trainer"]["callbacks"] == [] and out["tuning"] is None


def test_suite_set_keys_are_apt_fit_keys():
    base = canonical_config(_base(), "base")
    config = apply_overlay(base, {"distillation": None})
    apply_set(config, "pruning.start_step", 2, base, "v")
    apply_set(config, "pruning.scorer", "uniform", base, "v")
    assert (
        _args(config, "AdaptivePruning")["start_step"] == 2
        and _args(config, "AdaptivePruning")["scorer"] == "uniform"
    )
    apply_set(config, "distillation.tau", 2.0, base, "v")  # switched off by the variant: skipped
    assert config["distillation"] is None
    apply_set(config, "distillation", {"tau": 2.0}, base, "v")  # the whole group: switched on
    assert _args(config, "SelfDistillation") == {"tau": 2.0}
    off = apply_overlay(base, {"tuning": None})
    with pytest.raises(SuiteError, match="sets an argument of `tuning`, which is off in the base config"):
        apply_set(copy.deepcopy(off), "tuning.max_rank", 16, off, "v")
    with pytest.raises(SuiteError, match="has no argument\\(s\\) \\['start_stp'\\]"):
        apply_set(config, "pruning.start_stp", 2, base, "v")
    with pytest.raises(
        SuiteError, match="AdaptivePruning is apt-fit's `pruning` group; write `pruning.<arg>`"
    ):
        apply_set(config, "trainer.callbacks.AdaptivePruning.init_args.start_step", 2, base, "v")


def test_overlay_file_checks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("remove: [SelfDistillation]\n")
    with pytest.raises(SuiteError, match="unknown keys \\['remove'\\]"):
        load_overlay(bad)
    bad.write_text("callback_args: {AdaptivePruning: {target_sparsity: 0.5}}\n")
    with pytest.raises(SuiteError, match="is the old overlay syntax.*pruning: \\{target_sparsity: 0.5\\}"):
        load_overlay(bad)
    for text, shown in (
        ("{sst2: high}", "'high'"),
        ("{sst-2: 94.0}", "'sst-2'"),
        ("{source: 4}", "'source'"),
    ):
        bad.write_text(f"paper: {text}\n")
        with pytest.raises(SuiteError, match=f"paper must map GLUE task names \\(sst2, .*{shown}"):
            load_overlay(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert apply_overlay(_base(), load_overlay(empty)) == canonical_config(_base(), "base")


def _summary_row(variant, mean, std=None, task="sst2"):
    return {
        "variant": variant,
        "task_key": task,
        "task": task,
        "task_label": task,
        "monitor": "val/accuracy",
        "metric_mean": mean,
        "metric_std": std,
    }


def test_effects_against_full_apt_and_the_paper():
    def variant(name, overlay_text, overlay=None):
        return {"name": name, "overlay": f"/x/{overlay or name}.yaml", "overlay_text": overlay_text}

    meta = {
        "reference": "ft",
        "variants": [
            variant("apt", "paper: {source: T4, sst2: 94.5}"),
            variant("no_tuning", "paper: {source: T4, sst2: 93.2}"),  # paper: -1.3
            variant("no_pruning", "paper: {source: T4, sst2: 94.4}"),  # paper: -0.1
            variant("no_distillation", "paper: {source: T4, sst2: 92.9}"),  # paper: -1.6
            variant("apt_other", "paper: {source: T4, sst2: 94.5}", overlay="apt"),  # not its overlay
            variant("random_scoring", ""),
        ],
    }
    summary = [
        _summary_row("apt", 0.860, std=0.005),  # noise: 2 x 0.5 = 1.0 point
        _summary_row("ft", 0.900),
        _summary_row("no_tuning", 0.840),  # -2.0: clear, same direction
        _summary_row("no_pruning", 0.880),  # +2.0: clear, opposite direction
        _summary_row("no_distillation", 0.855),  # -0.5: within noise
        _summary_row("apt_other", 0.870),
        _summary_row("random_scoring", 0.800),
    ]
    assert paper_scores(meta)[1] == "T4"
    got = {e["variant"]: e for e in effects(summary, meta)}
    assert set(got) == {"no_tuning", "no_pruning", "no_distillation", "apt_other", "random_scoring"}
    assert got["no_tuning"]["effect"] == pytest.approx(-2.0)
    assert got["no_tuning"]["paper_effect"] == pytest.approx(-1.3)
    assert got["no_tuning"]["verdict"] == "agrees"
    assert got["no_pruning"]["verdict"] == "disagrees"
    assert got["no_distillation"]["verdict"] == "no clear effect here" and not got["no_distillation"]["clear"]
    assert got["apt_other"]["verdict"] == got["random_scoring"]["verdict"] == "not in the paper's table"

    summary[0]["metric_std"] = None  # one APT seed: no spread to call anything clear
    got = {e["variant"]: e for e in effects(summary, meta)}
    assert got["no_tuning"]["clear"] is None and got["no_tuning"]["verdict"].startswith("no seed spread")
    summary[0]["metric_std"] = 0.0  # every non-zero effect is clear, a zero effect is none
    summary[2]["metric_mean"] = 0.860
    got = {e["variant"]: e for e in effects(summary, meta)}
    assert got["no_tuning"]["effect"] == 0 and got["no_tuning"]["verdict"] == "no clear effect here"
    cola = [_summary_row(v, m, std=0.01, task="cola") for v, m in (("apt", 0.40), ("no_tuning", 0.30))]
    for row in cola:
        row["monitor"] = "val/matthews"
    (cola_effect,) = effects(cola, meta)
    assert cola_effect["effect"] == pytest.approx(-10.0)  # points, as GLUE scores are published


def test_set_dotted_by_class_name_and_index():
    config = {
        "trainer": {"callbacks": [{"class_path": "a.ModelCheckpoint"}, {"class_path": "b.EarlyStopping"}]}
    }
    assert set_dotted(config, "trainer.callbacks.EarlyStopping.init_args.patience", 16) == 1
    assert _args(config, "EarlyStopping")["patience"] == 16
    assert set_dotted(config, "trainer.callbacks.Missing.init_args.x", 1) == 0
    assert set_dotted(config, "trainer.callbacks.0.init_args.save_top_k", 2) == 1
    assert _args(config, "ModelCheckpoint")["save_top_k"] == 2
    assert set_dotted(config, "new.deep.key", [1]) == 1 and config["new"] == {"deep": {"key": [1]}}
    with pytest.raises(SuiteError, match="outside a list"):
        set_dotted(config, "trainer.callbacks.9.init_args.x", 1)


# ---------------------------------------------------------------------- suite checks
def _suite(tmp_path: Path, name: str = "s", **changes) -> Path:
    spec = {
        "name": name,
        "base": str(APT_BASE),
        "overlay_dir": str(ABLATIONS),
        "output_dir": str(tmp_path / "out"),
        "data_root": str(GLUE_DIR),
        "reference": "ft",
        "seeds": [0],
        "variants": ["apt", "ft"],
        "tasks": {"sst2": {"data_dir": "{data_root}/sst2"}},
    }
    spec.update(changes)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@needs_glue
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": ["apt", "nope"]}, "unknown variant 'nope'.*available in .*'no_distillation'"),
        ({"base": "/does/not/exist.yaml"}, "base config /does/not/exist.yaml not found"),
        (
            {"variants": [{"name": "apt", "base": "nope.yaml"}]},
            "variant apt: base config .*nope.yaml not found",
        ),
        ({"seeds": []}, "zero seeds"),
        ({"variants": [{"name": "apt", "seeds": []}]}, "variant apt: zero seeds"),
        ({"seeds": None}, "no seeds given"),
        ({"seeds": [0, "a"]}, "seeds must be integers"),
        ({"tasks": {"sst3": {}}}, "unknown task 'sst3'.*known: \\[.*'sst2'"),
        ({"tasks": {"x": {"task": "qqqp"}}}, "unknown task 'qqqp'"),
        ({"variants": [{"name": "apt", "tasks": ["mnli"]}]}, "variant apt: unknown task\\(s\\) \\['mnli'\\]"),
        ({"tasks": {"sst2": {"data_dir": "/no/such/folder"}}}, "data_dir /no/such/folder is not a folder"),
        ({"data_root": None}, "uses \\{data_root\\} but no data_root is set"),
        ({"tasks": {}}, "no tasks"),
        ({"variants": []}, "non-empty list"),
        ({"variants": ["apt", "apt"]}, "listed twice"),
        ({"reference": "lora"}, "reference 'lora' is not one of the variants"),
        ({"paralel": 2}, "unknown keys \\['paralel'\\]"),
        ({"parallel": 0}, "parallel must be an integer >= 1"),
        (
            {"gpus": [0, -1]},
            "gpus must be auto, a GPU index or a list of GPU indices \\(>= 0\\), got \\[0, -1",
        ),
        ({"gpus": "all"}, "gpus must be auto.*got \\['all'\\]"),
        ({"gpus": []}, "gpus must be auto"),
        ({"benchmark": {"cuda_graphs": "false"}}, "cuda_graphs must be true or false, got 'false'"),
        ({"benchmark": {"cuda_graphs": True, "device": "cpu"}}, "cuda_graphs needs device cuda or auto"),
        (
            {"set": {"trainer.callbacks.AdaptivePrunning.init_args.x": 1}},
            "addresses callback AdaptivePrunning",
        ),
        ({"set": {"pruning.target_sparsty": 0.5}}, "`pruning` \\(AdaptivePruning\\) has no argument"),
        (
            {"set": {"trainer.callbacks.AdaptivePruning.init_args.start_step": 2}},
            "AdaptivePruning is apt-fit's `pruning` group",
        ),
        (
            {
                "variants": [
                    {
                        "name": "apt",
                        "overlay": "no_distillation",
                        "set": {"distillation.tau": 2.0},
                    },
                    "ft",
                ]
            },
            None,
        ),
    ],
)
def test_bad_suites_fail_before_any_run(tmp_path, changes, message):
    path = _suite(tmp_path, **changes)
    if message is None:  # a suite-wide key may address a callback this variant removed: skipped quietly
        assert _names(plan(load_suite(path))[1].config)[:2] == ["AdaptivePruning", "AdaptiveTuning"]
        return
    with pytest.raises(SuiteError, match=message):
        load_suite(path)
    assert not (tmp_path / "out").exists()


def test_missing_suite_and_cli_errors(tmp_path, capsys):
    with pytest.raises(SuiteError, match="suite file .*nope.yaml not found"):
        load_suite(tmp_path / "nope.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2
    assert "apt-ablate: error: suite file" in capsys.readouterr().err
    with pytest.raises(SuiteError, match="--set expects KEY=VALUE"):
        parse_sets(["novalue"])


@needs_glue
def test_cli_selection_errors(tmp_path):
    path = _suite(tmp_path)
    with pytest.raises(SuiteError, match="--variants \\['x'\\]"):
        load_suite(path, variants=["x"])
    with pytest.raises(SuiteError, match="--tasks \\['mnli'\\]"):
        load_suite(path, tasks=["mnli"])
    with pytest.raises(SuiteError, match="--seeds: zero seeds"):
        load_suite(path, seeds=[])
    with pytest.raises(SuiteError, match="leaves no runs"):
        load_suite(path, seeds=[5])
    suite = load_suite(path, variants=["apt"], seeds=[0])
    assert [r.run_id for r in plan(suite)] == ["apt/sst2/seed0"]


# ---------------------------------------------------------------------- shipped suites
@needs_glue
def test_smoke_suite_plan():
    suite = load_suite(SUITES / "smoke_cpu.yaml")
    runs = plan(suite)
    assert [r.run_id for r in runs] == ["ft/sst2/seed0", "apt/sst2/seed0", "no_distillation/sst2/seed0"]
    apt = runs[1].config
    assert apt["trainer"]["max_steps"] == 12 and apt["seed_everything"] == 0
    assert _args(apt, "AdaptivePruning")["start_step"] == 2 and _names(apt)[-1] == "EfficiencyMonitor"
    assert apt["trainer"]["logger"][0]["init_args"]["save_dir"] == str(runs[1].run_dir)
    assert apt["trainer"]["enable_checkpointing"] is False
    assert apt["data"]["init_args"]["data_dir"] == "../shared/data/glue/sst2"


def test_gpu_suite_plan(tmp_path):
    root = tmp_path / "glue"
    for sub in ("sst2", "mnli_subset"):
        (root / sub).mkdir(parents=True)
    suite = load_suite(SUITES / "minilm_gpu.yaml", data_root=str(root))
    runs = plan(suite)
    seeds: dict[tuple[str, str], set[int]] = {}
    for r in runs:
        seeds.setdefault((r.variant.name, r.task.key), set()).add(r.seed)
        assert r.config["data"]["init_args"]["data_dir"].startswith(str(root))  # --data-root wins
        assert r.config["trainer"]["accelerator"] == "gpu"
    for name in ("apt", "ft"):
        assert seeds[(name, "sst2")] == seeds[(name, "mnli9k")] == {0, 1, 2}
    assert {v for v, t in seeds if t == "mnli9k"} >= {"apt", "no_distillation", "no_tuning", "ft"}
    # every overlay but no_kurtosis, which the base recipe is since the defaults screen, and train_norms,
    # added later and measured on the 6-epoch schedule (minilm_long)
    expected = {p.stem for p in OVERLAYS} - {"no_kurtosis", "train_norms"} | {"apt_paper_mu", "adapters_wide"}
    assert {v for v, t in seeds if t == "sst2"} == expected
    assert suite.parallel >= 8 and suite.benchmark["seq_len"] == 128
    assert suite.benchmark["batch_size"] == 512  # batch 128 is launch-bound for MiniLM on an H200
    assert runs[0].variant.name == "ft"
    mnli = {r.variant.name: r.config for r in runs if r.task.key == "mnli9k" and r.seed == 0}
    assert mnli["ft"]["model"]["init_args"]["task"] == "mnli"
    assert _args(mnli["apt"], "AdaptivePruning")["start_step"] == 50
    assert (
        _args(mnli["peer_tp_lora"], "TorchPruningPeer")["start_step"] == 50
    )  # APT's phase, as the task sets it
    assert {c["data"]["init_args"]["val_from_train"] for c in mnli.values()} == {1000}
    sst2 = {r.variant.name: r.config for r in runs if r.task.key == "sst2" and r.seed == 0}
    # no_pruning copies the pruning schedule as this task overrides it (100), not the base's (200)
    assert (
        _args(sst2["no_pruning"], "AdaptiveTuning")["start_step"]
        == _args(sst2["apt"], "AdaptivePruning")["start_step"]
        == 100
    )


def test_full_schedule_suite_is_the_base_recipe(tmp_path):
    (tmp_path / "sst2").mkdir()
    runs = plan(load_suite(SUITES / "minilm_gpu_full.yaml", data_root=str(tmp_path)))
    variants = ("apt", "ft", "lora", "no_distillation", "peer_tp_ft", "peer_tp_lora")
    assert sorted(r.run_id for r in runs) == sorted(f"{v}/sst2/seed{s}" for v in variants for s in (0, 1, 2))
    base = yaml.safe_load(APT_BASE.read_text())
    configs = {r.variant.name: r.config for r in runs if r.seed == 0}
    apt = configs["apt"]
    assert apt["trainer"]["max_epochs"] == base["trainer"]["max_epochs"] == 3  # nothing shortened
    assert _args(apt, "AdaptivePruning") == _args(base, "AdaptivePruning")
    assert _args(apt, "SelfDistillation") == _args(base, "SelfDistillation")
    assert _args(apt, "SelfDistillation")["mu_max"] == 0.5  # the recipe's cap (docs/ablations.md)
    lr = base["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    for name in ("apt", "lora", "peer_tp_lora"):  # the adapters' runs share the base recipe's optimizer
        assert configs[name]["model"]["init_args"]["optimizer"]["init_args"]["lr"] == lr, name
    for config in configs.values():  # honest selection, every variant alike
        assert config["data"]["init_args"]["val_from_train"] == 2000
        selection = _args(config, "FinalStructureCheckpoint")
        assert selection["monitor"] == "val/accuracy" and selection["dirpath"].endswith("/selection")
        assert "enable_checkpointing" not in config["trainer"] and config["checkpoint_every_n_steps"] is None


@needs_glue
def test_wandb_logger_only_when_enabled(tmp_path):
    runs = plan(load_suite(_suite(tmp_path, wandb={"project": "p"})))
    loggers = runs[0].config["trainer"]["logger"]
    assert [lg["class_path"].rsplit(".", 1)[-1] for lg in loggers] == ["CSVLogger", "WandbLogger"]
    assert {lg["init_args"]["group"] for lg in loggers[1:]} == {"s"} and loggers[1]["init_args"]["offline"]
    runs = plan(load_suite(_suite(tmp_path)))
    assert len(runs[0].config["trainer"]["logger"]) == 1


# ---------------------------------------------------------------------- runner (fake worker)
FAKE_WORKER = """
import json, os, sys, time, pathlib
run = pathlib.Path(sys.argv[1])
meta = json.loads((run / "run.json").read_text())
print("training", meta["variant"], "gpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
if meta["variant"] == "broken":
    print("boom: something broke"); sys.exit(3)
if meta["variant"] == "slow":
    time.sleep(30)
time.sleep(0.3)
(run / "done.json").write_text(json.dumps({"best_metric": 0.9 if meta["variant"] == "ft" else 0.8}))
"""


@pytest.fixture
def fake_worker(monkeypatch, tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(
        train, "worker_command", lambda run_dir, extra: [sys.executable, str(script), str(run_dir)]
    )


@needs_glue
def test_runner_survives_failure_skips_finished_and_is_strict_on_request(tmp_path, fake_worker, capsys):
    variants = ["ft", "apt", {"name": "broken", "overlay": "apt"}, "no_distillation"]
    path = _suite(tmp_path, variants=variants, parallel=1)
    argv = ["run", str(path), "--no-bench", "--no-report"]
    assert cli.main(argv) == 0  # failures are recorded, not fatal
    out = tmp_path / "out"
    assert all((out / v / "sst2" / "seed0" / "done.json").is_file() for v in ("ft", "apt", "no_distillation"))
    failed = json.loads((out / "broken" / "sst2" / "seed0" / "failed.json").read_text())
    assert failed["returncode"] == 3 and "boom: something broke" in failed["log_tail"]
    assert "[FAILED] broken/sst2/seed0 (exit 3)" in capsys.readouterr().out
    # the FT run finished first, so the others time their TTA against its best metric
    apt_config = yaml.safe_load((out / "apt" / "sst2" / "seed0" / "config.yaml").read_text())
    assert _args(apt_config, "EfficiencyMonitor")["reference"] == 0.9
    assert json.loads((out / "apt" / "sst2" / "seed0" / "run.json").read_text())["tta_reference"] == 0.9

    assert cli.main([*argv, "--strict"]) == 1  # only the failed run is retried
    text = capsys.readouterr()
    assert "0 done, 3 skipped, 1 failed" in text.out and "1 run(s) failed: broken/sst2/seed0" in text.err
    assert cli.main(["run", str(path), "--no-bench", "--no-report", "--variants", "apt", "ft"]) == 0
    assert "0 done, 2 skipped, 0 failed" in capsys.readouterr().out


@needs_glue
def test_runner_parallel_and_timeout(tmp_path, fake_worker):
    variants = ["ft", "apt", "no_distillation", "no_tuning", {"name": "slow", "overlay": "apt"}]
    suite = load_suite(_suite(tmp_path, variants=variants, parallel=3, timeout_s=3))
    t0 = time.time()
    result = train.train_runs(suite, plan(suite), log=lambda _: None)
    finished = ("ft", "apt", "no_distillation", "no_tuning")
    assert sorted(result["done"]) == sorted(f"{v}/sst2/seed0" for v in finished)
    assert result["failed"] == ["slow/sst2/seed0"]
    assert time.time() - t0 < 25  # the slow run was killed at its timeout
    failed = json.loads((suite.output_dir / "slow" / "sst2" / "seed0" / "failed.json").read_text())
    assert failed["reason"] == "timeout after 3 s"


@needs_glue
def test_runner_spreads_processes_over_gpus(tmp_path, fake_worker, monkeypatch):
    variants = ["ft", "apt", "no_distillation", "no_tuning"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    suite = load_suite(_suite(tmp_path, variants=variants, parallel=4), gpus="2,5")
    assert suite.gpus == ["2", "5"]
    train.train_runs(suite, plan(suite), log=lambda _: None)
    logs = [(suite.output_dir / v / "sst2" / "seed0" / "train.log").read_text() for v in variants]
    assert sorted(line.split()[-1] for line in logs) == ["2", "2", "5", "5"]  # two processes per GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert load_suite(_suite(tmp_path, variants=variants), gpus="auto").gpus == ["3", "1"]
    # indices count the GPUs this process may use, as torch does
    assert load_suite(_suite(tmp_path, variants=variants), gpus=[1]).gpus == ["1"]
    assert load_suite(_suite(tmp_path, variants=variants), gpus="1,0").gpus == ["1", "3"]
    with pytest.raises(SuiteError, match="gpus \\[2\\] out of range: CUDA_VISIBLE_DEVICES='3,1' leaves 2"):
        load_suite(_suite(tmp_path, variants=variants), gpus=[0, 2])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert load_suite(_suite(tmp_path, variants=variants), gpus="auto").gpus is None


@needs_glue
def test_bench_phase_isolates_failures_and_caches_dense(tmp_path, tiny_backbone_dir, monkeypatch):
    import torch

    import apt_lightning.export

    suite = load_suite(_suite(tmp_path, variants=["ft", "apt", "no_distillation"]))
    runs = plan(suite)
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "done.json").write_text("{}")
        (run.run_dir / "final.ckpt").write_text(run.variant.name)

    class Fake:
        def __init__(self, ckpt):
            self.hparams = {"backbone": str(tiny_backbone_dir), "task": "sst2", "_class_path": "x"}
            self.student = torch.nn.Linear(2, 2)
            self.student.variant = ckpt.read_text()

    broken = {"apt"}  # fails once

    def bench(model, batch_size, seq_len, dtype, device, warmup, repeats, cuda_graphs):
        assert (batch_size, seq_len, dtype, device, cuda_graphs) == (128, 128, "fp32", "cpu", False)
        if getattr(model, "variant", None) in broken:
            broken.clear()
            raise RuntimeError("bench broke")
        return {"samples_per_s": 10.0, "latency_ms": 1.0, "peak_mb": 1.0}

    monkeypatch.setattr(inference, "load_final_module", Fake)
    monkeypatch.setattr(apt_lightning.export, "compact_for_inference", lambda m: m)
    monkeypatch.setattr(inference, "load_benchmark", lambda: bench)
    suite.benchmark.update(device="cpu", rounds=2)
    result = inference.bench_runs(suite, runs, log=lambda _: None)
    assert result["done"] == ["ft/sst2/seed0", "no_distillation/sst2/seed0"]
    assert result["failed"] == ["apt/sst2/seed0"]
    error = json.loads((runs[1].run_dir / "inference_failed.json").read_text())["error"]
    assert error == "RuntimeError: bench broke"
    info = json.loads((runs[0].run_dir / "inference.json").read_text())
    assert info["model"]["rounds_samples_per_s"] == [10.0, 10.0] and info["dtype"] == "fp32"
    assert info["dense"]["params"] > info["model"]["params"]  # the dense tiny BERT, built once
    assert len(list((suite.output_dir / "_dense").glob("*.json"))) == 1
    result = inference.bench_runs(suite, runs, log=lambda _: None)  # only the failed one is measured again
    assert result["done"] == ["apt/sst2/seed0"] and not (runs[1].run_dir / "inference_failed.json").exists()
    monkeypatch.setattr(inference, "load_benchmark", lambda: None)
    messages: list[str] = []
    assert inference.bench_runs(suite, runs, force=True, log=messages.append)["done"] == []
    assert "not available" in messages[0]


def test_run_status(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert layout.run_status(run) == "pending"
    (run / "run.json").write_text(json.dumps({"pid": os.getpid()}))
    assert layout.run_status(run) == "pending"  # a live pid, but not a training process of this folder
    (run / "failed.json").write_text("{}")
    assert layout.run_status(run) == "failed"
    (run / "done.json").write_text("{}")
    assert layout.run_status(run) == "done"


# ---------------------------------------------------------------------- report
def _write_run(
    root: Path,
    variant: str,
    seed: int,
    best: float,
    *,
    sparsity: float = 0.0,
    hist=None,
    peak=1000.0,
    step=0.02,
    inf=None,
    failed=False,
    efficiency=True,
    task="sst2",
    test=None,
):
    run = root / variant / task / f"seed{seed}"
    (run / "logs").mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps(
            {
                "variant": variant,
                "task": task,
                "task_key": task,
                "task_label": "SST-2 test",
                "seed": seed,
                "monitor": "val/accuracy",
                "description": f"the {variant} variant",
                "fit_command": f"apt-fit fit --config {run}/config.yaml --seed_everything {seed}",
            }
        )
    )
    pruned = "trainer: {callbacks: [{class_path: x.AdaptivePruning}]}\n"
    (run / "config.yaml").write_text(pruned if sparsity else "{}\n")
    if failed:
        (run / "failed.json").write_text(
            json.dumps(
                {
                    "returncode": 1,
                    "reason": "training process failed",
                    "log_tail": "Traceback\nValueError: bad thing",
                }
            )
        )
        return run
    hist = hist or [(10.0, best - 0.1), (20.0, best)]
    (run / "done.json").write_text(
        json.dumps(
            {
                "best_metric": best,
                "wall_s": 25.0,
                "device": "cpu",
                "log_dir": str(run / "logs"),
                "versions": {"torch": "x"},
                **({} if test is None else {"test_metric": test, "selected_step": 20}),
            }
        )
    )
    if efficiency:
        (run / "logs" / "efficiency.json").write_text(
            json.dumps(
                {
                    "peak_memory_mb": peak,
                    "median_step_s": step,
                    "train_wall_s": 25.0,
                    "best_metric": best,
                    "monitor": "val/accuracy",
                    "device_name": "Fake GPU",
                    "metric_history": [
                        {"step": 10 * (i + 1), "wall_s": w, "metric": m} for i, (w, m) in enumerate(hist)
                    ],
                    "pruning_overhead": {
                        "score_s": 1.0,
                        "search_s": 0.5,
                        "compact_s": 0.2,
                        "grow_s": 0.1,
                        "per_step_fraction": 0.05,
                    },
                    "structure": {
                        "sparsity": sparsity,
                        "heads_per_layer": [2, 0, 1],
                        "neurons_per_layer": [8, 4, 6],
                        "hidden": 32,
                    },
                }
            )
        )
    else:
        with (run / "logs" / "metrics.csv").open("w") as f:
            f.write(f"epoch,step,val/accuracy,train/loss\n0,5,,0.6\n0,10,0.5,\n0,20,{best},\n")
    if inf:
        (run / "inference.json").write_text(
            json.dumps(
                {
                    "model": {
                        "samples_per_s": inf,
                        "latency_ms": 128e3 / inf,
                        "peak_mb": 1e5 / inf,
                        "params": 5,
                        "rounds_samples_per_s": [0.9 * inf, inf, 1.1 * inf],
                    },
                    "dense": {"samples_per_s": 1000.0, "latency_ms": 128.0, "peak_mb": 100.0, "params": 10},
                    "settings": {"batch_size": 128, "seq_len": 128},
                    "device_name": "Fake GPU",
                    "dtype": "bf16",
                }
            )
        )
    return run


def _read_csv(path: Path) -> dict:
    with path.open() as f:
        return {(r["variant"], r.get("seed", "")): r for r in csv.DictReader(f)}


def test_report_from_synthetic_runs(tmp_path, capsys):
    root = tmp_path / "suite"
    _write_run(root, "ft", 0, 0.90, hist=[(10.0, 0.80), (30.0, 0.90)], peak=2000.0, step=0.04, inf=1000.0)
    _write_run(root, "ft", 1, 0.92, hist=[(10.0, 0.85), (30.0, 0.92)], peak=2000.0, step=0.04, inf=1000.0)
    _write_run(root, "apt", 0, 0.88, sparsity=0.6, hist=[(5.0, 0.70), (15.0, 0.88)], inf=2000.0)
    _write_run(root, "apt", 1, 0.86, sparsity=0.6, hist=[(5.0, 0.80), (15.0, 0.86)], inf=2500.0)
    _write_run(root, "no_distillation", 0, 0.80, sparsity=0.6, hist=[(5.0, 0.7), (15.0, 0.8)])
    _write_run(root, "no_distillation", 1, 0.0, failed=True)
    _write_run(root, "lora", 0, 0.85, efficiency=False)  # no efficiency.json: metrics.csv fallback
    meta_file = root / "apt" / "sst2" / "seed1" / "run.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "relabelled_from": "apt_v2"}))
    (root / "suite.json").write_text(
        json.dumps(
            {
                "name": "synthetic",
                "description": "A made-up suite.",
                "reference": "ft",
                "suite_file": "s.yaml",
                "variants": [  # apt and no_distillation: the paper's scores for another task only
                    {
                        "name": n,
                        "description": f"described {n}",
                        "overlay": f"/x/{n}.yaml" if score else "",
                        "overlay_text": f"paper: {{source: T4, mnli: {score}}}" if score else "",
                        "base": "",
                        **recorded,
                    }
                    for n, score, recorded in (
                        ("apt", 86.4, {"set": {}}),
                        ("no_distillation", 85.3, {"set": {"distillation.tau": 2.0}}),
                        ("lora", None, {}),  # records written before variant settings were
                        ("ft", None, {}),
                    )
                ],
                "tasks": {"sst2": {"task": "sst2", "label": "SST-2 test"}},
                # the suite text of the last invocation (apt, no_distillation, lora); ft ran in an earlier one
                "suite_text": "variants:\n  - apt\n"
                "  - {name: no_distillation, set: {distillation.tau: 9.0}}\n"
                "  - {name: lora, set: {model.init_args.adapters.rank: 4}}\n"
                "  - {name: ft, set: {trainer.max_epochs: 2}}\n",
                "runs": ["apt/sst2/seed0", "no_distillation/sst2/seed0", "lora/sst2/seed0"],
            }
        )
    )
    md = write_report(root).read_text()
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n### ")}
    assert "```yaml\ndistillation.tau: 2.0\n```" in sections["no_distillation"]  # the record wins
    assert "```yaml\nmodel.init_args.adapters.rank: 4\n```" in sections["lora"]  # from the suite text
    assert all("This variant's `set`" not in sections[n] for n in ("apt", "ft"))  # none; not of ft's runs

    res = {k[0]: v for k, v in _read_csv(root / "results.csv").items()}
    assert list(res) == ["apt", "no_distillation", "lora", "ft"]  # the suite's order
    apt, ft = res["apt"], res["ft"]
    assert float(apt["metric_mean"]) == pytest.approx(0.87)
    assert float(apt["metric_std"]) == pytest.approx(0.014142, 1e-4)
    assert apt["n"] == "2" and float(apt["pct_of_ft"]) == pytest.approx(100 * 0.87 / 0.91)
    assert float(apt["sparsity"]) == pytest.approx(0.6) and float(ft["sparsity"]) == 0.0
    # TTA: seed 0 needs 0.97*0.90=0.873 -> 15 s; seed 1 needs 0.97*0.92=0.8924 -> never (0.86 best)
    assert float(apt["tta_s"]) == 15.0 and apt["tta_reached"] == "1/2"
    assert float(ft["tta_s"]) == 30.0 and float(apt["tta_vs_ft"]) == pytest.approx(0.5)
    assert float(apt["memory_vs_ft"]) == pytest.approx(0.5) and float(apt["step_vs_ft"]) == pytest.approx(0.5)
    assert float(apt["median_step_ms"]) == pytest.approx(20.0) and float(apt["score_search_s"]) == 1.5
    assert float(apt["inf_speedup"]) == pytest.approx(2.25)
    assert float(apt["inf_latency_ratio"]) == pytest.approx((0.5 + 0.4) / 2)
    assert float(apt["inf_params_ratio"]) == 0.5 and float(ft["inf_speedup"]) == 1.0
    assert res["no_distillation"]["n"] == "1" and res["no_distillation"]["n_failed"] == "1"
    assert res["lora"]["metric_mean"] == "0.85" and res["lora"]["peak_memory_mb"] == ""
    runs = _read_csv(root / "runs.csv")
    assert runs[("no_distillation", "1")]["status"] == "failed"
    assert runs[("apt", "1")]["tta_source"] == "97% of FT seed 1 (not reached)"
    assert runs[("apt", "1")]["heads_per_layer"] == "2 0 1" and runs[("apt", "1")]["hidden"] == "32"
    assert runs[("lora", "0")]["heads_per_layer"] == ""  # no efficiency.json: blank

    for needle in (
        "# Ablation results: synthetic",
        "A made-up suite.",
        "### SST-2 test",
        "| apt | 87.00 ± 1.41 (n=2) | 95.6 ± 1.5 | 0.60 | 15 | 0.50x | 1/2 | 1000 | 0.50x | 20.0 | 1.50 "
        "| 5.0% |",
        "| ft | 91.00 ± 1.41 (n=2) | 100.0 | 0.00 |",  # the reference's own ratio has no spread
        "| no_distillation | 80.00 (n=1) | 87.9 | 0.60 |",  # one seed: no standard error
        "| apt | 0.50 | 2250 | 2.25x |",
        "| 0.600 | 2 0 1 | 8 4 6 | 32 |",  # heads, FFN neurons and hidden dims kept, per run
        "## Effects against full APT\n",  # the paper has no SST-2 numbers here: not named
        "described no_distillation",
        "ValueError: bad thing",
        "### Failed runs",
        "## Where the numbers come from",
        "![metric_vs_time.png](metric_vs_time.png)",
        "apt-fit fit --config",
        "97% of the FT run's best metric",
        "differed by up to 20%",
        "`relabelled_from`): apt/sst2/seed1 (was apt_v2).",
    ):
        assert needle in md, needle
    for png in ("metric_vs_sparsity.png", "metric_vs_speedup.png", "metric_vs_time.png"):
        assert (root / png).stat().st_size > 1000
    assert not list(root.glob(".*tmp*"))  # atomic writes leave nothing behind

    assert cli.main(["report", str(root)]) == 0
    assert "RESULTS.md" in capsys.readouterr().out


def test_report_gives_the_test_numbers_of_selected_checkpoints(tmp_path):
    """Runs selected on a carved validation split carry the official dev set's number as test; the report
    gives it per run and per variant, against FT's, and leaves variants without one out of that table."""
    root = tmp_path / "suite"
    for seed, (ft, apt) in enumerate([(0.90, 0.88), (0.92, 0.86)]):
        _write_run(root, "ft", seed, ft + 0.01, test=ft)
        _write_run(root, "apt", seed, apt + 0.01, sparsity=0.6, test=apt)
    _write_run(root, "lora", 0, 0.85)  # an older run, selected on the dev set: no test number
    md = write_report(root).read_text()
    res = {k[0]: v for k, v in _read_csv(root / "results.csv").items()}
    assert float(res["apt"]["test_mean"]) == pytest.approx(0.87) and res["apt"]["test_n"] == "2"
    assert float(res["apt"]["test_pct_of_ft"]) == pytest.approx(100 * 0.87 / 0.91)
    assert res["lora"]["test_mean"] == "" and res["lora"]["test_n"] == "0"
    runs = _read_csv(root / "runs.csv")
    assert float(runs[("apt", "1")]["test_metric"]) == 0.86 and runs[("apt", "1")]["selected_step"] == "20"
    assert "| variant | test accuracy, mean ± std | % of FT ± s.e. | val - test |" in md
    assert float(res["apt"]["test_pct_of_ft_se"]) == pytest.approx(
        100 * ratio_se(0.87, 0.02**0.5 / 10, 2, 0.91, 0.02**0.5 / 10, 2)
    )
    assert res["ft"]["test_pct_of_ft_se"] == ""
    assert (
        "| apt | 87.00 ± 1.41 (n=2) | 95.6 ± 1.5 | 1.00 |" in md
        and "| lora | 85.00" not in md.split("Test:")[1].split("Inference")[0]
    )
    assert float(res["ft"]["val_minus_test"]) == pytest.approx(0.01)
    assert "Selection against test:" not in md  # two tested variants: too few to rank
    assert "| apt/sst2/seed1 | done | 0.8700 | all 2 | 0.8700 | 0.8600 | 0.600 |" in md


def test_report_without_reference_or_runs(tmp_path):
    root = tmp_path / "suite"
    _write_run(root, "apt", 0, 0.8, sparsity=0.5)
    md = write_report(root).read_text()
    assert "No FT reference variant" in md
    row = collect_runs(root)[0]
    assert row["best_metric"] == 0.8 and row["sparsity"] == 0.5
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "from 0 finished of 0 runs" in write_report(empty).read_text()
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


# ---------------------------------------------------------------------- the real thing
@needs_glue
def test_smoke_suite_end_to_end(tmp_path, tiny_backbone_dir, capsys):
    """configs/suites/smoke_cpu.yaml with real apt-fit worker processes (a tiny backbone for speed):
    train, checkpoint, benchmark against the dense model, report; then a rerun skips everything."""
    out = tmp_path / "smoke"
    argv = [
        "run",
        str(SUITES / "smoke_cpu.yaml"),
        "--output",
        str(out),
        "--set",
        f"model.init_args.backbone={tiny_backbone_dir}",
    ]
    assert cli.main(argv) == 0, capsys.readouterr()
    for variant in ("apt", "no_distillation", "ft"):
        run = out / variant / "sst2" / "seed0"
        done = json.loads((run / "done.json").read_text())
        assert done["global_step"] == 12 and 0.0 <= done["best_metric"] <= 1.0
        assert (run / "final.ckpt").is_file() and (run / "train.log").is_file()
        eff = json.loads((run / "logs" / "efficiency.json").read_text())
        assert eff["metric_history"] and eff["monitor"] == "val/accuracy"
        inference = json.loads((run / "inference.json").read_text())
        assert inference["model"]["samples_per_s"] > 0 and inference["dense"]["samples_per_s"] > 0
        assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 0
    assert json.loads((out / "apt" / "sst2" / "seed0" / "logs" / "pruning.json").read_text())["events"]
    res = {k[0]: v for k, v in _read_csv(out / "results.csv").items()}
    assert set(res) == {"apt", "no_distillation", "ft"}
    assert float(res["apt"]["sparsity"]) > 0.5 and float(res["ft"]["sparsity"]) == 0.0
    # the export is smaller (the tiny backbone's embeddings, never pruned here, are most of its parameters)
    assert float(res["apt"]["inf_params_ratio"]) < 1.0 and float(res["ft"]["pct_of_ft"]) == 100.0
    md = (out / "RESULTS.md").read_text()
    assert "# Ablation results: smoke_cpu" in md and "| no_distillation |" in md
    assert len(list(out.glob("_dense/*.json"))) == 1  # the dense model is measured once per task
    capsys.readouterr()

    t0 = time.time()
    assert cli.main([*argv, "--no-report"]) == 0
    assert "0 done, 3 skipped, 0 failed" in capsys.readouterr().out and time.time() - t0 < 60

    # a dry run with other settings lists the runs but leaves the record of finished ones alone
    config = out / "apt" / "sst2" / "seed0" / "config.yaml"
    before = config.read_text()
    assert cli.main([*argv, "--dry-run", "--set", "trainer.max_steps=99"]) == 0
    assert "done     apt/sst2/seed0" in capsys.readouterr().out and config.read_text() == before


@pytest.mark.usefixtures("one_thread")
def test_selection_counts_only_validations_at_the_final_structure(backbone, tmp_path):
    """APT's last decay window closes at step 5: validations at steps 2 and 4 score wider models and are
    never saved, whatever their value."""
    from helpers_apt import make_module, quiet_trainer, repeated_batch_loader

    from apt_lightning.callbacks import AdaptivePruning, FinalStructureCheckpoint

    pruning = AdaptivePruning(0.5, start_step=0, end_step=4, num_events=2, decay_steps=1, plot=False)
    selection = FinalStructureCheckpoint(dirpath=str(tmp_path), save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=8,
        callbacks=[pruning, selection],
        enable_checkpointing=True,
        limit_val_batches=1,
        val_check_interval=2,
    )
    loader = repeated_batch_loader(8)
    trainer.fit(make_module(backbone), train_dataloaders=loader, val_dataloaders=repeated_batch_loader(1))
    assert pruning.pruning_done
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-6.ckpt", "best-8.ckpt"]


def _small_sst2(folder: Path, train: int = 150, dev: int = 32) -> Path:
    folder.mkdir(parents=True)
    words = ["good", "bad", "fine", "dull", "great", "awful"]
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        lines = [f"a {words[i % 6]} film number {i}\t{(i % 6) % 2}" for i in range(rows)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    return folder


@pytest.mark.usefixtures("one_thread")
def test_worker_selects_at_the_final_structure_and_tests_on_dev(tmp_path, tiny_backbone_dir, monkeypatch):
    """A peer run on a validation split carved from training, trained in this process by the worker's body:
    the checkpoint it keeps is the best validation point after the last pruning step, tested on the dev
    set; done.json and the report carry the test number."""
    data = _small_sst2(tmp_path / "sst2")
    settings = {
        "model.init_args.backbone": str(tiny_backbone_dir),
        "trainer.accelerator": "cpu",
        "trainer.max_epochs": 1,
        "trainer.max_steps": 12,
        "trainer.val_check_interval": 3,
        "trainer.enable_progress_bar": False,
        "data.init_args.train_limit": 96,
        "data.init_args.eval_limit": 32,
        "data.init_args.batch_size": 8,
        "data.init_args.max_length": 32,
        "data.init_args.val_from_train": 48,
        "pruning.start_step": 2,
        "pruning.end_step": 6,
    }
    peer = {"name": "peer_tp_ft", "set": {"trainer.callbacks.TorchPruningPeer.init_args.num_steps": 2}}
    tasks = {"sst2": {"data_dir": str(data)}}
    suite = load_suite(_suite(tmp_path, variants=[peer], reference=None, set=settings, tasks=tasks))
    (run,) = plan(suite)
    monkeypatch.setattr(sys, "argv", ["apt-ablate"])
    train._prepare(suite, run)
    assert train.train_worker(run.run_dir, []) == 0
    done = json.loads((run.run_dir / "done.json").read_text())
    history = json.loads((run.run_dir / "logs" / "efficiency.json").read_text())["metric_history"]
    assert [h["step"] for h in history] == [3, 6, 9, 12]  # the peer's last pruning step is step 6
    final = {h["step"]: h["metric"] for h in history if h["step"] >= 6}
    assert done["selected_checkpoint"] == "best" and done["selected_val_metric"] == max(final.values())
    assert final[done["selected_step"]] == done["selected_val_metric"]
    assert 0.0 <= done["test_metric"] <= 1.0 and done["test_monitor"] == "test/accuracy"
    assert not list((run.run_dir / "selection").glob("*.ckpt"))  # tested, then deleted
    assert collect_runs(suite.output_dir)[0]["test_metric"] == done["test_metric"]


# ---------------------------------------------------------------------- relabel
def _relabel_suite(tmp_path: Path, mu_max: float | None, variants: list) -> Path:
    """A suite on a copy of the APT recipe whose SelfDistillation sets `mu_max` (None: leaves it out)."""
    base = _base()
    distill = _args(base, "SelfDistillation")
    distill.pop("mu_max", None)
    if mu_max is not None:
        distill["mu_max"] = mu_max
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "glue" / "sst2").mkdir(parents=True, exist_ok=True)
    return _suite(
        tmp_path,
        base=str(tmp_path / "recipe.yaml"),
        data_root=str(tmp_path / "glue"),
        seeds=[0, 1],
        variants=variants,
        reference="apt",
    )


def _finish_all(suite_path: Path) -> None:
    suite = load_suite(suite_path)
    for run in plan(suite):
        train._prepare(suite, run)
        (run.run_dir / "done.json").write_text(
            json.dumps(
                {"config_digest": compose.config_digest(run.config), "log_dir": str(run.run_dir / "logs")}
            )
        )


def test_relabel_after_a_recipe_change(tmp_path, capsys):
    """The recipe adopts what variant `capped` set: its runs become `apt`, the old `apt` runs (no mu_max
    in their configs: the argument did not exist) become `paper_mu`. Nothing is retrained."""
    capped = {
        "name": "capped",
        "overlay": "apt",
        "set": {"distillation.mu_max": 0.5},
    }
    _finish_all(_relabel_suite(tmp_path, None, ["apt", capped]))
    paper = {
        "name": "paper_mu",
        "overlay": "apt",
        "set": {"distillation.mu_max": 1.0},
    }
    new_suite = _relabel_suite(tmp_path, 0.5, ["apt", paper])
    out = tmp_path / "out"
    before = {p: (out / p / "sst2" / "seed0" / "done.json").read_text() for p in ("apt", "capped")}

    wrong = ["relabel", str(new_suite), "capped:paper_mu"]  # mu_max 0.5 is not the paper's 1.0
    with pytest.raises(SystemExit):
        cli.main(wrong)
    assert "mu_max: the run has 0.5, the new variant 1.0" in capsys.readouterr().err
    assert {p: (out / p / "sst2" / "seed0" / "done.json").read_text() for p in ("apt", "capped")} == before

    with pytest.raises(SystemExit):
        cli.main(["relabel", str(new_suite), "apt:paper_mu", "capped:paper_mu"])
    assert "two variants renamed to the same name" in capsys.readouterr().err
    # apt's folders are the destination of one rename and the source of the other
    assert cli.main(["relabel", str(new_suite), "capped:apt", "apt:paper_mu"]) == 0
    assert "relabelled 4 run(s)" in capsys.readouterr().out
    assert not (out / "capped").exists()
    suite = load_suite(new_suite)
    for run in plan(suite):
        meta = json.loads((run.run_dir / "run.json").read_text())
        done = json.loads((run.run_dir / "done.json").read_text())
        assert meta["variant"] == run.variant.name and done["config_digest"] == compose.config_digest(
            run.config
        )
        assert meta["relabelled_from"] == {"apt": "capped", "paper_mu": "apt"}[run.variant.name]
        assert done["log_dir"] == str(run.run_dir / "logs")
        stored = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        assert _args(stored, "SelfDistillation")["mu_max"] == {"apt": 0.5, "paper_mu": 1.0}[run.variant.name]
    recorded = json.loads((out / "suite.json").read_text())["variants"]
    assert [(v["name"], v["set"]) for v in recorded] == [
        ("apt", {}),
        ("paper_mu", {"distillation.mu_max": 1.0}),  # each variant's own settings, for the report
    ]
    assert cli.main(["run", str(new_suite), "--no-bench", "--no-report"]) == 0  # nothing to train
    assert "0 done, 4 skipped" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        cli.main(["relabel", str(new_suite), "apt-paper_mu"])
    assert "renames are OLD:NEW pairs" in capsys.readouterr().err
    assert not list(out.glob(".relabel*"))  # no stage left behind


def test_relabel_puts_every_run_back_when_a_move_fails(tmp_path, monkeypatch):
    from apt_lightning.tools.suite import relabel as relabel_module

    capped = {
        "name": "capped",
        "overlay": "apt",
        "set": {"distillation.mu_max": 0.5},
    }
    _finish_all(_relabel_suite(tmp_path, None, ["apt", capped]))
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in sorted(out.glob("*/*/seed*/*")) if p.is_file()}
    paper = {
        "name": "paper_mu",
        "overlay": "apt",
        "set": {"distillation.mu_max": 1.0},
    }
    suite = load_suite(_relabel_suite(tmp_path, 0.5, ["apt", paper]))
    moves = []
    real_move = relabel_module.shutil.move

    def failing_move(src, dst):
        moves.append(src)
        if len(moves) == 6:  # all four staged, one placed, then the disk "fails"
            raise OSError("disk full")
        return real_move(src, dst)

    monkeypatch.setattr(relabel_module.shutil, "move", failing_move)
    with pytest.raises(OSError, match="disk full"):
        relabel_module.relabel(suite, {"capped": "apt", "apt": "paper_mu"})
    after = {p: p.read_bytes() for p in sorted(out.glob("*/*/seed*/*")) if p.is_file()}
    assert after == before and not list(out.glob(".relabel*"))


def test_overlay_arguments_merge_into_the_bases_own_class():
    """An overlay's bare arguments belong to the class the base names (a subclass, another spelling), and the
    base's other arguments stay."""
    base = {
        "pruning": {
            "class_path": "apt_lightning.callbacks.pruning.AdaptivePruning",
            "init_args": {"target_sparsity": 0.6, "start_step": 200, "num_events": 10},
        }
    }
    out = apply_overlay(base, {"pruning": {"target_sparsity": 0.5}})
    assert out["pruning"] == {
        "class_path": "apt_lightning.callbacks.pruning.AdaptivePruning",
        "init_args": {"target_sparsity": 0.5, "start_step": 200, "num_events": 10},
    }


def test_relabel_compares_a_run_config_written_before_the_callback_groups():
    """Runs trained when the APT callbacks were listed in trainer.callbacks compare equal to today's form."""
    from apt_lightning.tools.suite.relabel import _comparable, differences

    old = {
        "trainer": {
            "enable_checkpointing": False,
            "callbacks": [
                {
                    "class_path": "apt_lightning.callbacks.AdaptivePruning",
                    "init_args": {"target_sparsity": 0.6},
                },
                {"class_path": "apt_lightning.callbacks.EfficiencyMonitor", "init_args": {"reference": 0.9}},
            ],
        }
    }
    new = {
        "checkpoint_every_n_steps": "auto",
        "trainer": {
            "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "apt_lightning.callbacks.EfficiencyMonitor", "init_args": {"reference": 0.9}},
            ],
        },
        "pruning": {
            "class_path": "apt_lightning.callbacks.AdaptivePruning",
            "init_args": {"target_sparsity": 0.6},
        },
        "tuning": None,
        "distillation": None,
    }
    stored = _comparable(old, new, "run")
    assert differences(stored, new, Path("a"), Path("b")) == []
    new["pruning"]["init_args"]["target_sparsity"] = 0.5
    assert differences(stored, new, Path("a"), Path("b"))  # a real difference still shows


def test_rank_correlation_matches_its_definition():
    """Spearman's rho: 1 for the same order, -1 for the reverse, ties at their mean rank, undefined (None)
    below three pairs or for a constant side; mismatched lengths are an error."""
    from apt_lightning.tools.report.summary import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 25, 90]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 4, 3): Pearson of the ranks
    assert rank_correlation([5, 5, 6, 7], [1, 2, 4, 3]) == pytest.approx(0.7378647873726218)
    assert rank_correlation([1, 2], [2, 1]) is None
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="3 x values against 2 y values"):
        rank_correlation([1, 2, 3], [1, 2])


def test_report_says_how_well_validation_ranks_the_variants(tmp_path):
    """With three or more tested variants the report gives the rank correlation of their validation means
    with their test means: here validation orders them exactly against test."""
    root = tmp_path / "suite"
    for variant, val, test in (("ft", 0.95, 0.80), ("apt", 0.93, 0.82), ("lora", 0.91, 0.84)):
        _write_run(root, variant, 0, val, test=test)
    md = write_report(root).read_text()
    assert "rank these 3 variants with a rank correlation (Spearman) of -1.00" in md
    assert "| ft | 80.00 (n=1) | 100.0 | 15.00 |" in md


def test_ratio_se_matches_the_spread_of_simulated_ratios():
    """The standard error of a "% of FT" is the spread of the ratio of two seed means: simulated seeds
    (normal, fixed generator) give ratios whose standard deviation the formula predicts within sampling
    error; fewer than two seeds on a side, or a zero mean, give none."""
    rng = random.Random(0)
    mean, std, n, ref_mean, ref_std, ref_n = 0.87, 0.008, 3, 0.89, 0.012, 4
    ratios = [
        statistics.fmean(rng.gauss(mean, std) for _ in range(n))
        / statistics.fmean(rng.gauss(ref_mean, ref_std) for _ in range(ref_n))
        for _ in range(20000)
    ]
    predicted = ratio_se(mean, std, n, ref_mean, ref_std, ref_n)
    assert statistics.stdev(ratios) == pytest.approx(predicted, rel=0.03)
    assert ratio_se(mean, std, 3, ref_mean, ref_std, 3) > ratio_se(mean, std, 12, ref_mean, ref_std, 12)
    assert ratio_se(mean, std, 1, ref_mean, ref_std, 3) is None
    assert ratio_se(mean, None, 3, ref_mean, ref_std, 3) is None
    assert ratio_se(mean, std, 3, 0.0, ref_std, 3) is None
    # a zero or negative mean (a Matthews correlation) keeps its spread
    assert ratio_se(0.0, std, 4, ref_mean, ref_std, 3) == pytest.approx(std / 2 / ref_mean)
    assert ratio_se(-mean, std, n, ref_mean, ref_std, ref_n) == pytest.approx(predicted)


def test_pct_of_ft_cells_never_read_as_no_spread():
    from apt_lightning.tools.report.markdown import _pct_of_ft_cell

    assert _pct_of_ft_cell(98.94, 0.63) == "98.9 ± 0.6"
    assert _pct_of_ft_cell(99.5, 0.01) == "99.5 ± <0.1"
    assert _pct_of_ft_cell(100.0, None) == "100.0" and _pct_of_ft_cell(None, None) == "–"


def test_val_minus_test_pairs_each_run_with_its_own_test(tmp_path):
    """A run with no validation at the final structure (no best metric) still has a test number, of its final
    model: the gap and the ranking use only runs with both, and a variant whose runs all lack a best metric
    has no gap rather than breaking the report."""
    root = tmp_path / "suite"
    _write_run(root, "ft", 0, 0.95, test=0.90)
    _write_run(root, "apt", 0, 0.91, test=0.90)
    _write_run(root, "apt", 1, None, hist=[(10.0, 0.5)], test=0.70)
    _write_run(root, "lora", 0, None, hist=[(10.0, 0.5)], test=0.80)
    md = write_report(root).read_text()
    res = {k[0]: v for k, v in _read_csv(root / "results.csv").items()}
    assert float(res["apt"]["val_minus_test"]) == pytest.approx(0.01)  # seed 1 left out, not 0.91 - 0.80
    assert float(res["apt"]["test_mean"]) == pytest.approx(0.80) and res["apt"]["test_n"] == "2"
    assert res["lora"]["val_minus_test"] == "" and res["lora"]["test_n"] == "1"
    assert "| lora | 80.00 (n=1) | 88.9 | – |" in md
    assert "Selection against test:" not in md  # two variants with both numbers: too few to rank
