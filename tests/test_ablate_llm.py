"""apt-ablate on causal LMs: the suite's `evaluation` block, the generation benchmark and the zero-shot phase
of causal-LM runs (a fake apt-eval), and the report's lower-is-better metric (eval loss), zero-shot tables
and % of LoRA; classifier suites unchanged."""

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_ablate import _suite, _write_run, needs_glue
from test_llama import hard_masks, tiny_decoder, with_adapters

from apt_lightning.callbacks.efficiency import time_to_accuracy
from apt_lightning.tools.report import causal_lm, collect_runs, effects, write_report
from apt_lightning.tools.report.summary import add_tta, summarize
from apt_lightning.tools.suite import cli, compose, evaluation, inference, layout, train
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite
from apt_lightning.tools.suite.spec import SuiteError

ZS_TASKS = {"arc_easy": (100, 0.25), "piqa": (50, 0.5)}  # name: (items, chance)


# ---------------------------------------------------------------------- lower-is-better metrics
def test_best_metric_and_tta_of_a_loss():
    assert layout.best_metric(None, None, [2.0, 1.5, 1.7], "min") == 1.5
    assert layout.best_metric(None, None, [2.0, 1.5, 1.7]) == 2.0  # the classification default
    assert layout.best_metric({"best_metric": 1.6}, None, [1.5], "min") == 1.6  # the monitor's own word
    assert layout.metric_mode({"mode": "min"}, {"mode": "max"}) == "min"
    assert layout.metric_mode({}, {"mode": "min"}) == "min" and layout.metric_mode(None, None) == "max"
    history = [(10.0, 10, 2.0), (20.0, 20, 1.56), (30.0, 30, 1.50)]
    rows = [
        {"variant": "ft", "task_key": "t", "seed": 0, "status": "done", "best_metric": 1.5, "mode": "min"},
        {"variant": "apt", "task_key": "t", "seed": 0, "status": "done", "best_metric": 1.5, "mode": "min"},
    ]
    for r in rows:
        r["_history"] = history
    add_tta(rows, "ft")
    # 1.5 / 0.97 = 1.5464: 1.56 is not there yet, 1.50 is
    assert rows[1]["tta_threshold"] == pytest.approx(1.5 / 0.97) and rows[1]["tta_s"] == 30.0
    assert rows[1]["tta_source"] == "FT seed 0 / 0.97"
    timed = [{"wall_s": w, "metric": v} for w, _, v in history]
    assert rows[1]["tta_s"] == time_to_accuracy(timed, 1.5, 0.97, "min")


def test_efficiency_monitor_mode_only_where_the_default_is_wrong():
    loss = compose._efficiency_entry({}, "val/loss", "min")["init_args"]
    assert loss == {"monitor": "val/loss", "mode": "min"}
    assert compose._efficiency_entry({}, "val/accuracy", "max")["init_args"] == {"monitor": "val/accuracy"}
    assert compose.monitor_mode("sst2") == "max"


# ---------------------------------------------------------------------- the report of a causal-LM suite
def _zero_shot(shift: float) -> dict:
    tasks = {
        name: {
            "n": n,
            "acc": chance + 0.1 + shift,
            "acc_stderr": 0.02,
            "acc_norm": chance + 0.12 + shift,
            "acc_norm_stderr": 0.02,
            "chance": chance,
        }
        for name, (n, chance) in ZS_TASKS.items()
    }
    average = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in ("acc", "acc_norm", "chance")}
    return {"model": "x", "tasks": tasks, "average": average, "limit": None}


