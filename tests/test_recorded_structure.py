"""A model pruned to a run's recorded structure (`prune_to_structure`) has the parameter shapes of the run's
export; structures that do not fit are refused, naming the value; `apt-ablate bench --from-structure` times
such models for a causal-LM suite without checkpoints, marks inference.json, and the report says so."""

import json

import pytest
import torch
import yaml
from helpers_apt import make_module, quiet_trainer, repeated_batch_loader
from helpers_causal import save_tiny_causal_backbone
from safetensors.torch import load_file
from test_ablate import _suite, needs_glue
from test_llama import hard_masks, tiny_decoder, with_adapters
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from apt_lightning import APTModule
from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.export import WEIGHTS, export_pruned, load_pruned
from apt_lightning.pruning import (
    BlockTensors,
    StructureError,
    kept_kv_groups,
    kept_param_count,
    prune_to_structure,
)
from apt_lightning.structure import get_structure
from apt_lightning.structure.families.llama import SkippedSelfAttention
from apt_lightning.tools.report import collect_runs, write_report
from apt_lightning.tools.suite import cli, inference
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite

pytestmark = pytest.mark.usefixtures("one_thread")


def record(model) -> dict:
    """A pruning.json event of the model's hard masks, recorded as AdaptivePruning records its decisions."""
    structure = get_structure(model)
    shapes, keep = structure.shapes(), BlockTensors.from_masks(structure.masks)
    heads, neurons, hidden = keep.counts()
    event = {"event": 0, "params_kept": kept_param_count(keep, shapes), "heads_per_layer": heads}
    event.update(neurons_per_layer=neurons, hidden_kept=hidden)
    if shapes.kv_groups:
        event["kv_groups_per_layer"] = kept_kv_groups(keep, shapes)
    return event


def assert_export_shapes(built, folder) -> None:
    """Every tensor of the export's weights file has its shape in `built`, which has nothing else but tied
    copies, and as many parameters as the export loaded back."""
    saved = {k: tuple(v.shape) for k, v in load_file(str(folder / WEIGHTS)).items()}
    mine = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert {k: mine.get(k) for k in saved} == saved
    assert set(mine) - set(saved) <= {"lm_head.weight"}  # tied to the input embedding, saved once
    loaded = load_pruned(folder)
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in loaded.parameters())
    assert get_structure(built).shapes().same_widths(get_structure(loaded).shapes())


def fit_pruned(backbone, tmp_path, sparsity: float) -> tuple[APTModule, AdaptivePruning]:
    """A short real APT pruning run (compaction at every event) on a tiny backbone."""
    module = make_module(backbone)
    pruning = AdaptivePruning(
        target_sparsity=sparsity, start_step=2, end_step=8, num_events=3, decay_steps=1, plot=False
    )
    quiet_trainer(max_steps=10, callbacks=[pruning], default_root_dir=tmp_path).fit(
        module, train_dataloaders=repeated_batch_loader(10)
    )
    return module, pruning


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LLaMA classifier backbone (grouped-query attention: 6 query heads in 3 KV groups per layer)
    whose vocabulary covers `repeated_batch_loader`'s token ids."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_decoder("seqcls", vocab_size=3000, num_labels=2).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------- shapes of the export
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_model_rebuilt_from_a_pruning_log_has_the_export_shapes(arch, backbone, tiny_llama_dir, tmp_path):
    folder = backbone if arch == "bert" else tiny_llama_dir
    module, pruning = fit_pruned(folder, tmp_path, sparsity=0.5)
    log = tmp_path / "pruning.json"
    log.write_text(json.dumps(pruning.summary()))
    export_pruned(module.student, tmp_path / "export")
    final = pruning.history[-1]
    assert final["hidden_kept"] < 32 or arch == "llama"  # the BERT search also cut hidden dims
    assert ("kv_groups_per_layer" in final) == (arch == "llama")
    if arch == "llama":  # recorded after earlier compactions: a layer lost its attention or a KV group
        assert any(len(groups) < 3 for groups in final["kv_groups_per_layer"])

    built = APTModule(backbone=str(folder), task="sst2", adapters=None, pretrained=False).student
    shapes = prune_to_structure(built, log)
    assert shapes.counted_params() == final["params_kept"]
    assert shapes.heads == final["heads_per_layer"] and shapes.hidden == final["hidden_kept"]
    assert shapes.full().same_widths(get_structure(module.student).shapes().full())
    assert_export_shapes(built, tmp_path / "export")