def _llm_run(root: Path, variant: str, seed: int, losses: list[float], shift: float | None, **kw) -> Path:
    """A finished causal-LM run folder: eval loss history (lower is better), perplexity in metrics.csv,
    zero_shot.json (accuracies `shift` above a base), generation numbers in inference.json."""
    run = _write_run(root, variant, seed, min(losses), task="alpaca", **kw)
    meta = json.loads((run / "run.json").read_text())
    meta.update(monitor="val/loss", mode="min", task="instruction", task_label="Alpaca 10k")
    (run / "run.json").write_text(json.dumps(meta))
    eff_path = run / "logs" / "efficiency.json"
    if eff_path.is_file():
        eff = json.loads(eff_path.read_text())
        eff.update(monitor="val/loss", mode="min")
        eff["metric_history"] = [
            {"step": 10 * (i + 1), "wall_s": 10.0 * (i + 1), "metric": v} for i, v in enumerate(losses)
        ]
        eff_path.write_text(json.dumps(eff))
    with (run / "logs" / "metrics.csv").open("w") as f:
        f.write("step,val/loss,val/perplexity\n")
        f.writelines(f"{10 * (i + 1)},{v},{torch.tensor(v).exp().item()}\n" for i, v in enumerate(losses))
    if not kw.get("efficiency", True):  # only the history says which loss was best
        done = json.loads((run / "done.json").read_text())
        del done["best_metric"]
        (run / "done.json").write_text(json.dumps(done))
    if shift is not None:
        (run / "zero_shot.json").write_text(json.dumps(_zero_shot(shift)))
    speed = 2.0 if variant.startswith("apt") else 1.0
    (run / "inference.json").write_text(
        json.dumps(
            {
                "kind": "causal-lm",
                "model": {
                    "prefill_tokens_per_s": 1000.0 * speed,
                    "decode_tokens_per_s": 100.0 * speed,
                    "peak_mb": 50.0 / speed,
                    "params": 10 / speed,
                    "rounds_decode_tokens_per_s": [100.0 * speed] * 3,
                },
                "dense": {
                    "prefill_tokens_per_s": 1000.0,
                    "decode_tokens_per_s": 100.0,
                    "peak_mb": 50.0,
                    "params": 10,
                },
                "settings": {"batch_size": 8, "prompt_len": 128, "new_tokens": 128, "kv_cache": "static"},
                "device_name": "Fake GPU",
                "dtype": "bf16",
            }
        )
    )
    return run


def _results(root: Path) -> dict:
    with (root / "results.csv").open() as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_perplexity_counts_the_validations_of_the_best_metric(tmp_path):
    """The lowest perplexity was logged mid-pruning (a wider model): the row's perplexity is that of the
    best eval loss over the validations at the final structure, as the best metric is."""
    losses, final = [2.0, 1.3, 1.6, 1.5], [False, False, True, True]
    run = _llm_run(tmp_path, "apt", 0, losses, None, sparsity=0.3)
    eff_path = run / "logs" / "efficiency.json"
    eff = json.loads(eff_path.read_text())
    for entry, at_final in zip(eff["metric_history"], final, strict=True):
        entry["at_final_structure"] = at_final
    eff["best_metric"] = 1.5  # what EfficiencyMonitor records: the best of the counted validations
    eff_path.write_text(json.dumps(eff))
    (row,) = collect_runs(tmp_path)
    assert row["best_metric"] == 1.5 and row["best_over"] == "2 of 4, steps 30-40"
    assert row["perplexity"] == pytest.approx(torch.tensor(1.5).exp().item(), rel=1e-6)
    # a run that monitors something else has no perplexity the best metric speaks for
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "monitor": "val/accuracy", "mode": "max"}))
    assert collect_runs(tmp_path)[0]["perplexity"] is None


def test_report_of_a_causal_lm_suite(tmp_path):
    root = tmp_path / "suite"
    _llm_run(root, "ft", 0, [2.0, 1.60, 1.50], 0.06, peak=4000.0)
    for seed, shift in enumerate((0.04, 0.05, 0.06)):
        _llm_run(root, "lora", seed, [2.1, 1.70, 1.60], shift, peak=2000.0)
    for seed, (shift, losses) in enumerate(
        ((0.0, [2.2, 1.54, 1.52]), (0.01, [2.2, 1.9, 1.8]), (0.02, [2.2, 1.55, 1.53]))
    ):
        _llm_run(root, "apt", seed, losses, shift, sparsity=0.3, peak=1500.0)
    _llm_run(root, "no_distillation", 0, [2.3, 1.9], -0.05, sparsity=0.3, efficiency=False)
    (root / "_dense").mkdir()
    (root / "_dense" / "zero_shot_abc.json").write_text(
        json.dumps({"backbone": "smollm2-135m", **_zero_shot(-0.02)})
    )
    (root / "suite.json").write_text(
        json.dumps(
            {
                "name": "llm",
                "reference": "ft",
                "evaluation": {"reference": "lora", "limit": 50},
                "benchmark": {"batch_size": 8, "prompt_len": 128, "new_tokens": 128, "kv_cache": "static"},
                "variants": [
                    {"name": n, "overlay": "", "base": ""} for n in ("apt", "no_distillation", "lora", "ft")
                ],
                "tasks": {"alpaca": {"task": "instruction", "label": "Alpaca 10k"}},
            }
        )
    )
    md = write_report(root).read_text()
    res = _results(root)
    apt, lora = res["apt"], res["lora"]
    assert apt["mode"] == "min" and float(apt["metric_mean"]) == pytest.approx((1.52 + 1.8 + 1.53) / 3)
    # the metrics.csv fallback (no efficiency.json) takes the lowest loss too
    assert float(res["no_distillation"]["metric_mean"]) == pytest.approx(1.9)
    base = sum(c + 0.1 for _, c in ZS_TASKS.values()) / 2
    assert float(apt["zs_acc_mean"]) == pytest.approx(base + 0.01)
    assert float(lora["zs_acc_mean"]) == pytest.approx(base + 0.05) and float(
        lora["zs_acc_std"]
    ) == pytest.approx(0.01)
    assert float(apt["zs_pct_of_ref"]) == pytest.approx(100 * (base + 0.01) / (base + 0.05))
    assert float(apt["zs_norm_pct_of_ref"]) == pytest.approx(100 * (base + 0.03) / (base + 0.07))
    assert float(lora["zs_pct_of_ref"]) == 100.0 and apt["zs_n"] == "3"
    assert float(apt["perplexity_mean"]) == pytest.approx(
        sum(torch.tensor(v).exp().item() for v in (1.52, 1.8, 1.53)) / 3, rel=1e-5
    )
    assert float(apt["inf_decode_speedup"]) == 2.0 and float(apt["inf_prefill_speedup"]) == 2.0
    assert apt["inf_kind"] == "causal-lm"
    # TTA: down to FT's 1.50 / 0.97 = 1.5464 (seed 0 at 20 s, seed 1 never, seed 2 at 30 s); FT at 30 s
    assert apt["tta_reached"] == "2/3" and float(apt["tta_s"]) == pytest.approx(25.0)
    assert float(apt["tta_vs_ft"]) == pytest.approx(25.0 / 30.0)
    assert float(apt["memory_vs_ft"]) == pytest.approx(1500 / 4000)
    rows = collect_runs(root)
    add_tta(rows, "ft")
    summary = summarize(rows, "ft", zero_shot_reference="lora")
    got = {e["variant"]: e for e in effects(summary, json.loads((root / "suite.json").read_text()))}
    assert got["no_distillation"]["metric"] == "zero-shot average acc"
    assert got["no_distillation"]["effect"] == pytest.approx(100 * (-0.05 - 0.01))

    lora_avg = 100 * (base + 0.05)
    for needle in (
        "best dev loss (lower is better), mean ± std | as % of FT ± s.e. |",
        "## Zero-shot accuracy",
        f"| apt | {100 * (base + 0.01):.2f} ± 1.00 (n=3) | {100 * (base + 0.01) / (base + 0.05):.1f} |",
        f"| lora | {lora_avg:.2f} ± 1.00 (n=3) | 100.0 |",
        "| `smollm2-135m` (untuned) |",
        "| chance | 25.0 | 50.0 |",
        "| n (items) | 100 | 50 |",
        "| apt | 36.0 ±2.0 (+11.0) | 61.0 ±2.0 (+11.0) |",
        "decode tok/s",
        "| apt | 0.50 | 2000 | 2.00x | 200 | 2.00x | 25 | 0.50 |",
        "FT run's best loss / 0.97",
        "on the first 50 items of each task",
        "**% of lora**",
    ):
        assert needle in md, needle
    assert "samples/s" not in md  # no classifier inference table, nor its definition
    assert "CUDA graph" not in md  # this suite's benchmark did not replay graphs