@pytest.mark.parametrize("compacted_before", [False, True])
def test_uneven_and_emptied_kv_groups_and_removed_sublayers(compacted_before, tmp_path):
    """Layer 0 without heads, layer 1 without neurons and with a KV group emptied, layer 2 uneven groups. An
    event after an earlier compaction lists only the groups left then: the same shapes."""
    model = with_adapters(tiny_decoder())
    hard_masks(model)
    event = record(model)
    assert event["kv_groups_per_layer"] == [[0, 0, 0], [0, 2, 1], [1, 2, 2], [2, 2, 2]]
    if compacted_before:
        event["kv_groups_per_layer"][1] = [2, 1]
        event["kv_groups_per_layer"][0] = []
    export_pruned(model, tmp_path / "export")

    built = tiny_decoder(seed=1, attn_implementation="sdpa")
    shapes = prune_to_structure(built, event)
    assert shapes.kv_groups == [[], [2, 1], [1, 2, 2], [2, 2, 2]] and shapes.neurons[1] == 0
    assert isinstance(built.model.layers[0].self_attn, SkippedSelfAttention)
    assert_export_shapes(built, tmp_path / "export")
    index = built.model.layers[2].self_attn.apt_kv_index  # each query head reads its own group's KV head
    assert index.tolist() == load_pruned(tmp_path / "export").model.layers[2].self_attn.apt_kv_index.tolist()


# ---------------------------------------------------------------------- structures that do not fit
BERT_EVENT = {"event": 2, "heads_per_layer": [4, 2, 0], "neurons_per_layer": [48, 10, 0], "hidden_kept": 24}
LLAMA_EVENT = {
    "event": 5,
    "heads_per_layer": [6, 3, 0, 1],
    "neurons_per_layer": [40, 20, 0, 1],
    "hidden_kept": 48,
    "kv_groups_per_layer": [[2, 2, 2], [2, 1], [], [0, 0, 1]],
}


def test_a_fitting_structure_is_cut_to_exactly_its_counts():
    from conftest import tiny_model

    bert = tiny_model()
    assert prune_to_structure(bert, BERT_EVENT).heads == [4, 2, 0]
    llama = tiny_decoder()
    shapes = prune_to_structure(llama, LLAMA_EVENT)
    assert shapes.kv_groups == [[2, 2, 2], [2, 1], [], [1]] and shapes.neurons == [40, 20, 0, 1]


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("bert", {"heads_per_layer": [4, 2]}, "heads_per_layer lists 2 layers, the BertForSequence.* has 3"),
        ("bert", {"heads_per_layer": [4, 5, 0]}, r"heads_per_layer\[1\] = 5 exceeds the 4 heads of layer 1"),
        ("bert", {"neurons_per_layer": [48, -1, 0]}, "neurons_per_layer must be a list of non-negative int"),
        ("bert", {"neurons_per_layer": [49, 1, 0]}, r"neurons_per_layer\[0\] = 49 exceeds the 48 neurons"),
        ("bert", {"hidden_kept": 33}, r"hidden_kept must be an integer in \[1, 32\].*got 33"),
        ("bert", {"hidden_kept": 0}, r"hidden_kept must be an integer in \[1, 32\]"),
        ("bert", {"kv_groups_per_layer": [[4], [2], []]}, "kv_groups_per_layer given, but the Bert.* has no"),
        ("bert", {"params_kept": 12345}, "counts 7392 parameters, the event recorded params_kept 12345"),
        ("bert", {"heads_per_layer": None}, "pruning event 2 has no heads_per_layer: its mask window never"),
        (
            "llama",
            {"kv_groups_per_layer": None},
            "has no kv_groups_per_layer, but the LlamaFor.* has grouped",
        ),
        ("llama", {"kv_groups_per_layer": [[2, 2, 2], [2, 1]]}, "kv_groups_per_layer must list 4 layers"),
        (
            "llama",
            {"kv_groups_per_layer": [[2, 2, 2], [1, 1, 0], [], [0, 0, 1]]},
            r"kv_groups_per_layer\[1\] = \[1, 1, 0\] adds up to 2 query heads, heads_per_layer\[1\] is 3",
        ),
        (
            "llama",
            {"kv_groups_per_layer": [[2, 2, 1, 1], [2, 1], [], [0, 0, 1]]},
            r"kv_groups_per_layer\[0\] = \[2, 2, 1, 1\] has 4 key/value groups, layer 0 of the .* has 3",
        ),
        (
            "llama",
            {"kv_groups_per_layer": [[2, 2, 2], [3, 0], [], [0, 0, 1]]},
            r"kv_groups_per_layer\[1\] = \[3, 0\] keeps more query heads in group 0 than .* has there \(2\)",
        ),
        (
            "llama",
            {"kv_groups_per_layer": [[2, 2, 2], "x", [], [1]]},
            r"kv_groups_per_layer\[1\] must be a list",
        ),
    ],
)
def test_structures_that_do_not_fit_are_refused(arch, change, message):
    from conftest import tiny_model

    model = tiny_model() if arch == "bert" else tiny_decoder()
    event = {**(BERT_EVENT if arch == "bert" else LLAMA_EVENT), **change}
    event = {k: v for k, v in event.items() if v is not None}
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(StructureError, match=message):
        prune_to_structure(model, event)
    if "params_kept" not in change:  # refused before the model was touched
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before