def test_generation_definition_says_when_cuda_graphs_replayed():
    bench = {"batch_size": 32, "prompt_len": 256, "new_tokens": 64, "kv_cache": "static"}
    plain = "\n".join(causal_lm.definitions(bench, None, None))
    graphs = "\n".join(causal_lm.definitions({**bench, "cuda_graphs": True}, None, None))
    assert "64 greedy decode steps through a static KV cache" in plain and "CUDA graph" not in plain
    assert "each replayed as a CUDA graph" in graphs


def test_classifier_report_has_no_causal_lm_parts(tmp_path):
    root = tmp_path / "suite"
    _write_run(root, "ft", 0, 0.9, inf=1000.0)
    _write_run(root, "apt", 0, 0.88, sparsity=0.6, inf=2000.0)
    md = write_report(root).read_text()
    assert "Zero-shot" not in md and "decode tok/s" not in md and "**generation**" not in md
    assert "| apt | 0.50 | 2000 | 2.00x |" in md  # the classifier inference table as before
    row = next(r for r in collect_runs(root) if r["variant"] == "apt")
    assert row["mode"] == "max" and row["zs_acc"] is None and row["inf_kind"] == "classifier"


# ---------------------------------------------------------------------- suite file
@needs_glue
@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"limt": 5}, "evaluation: unknown keys \\['limt'\\]"),
        ({"limit": 0}, "limit must be a positive integer or null, got 0"),
        ({"limit": 2.5}, "limit must be a positive integer or null"),
        ({"batch_size": "8"}, "batch_size must be a positive integer"),
        ({"tasks": []}, "tasks must be 'all' or a non-empty list"),
        ({"dtype": "fp16"}, "dtype must be auto, float32, bfloat16 or float16"),
        ({"reference": "nope"}, "evaluation.reference 'nope' is not one of the variants"),
        ({"data_root": "/no/such/folder"}, "data_root /no/such/folder is not a folder"),
        ({"backbone": "yes"}, "backbone must be true or false"),
    ],
)
def test_bad_evaluation_blocks_fail_early(tmp_path, block, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(_suite(tmp_path, variants=["apt", "lora", "ft"], evaluation=block))


@needs_glue
def test_evaluation_is_off_unless_asked(tmp_path):
    assert load_suite(_suite(tmp_path)).evaluation is None
    suite = load_suite(_suite(tmp_path, variants=["lora", "ft"], evaluation={"tasks": ["arc_easy", "piqa"]}))
    assert suite.evaluation["tasks"] == "arc_easy,piqa" and suite.evaluation["reference"] == "lora"
    assert load_suite(_suite(tmp_path, variants=["ft"], evaluation={"reference": None})).evaluation[
        "backbone"
    ]
    with pytest.raises(SuiteError, match="kv_cache must be static or dynamic"):
        load_suite(_suite(tmp_path, benchmark={"kv_cache": "paged"}))


@needs_glue
def test_a_run_records_its_metric_mode_and_loses_stale_evaluations(tmp_path):
    suite = load_suite(_suite(tmp_path))
    run = plan(suite)[0]
    train._prepare(suite, run)
    assert json.loads((run.run_dir / "run.json").read_text())["mode"] == "max"
    (run.run_dir / "export").mkdir()
    (run.run_dir / "zero_shot.json").write_text("{}")
    train._prepare(suite, run)  # a rerun: an earlier attempt's export and scores are not this run's
    assert not (run.run_dir / "export").exists() and not (run.run_dir / "zero_shot.json").exists()


# ---------------------------------------------------------------------- the phases on causal-LM runs
FAKE_EVAL = """
import json, os, pathlib, sys
argv = sys.argv[1:]
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(json.dumps(argv) + "\\n")
with open(sys.argv[0] + ".gpus", "a") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset") + "\\n")
arg = lambda flag: argv[argv.index(flag) + 1] if flag in argv else None
if arg("--model-dir"):
    sidecar = json.loads((pathlib.Path(arg("--model-dir")) / "apt_shapes.json").read_text())
    assert sidecar["model_class"].endswith("ForCausalLM"), sidecar
    if "broken" in arg("--model-dir"):
        print("apt-eval: error: the model broke"); sys.exit(2)
shift = 0.0 if arg("--backbone") else 0.05
tasks = {t: {"n": int(arg("--limit")), "acc": 0.4 + shift, "acc_stderr": 0.05, "acc_norm": 0.45,
             "acc_norm_stderr": 0.05, "chance": 0.25} for t in arg("--tasks").split(",")}
out = {"model": arg("--model-dir") or arg("--backbone"), "tasks": tasks,
       "average": {"acc": 0.4 + shift, "acc_norm": 0.45, "chance": 0.25}, "limit": int(arg("--limit"))}
pathlib.Path(arg("--out")).write_text(json.dumps(out))
"""


class _FakeModule:
    """What `load_final_module` returns for the runs below: a tiny LLaMA causal LM (adapters, hard masks) or
    a classifier, by what the placeholder checkpoint says."""

    def __init__(self, ckpt: Path, backbone: Path) -> None:
        kind = ckpt.read_text()
        self.hparams = {"backbone": str(backbone), "task": "sst2", "_class_path": "x"}
        if kind == "classifier":
            self.student = tiny_model("bert")
        else:
            self.student = with_adapters(tiny_decoder(attn_implementation="sdpa"))
            hard_masks(self.student)


@pytest.fixture
def llm_suite(tmp_path, tiny_backbone_dir, monkeypatch):
    """A suite whose finished runs hold tiny causal LMs (one broken for apt-eval) and one classifier, and a
    fake apt-eval that checks it gets an exported causal LM."""
    script = tmp_path / "fake_apt_eval.py"
    script.write_text(FAKE_EVAL)
    monkeypatch.setattr(evaluation, "eval_command", lambda: [sys.executable, str(script)])
    monkeypatch.setattr(inference, "load_final_module", lambda ckpt: _FakeModule(ckpt, tiny_backbone_dir))
    variants = [
        "ft",
        "apt",
        "lora",
        {"name": "broken", "overlay": "apt"},
        {"name": "classifier", "overlay": "apt"},
    ]
    block = {
        "tasks": ["arc_easy", "piqa"],
        "limit": 7,
        "batch_size": 4,
        "device": "cpu",
        "data_root": str(tmp_path),
    }
    bench = {"batch_size": 1, "seq_len": 16, "prompt_len": 4, "new_tokens": 2, "device": "cpu"}
    bench.update(warmup=0, repeats=1, rounds=1)
    suite = load_suite(_suite(tmp_path, variants=variants, evaluation=block, benchmark=bench))
    runs = plan(suite)
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0}))
        (run.run_dir / "final.ckpt").write_text(
            "classifier" if run.variant.name == "classifier" else "causal"
        )
        (run.run_dir / "run.json").write_text(
            json.dumps({"variant": run.variant.name, "backbone": "tiny-base"})
        )
    return suite, runs, script


@needs_glue
def test_bench_and_eval_phases_of_causal_lm_runs(llm_suite, capsys):
    suite, runs, script = llm_suite
    by_name = {r.variant.name: r for r in runs}
    benched = inference.bench_runs(suite, runs, log=lambda _: None)
    assert sorted(benched["done"]) == sorted(r.run_id for r in runs) and not benched["failed"]
    info = json.loads((by_name["apt"].run_dir / "inference.json").read_text())
    assert info["kind"] == "causal-lm" and info["model"]["decoded_tokens"] == 2
    assert info["model"]["decode_tokens_per_s"] > 0 and info["dense"]["decode_tokens_per_s"] > 0
    assert info["model"]["params"] < info["dense"]["params"]  # the export against the full architecture
    assert (by_name["apt"].run_dir / "export" / "apt_shapes.json").is_file()
    assert json.loads((by_name["classifier"].run_dir / "inference.json").read_text())["kind"] == "classifier"
    assert not (by_name["classifier"].run_dir / "export").exists()
    assert len(list((suite.output_dir / "_dense").glob("*.json"))) == 2  # one dense LM, one dense classifier

    result = evaluation.evaluate_runs(suite, runs, log=lambda _: None)
    assert sorted(result["done"]) == sorted(by_name[v].run_id for v in ("ft", "apt", "lora"))
    assert result["failed"] == [by_name["broken"].run_id]
    assert by_name["classifier"].run_id in result["skipped"]
    scores = json.loads((by_name["apt"].run_dir / "zero_shot.json").read_text())
    assert scores["average"]["acc"] == pytest.approx(0.45) and set(scores["tasks"]) == {"arc_easy", "piqa"}
    assert scores["settings"]["limit"] == 7 and "--model-dir" in scores["command"]
    error = json.loads((by_name["broken"].run_dir / "zero_shot_failed.json").read_text())["error"]
    assert "exit 2" in error and "the model broke" in error
    calls = [json.loads(line) for line in Path(f"{script}.calls").read_text().splitlines()]
    assert len(calls) == 5  # four exported LMs and the backbone, once
    backbone_call = next(c for c in calls if "--backbone" in c)
    assert backbone_call[backbone_call.index("--backbone") + 1] == "tiny-base"
    for flag, value in (("--limit", "7"), ("--batch-size", "4"), ("--device", "cpu"), ("--dtype", "float32")):
        assert all(c[c.index(flag) + 1] == value for c in calls), flag
    assert len(list((suite.output_dir / "_dense").glob("zero_shot_*.json"))) == 1

    # done runs are skipped, the failed one retried; `apt-ablate eval` runs this phase alone
    assert cli.main(["eval", str(suite.path), "--variants", "apt", "broken"]) == 0
    assert len(Path(f"{script}.calls").read_text().splitlines()) == 6
    capsys.readouterr()

    (suite.output_dir / "suite.json").write_text(
        json.dumps({"evaluation": {"reference": "lora"}, "reference": "ft"})
    )
    md = write_report(suite.output_dir).read_text()
    assert "## Zero-shot accuracy" in md and "| `tiny-base` (untuned) | 40.00 |" in md
    assert "| apt | 45.00 (n=1) | 100.0 |" in md and "decode tok/s" in md