def test_pruning_logs_that_hold_no_structure(tmp_path):
    from conftest import tiny_model

    log = tmp_path / "pruning.json"
    with pytest.raises(FileNotFoundError, match=f"pruning log {log} not found"):
        prune_to_structure(tiny_model(), log)
    log.write_text(json.dumps({"events": [], "full_param_count": 1}))
    with pytest.raises(StructureError, match="records no pruning events: the run was never pruned"):
        prune_to_structure(tiny_model(), log)
    log.write_text('{"events": [')
    with pytest.raises(StructureError, match="cannot be read as a pruning log"):
        prune_to_structure(tiny_model(), log)
    log.write_text(json.dumps({"events": [BERT_EVENT, {"event": 3, "step": 9, "target_sparsity": 0.5}]}))
    with pytest.raises(StructureError, match=r"\(event 3\) has no heads_per_layer: its mask window never"):
        prune_to_structure(tiny_model(), log)


# ---------------------------------------------------------------------- the suite phase and the report
@needs_glue
def test_bench_from_structure_on_a_causal_lm_suite(tmp_path, monkeypatch, capsys):
    """apt pruned (its log), lora never pruned (dense), no_distillation prunes but lost its log (fails);
    no checkpoint is read; the timed model counts the log's params_kept; the report marks the numbers."""
    backbone = save_tiny_causal_backbone(tmp_path / "backbone")
    trained = AutoModelForCausalLM.from_pretrained(backbone)
    hard_masks(trained)
    event = record(trained)
    bench = {"batch_size": 1, "seq_len": 16, "prompt_len": 4, "new_tokens": 2, "device": "cpu"}
    bench.update(warmup=0, repeats=1, rounds=1)
    path = _suite(tmp_path, variants=["apt", "lora", "no_distillation"], reference=None, benchmark=bench)
    runs = {r.variant.name: r for r in plan(load_suite(path))}
    for name, run in runs.items():
        (run.run_dir / "logs").mkdir(parents=True)
        (run.run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0}))
        (run.run_dir / "run.json").write_text(json.dumps({"variant": name, "task": "instruction"}))
        config = {
            "model": {"class_path": "apt_lightning.APTModule", "init_args": {"backbone": str(backbone)}},
            "pruning": None if name == "lora" else {"init_args": {"target_sparsity": 0.5}},
        }
        config["model"]["init_args"].update(task="instruction", attn_implementation="eager")
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (runs["apt"].run_dir / "logs" / "pruning.json").write_text(json.dumps({"events": [event]}))

    def no_checkpoints(ckpt):
        raise AssertionError(f"{ckpt} read")

    timed_models = []  # (counted parameters, attention implementation) of each model timed
    real = inference.load_generation_benchmark()

    def timed(model, **kw):
        timed_models.append(
            (get_structure(model).shapes().counted_params(), model.config._attn_implementation)
        )
        return real(model, **kw)

    monkeypatch.setattr(inference, "load_final_module", no_checkpoints)
    monkeypatch.setattr(inference, "load_generation_benchmark", lambda: timed)
    assert cli.main(["bench", str(path), "--from-structure"]) == 0
    assert "no_distillation/sst2/seed0" in capsys.readouterr().err

    apt = json.loads((runs["apt"].run_dir / "inference.json").read_text())
    assert apt["source"] == "structure:logs/pruning.json" and apt["weights"] == "random"
    assert apt["kind"] == "causal-lm" and apt["model"]["decoded_tokens"] == 2
    assert apt["model"]["params"] < apt["dense"]["params"]
    lora = json.loads((runs["lora"].run_dir / "inference.json").read_text())
    assert lora["source"] == "structure:dense" and lora["model"]["params"] == lora["dense"]["params"]
    full = get_structure(trained).shapes().full().counted_params()
    # apt, the dense reference (cached once), lora; each with the attention an export loads with
    assert timed_models == [(event["params_kept"], "sdpa"), (full, "sdpa"), (full, "sdpa")]
    error = json.loads((runs["no_distillation"].run_dir / "inference_failed.json").read_text())["error"]
    assert "prunes (the pruning group) but has no logs/pruning.json" in error

    md = write_report(path.parent / "out").read_text()
    assert "decode tok/s" in md and "| apt | " in md
    note = "Timed from recorded structures (`apt-ablate bench --from-structure`): apt, lora. "
    assert note in md
    sources = {r["variant"]: r["inf_source"] for r in collect_runs(path.parent / "out")}
    assert sources == {
        "apt": "structure:logs/pruning.json",
        "lora": "structure:dense",
        "no_distillation": None,
    }


@needs_glue
def test_bench_from_structure_on_a_classifier_suite(tmp_path, tiny_backbone_dir, monkeypatch, capsys):
    """A classifier run is timed by apt-bench's `benchmark` on the architecture its pruning log records,
    against the dense classifier of the same backbone and task."""
    trained = AutoModelForSequenceClassification.from_pretrained(tiny_backbone_dir)
    shapes, masks = get_structure(trained).shapes(), get_structure(trained).install_masks()
    for layer, (heads, neurons) in enumerate(zip(shapes.heads, shapes.neurons, strict=True)):
        masks.set("head", (torch.arange(heads) >= layer % heads).float(), layer)  # layer i loses i heads
        masks.set("neuron", (torch.arange(neurons) < neurons // (layer + 2)).float(), layer)
    event = record(trained)
    bench = {"batch_size": 2, "seq_len": 8, "device": "cpu", "warmup": 0, "repeats": 1, "rounds": 1}
    path = _suite(tmp_path, variants=["apt"], reference=None, benchmark=bench)
    (run,) = plan(load_suite(path))
    (run.run_dir / "logs").mkdir(parents=True)
    (run.run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0}))
    (run.run_dir / "run.json").write_text(json.dumps({"variant": "apt", "task": "sst2"}))
    config = {
        "model": {"class_path": "apt_lightning.APTModule", "init_args": {"backbone": str(tiny_backbone_dir)}}
    }
    config["pruning"] = {"init_args": {"target_sparsity": 0.5}}
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run.run_dir / "logs" / "pruning.json").write_text(json.dumps({"events": [event]}))
    timed = []  # counted parameters of each model timed: the run's, then the dense reference's
    real = inference.load_benchmark()

    def benchmark(model, **kw):
        timed.append(get_structure(model).shapes().counted_params())
        return real(model, **kw)

    monkeypatch.setattr(inference, "load_benchmark", lambda: benchmark)
    assert cli.main(["bench", str(path), "--from-structure"]) == 0
    result = json.loads((run.run_dir / "inference.json").read_text())
    assert result["source"] == "structure:logs/pruning.json" and result["weights"] == "random"
    assert result["model"]["params"] < result["dense"]["params"]
    assert result["model"]["samples_per_s"] > 0
    assert timed == [event["params_kept"], get_structure(trained).shapes().full().counted_params()]
    # numbers of a real export are never replaced by random-weight timings, not even under --force
    exported = {**result, "model": {**result["model"], "samples_per_s": 1.0}}
    del exported["source"], exported["weights"]
    (run.run_dir / "inference.json").write_text(json.dumps(exported))
    assert cli.main(["bench", str(path), "--from-structure", "--force"]) == 0
    assert json.loads((run.run_dir / "inference.json").read_text()) == exported
    assert "was measured on the trained export" in capsys.readouterr().out


def test_report_notes_only_variants_timed_from_structures(tmp_path):
    from test_ablate import _write_run

    root = tmp_path / "suite"
    _write_run(root, "ft", 0, 0.9, inf=1000.0)
    for seed in (0, 1):
        run = _write_run(root, "apt", seed, 0.88, sparsity=0.6, inf=2000.0)
        if seed == 0:
            info = json.loads((run / "inference.json").read_text())
            (run / "inference.json").write_text(json.dumps({**info, "source": "structure:logs/pruning.json"}))
    md = write_report(root).read_text()
    assert "| apt | 0.50 | 2000 | 2.00x |" in md  # the table as before
    assert "from-structure`): apt (some of its runs). There the timed model" in md
    sources = {(r["variant"], str(r["seed"])): r["inf_source"] for r in collect_runs(root)}
    assert sources == {
        ("ft", "0"): "export",
        ("apt", "0"): "structure:logs/pruning.json",
        ("apt", "1"): "export",
    }