@needs_glue
def test_evaluations_run_in_parallel_over_the_suites_gpus(llm_suite):
    """apt-eval processes take the suite's GPUs (CUDA_VISIBLE_DEVICES), `parallel` at a time; without GPUs
    the variable is left as it is."""
    suite, runs, script = llm_suite
    gpus = Path(f"{script}.gpus")
    evaluation.evaluate_runs(
        dataclasses.replace(suite, gpus=["0", "1"], parallel=2), runs, log=lambda _: None
    )
    seen = gpus.read_text().split()
    assert len(seen) == 5 and set(seen) == {"0", "1"}
    gpus.unlink()
    evaluation.evaluate_runs(dataclasses.replace(suite, gpus=None, parallel=3), runs, force=True, log=print)
    assert set(gpus.read_text().split()) == {os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}


def test_effects_of_a_loss_without_zero_shot_scores_keep_the_loss_units():
    """Without zero-shot accuracies the effect on a loss is its difference in the loss's units (not x100
    points), and the report says which unit each row is in."""

    def row(variant, metric, std, **kw):
        base = {"variant": variant, "task_key": "alpaca", "task": "instruction", "monitor": "val/loss"}
        return {**base, "mode": "min", "metric_mean": metric, "metric_std": std, **kw}

    summary = [row("apt", 3.31, 0.05), row("no_distillation", 2.81, None)]
    (got,) = effects(summary, {"reference": "ft"})
    assert got["unit"] == "val/loss" and got["effect"] == pytest.approx(-0.5) and got["clear"]
    accuracy = [
        {**row("apt", 0.90, 0.01), "monitor": "val/accuracy", "mode": "max"},
        {**row("no_tuning", 0.88, None), "monitor": "val/accuracy", "mode": "max"},
    ]
    (got,) = effects(accuracy, {"reference": "ft"})
    assert got["unit"] == "pts" and got["effect"] == pytest.approx(-2.0)
