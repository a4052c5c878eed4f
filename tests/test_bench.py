"""apt-bench: pruning to a sparsity, the measurement function, the command line and its input errors."""

import io
import json

import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model
from helpers_apt import quiet_trainer

from apt_lightning.pruning import prune_to_sparsity
from apt_lightning.structure import get_structure, max_positions, preset_config
from apt_lightning.tools import bench
from apt_lightning.tools.bench import benchmark, cli, protocol, run_cli
from apt_lightning.tools.bench.models import alignment_warning, describe, warn_unaligned

FAST = [
    "--batch-sizes",
    "2",
    "3",
    "--seq-len",
    "8",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
]
RESULT_KEYS = {
    "model",
    "batch_size",
    "samples_per_s",
    "speedup_vs_dense",
    "latency_ms",
    "peak_mb",
    "memory_vs_dense",
    "weights_mb",
    "activation_mb",
    "memory_kind",
    "latency_ms_all",
    "latency_speedup_vs_dense",
    "throughput_from",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: extra threads only contend


# ---------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scorer", ["magnitude", "uniform", "random"])
def test_prune_to_sparsity_meets_budget(family, scorer):
    model = tiny_model(family)
    record = prune_to_sparsity(model, 0.5, scorer=scorer)
    assert record["params_kept"] <= record["budget"] == int(0.5 * record["params_full"])
    assert record["achieved_sparsity"] >= 0.5
    structure = get_structure(model)
    assert structure.masks is None  # physically compacted, no masks left
    s = structure.shapes()
    assert s.heads == record["heads_per_layer"] and s.neurons == record["neurons_per_layer"]
    assert s.hidden == record["hidden"]
    with torch.no_grad():
        assert model(**tiny_batch()).logits.shape == (4, 3)


def test_prune_to_sparsity_aligned_widths():
    model = tiny_model("bert")
    record = prune_to_sparsity(model, 0.4, multiple_of=8)
    assert record["hidden"] % 8 == 0
    assert all(f % 8 == 0 for f in record["neurons_per_layer"])
    assert record["params_kept"] <= record["budget"]


def test_prune_to_sparsity_zero_keeps_everything():
    model = tiny_model("bert")
    record = prune_to_sparsity(model, 0.0)
    assert record["achieved_sparsity"] == 0.0 and record["params_kept"] == record["params_full"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "scorer": "salience"}, "training batches"),
        ({"sparsity": 0.5, "multiple_of": 0}, "multiple_of"),
    ],
)
def test_prune_to_sparsity_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        prune_to_sparsity(tiny_model("bert"), **kw)


# ---------------------------------------------------------------------- measuring
def test_benchmark_returns_numbers():
    r = benchmark(
        tiny_model("roberta"), batch_size=2, seq_len=8, dtype="fp32", device="cpu", warmup=1, repeats=3
    )
    assert r["samples_per_s"] == pytest.approx(2 / (r["latency_ms"] / 1e3))
    assert len(r["latency_ms_all"]) == 3 and r["latency_ms_min"] <= r["latency_ms"]
    assert r["weights_mb"] > 0
    if r["memory_kind"] != "n/a":
        assert r["peak_mb"] >= r["weights_mb"]


def test_throughput_from_back_to_back_blocks():
    """With blocks, samples/s comes from the blocks' time per pass; latency stays the single passes'."""
    runner = bench.Runner(tiny_model("bert"), 2, 8)
    runner.timed(3)
    single = runner.result()
    assert single["throughput_from"] == "single passes" and single["block_ms_per_pass_all"] == []
    for _ in range(3):
        runner.timed_block(4)
    r = runner.result()
    assert r["throughput_from"] == "blocks of 4 passes" and len(r["block_ms_per_pass_all"]) == 3
    per_pass = sorted(r["block_ms_per_pass_all"])[1] / 1e3
    assert r["samples_per_s"] == pytest.approx(2 / per_pass)
    assert r["latency_ms"] == single["latency_ms"]
    with pytest.raises(ValueError, match="k >= 1"):
        runner.timed_block(0)


def test_blocks_sized_by_time_fill_about_that_time():
    """`passes_for` sizes a block from the median single pass; measure_all sizes each model once."""
    runner = bench.Runner(tiny_model("bert"), 2, 8)
    with pytest.raises(RuntimeError, match="no timed passes yet"):
        runner.passes_for(0.1)
    runner.timed(3)
    per_pass = sorted(runner.times)[1]
    assert runner.passes_for(per_pass * 37.5) == 38
    assert runner.passes_for(per_pass / 2) == protocol._MIN_BLOCK  # never fewer than 10
    models = {"dense": tiny_model("bert"), "small": tiny_model("bert", intermediate_size=8)}
    results = bench.measure_all(models, [2], 8, "fp32", "cpu", warmup=1, repeats=3, block_seconds=0.02)
    for r in results:
        passes = int(r["throughput_from"].removeprefix("blocks of ").removesuffix(" passes"))
        assert passes >= protocol._MIN_BLOCK and len(r["block_ms_per_pass_all"]) == 3
    with pytest.raises(ValueError, match="not both"):
        bench.measure_all(models, [2], 8, "fp32", "cpu", warmup=0, repeats=1, block=2, block_seconds=0.1)


def test_random_weights_follow_the_seed():
    """Same --seed, same random weights, hence the same pruned structure; another seed, another structure."""

    def structure(seed: int) -> dict:
        argv = ["--preset", "minilm-l6", "--sparsity", "0.6", "--batch-sizes", "1", "--seq-len", "8"]
        argv += ["--warmup", "0", "--repeats", "1", "--device", "cpu", "--seed", str(seed)]
        rec = run_cli(argv)["models"]["pruned 0.6"]["pruning"]
        return {k: rec[k] for k in ("heads_per_layer", "neurons_per_layer", "hidden")}

    assert structure(3) == structure(3)
    assert structure(3) != structure(4)


def test_unpadded_attention_matches_the_models_own_on_unpadded_inputs(family):
    attn = "sdpa"
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert bench.unpadded_attention(model) == f"unpadded_{attn}"
        assert bench.unpadded_attention(model) == f"unpadded_{attn}"  # idempotent
        after = model(input_ids=ids).logits
    assert model.config._attn_implementation == f"unpadded_{attn}"
    torch.testing.assert_close(after, before)
    eager = tiny_model(family)
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="'eager' cannot be captured in a CUDA graph here; use one of"):
        bench.unpadded_attention(eager)


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, got device 'cpu'"):
        benchmark(tiny_model("bert"), 2, 8, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager(dtype):
    """The captured forward computes what the eager one does, and its timing and memory are filled in."""
    model = tiny_model("roberta")
    model.set_attn_implementation("sdpa")
    runner = bench.Runner(model, 4, 16, dtype, "cuda", cuda_graphs=True)
    runner.timed(1)  # the first pass captures, warmed up or not
    runner.warm(2)
    runner.timed(2)
    with torch.inference_mode():
        eager = model(**runner.inputs).logits
    torch.testing.assert_close(runner.static_output.logits, eager)
    r = runner.result()
    assert r["cuda_graphs"] and r["repeats"] == 3 and r["latency_ms"] > 0
    assert r["activation_mb"] > 0 and r["host_ms"] >= 0


@pytest.mark.slow
def test_compiled_forward_matches_eager_and_compiles_outside_the_timed_passes():
    """Inductor compiles on the first pass; with no warm-up asked for, that pass is an extra untimed one."""
    model = tiny_model("bert")
    runner = bench.Runner(model, 2, 16, "fp32", "cpu", torch_compile=True)
    runner.timed(2)
    r = runner.result()
    assert r["torch_compile"] and r["warmup"] == 1 and r["repeats"] == 2
    with torch.inference_mode():
        torch.testing.assert_close(runner.forward(**runner.inputs).logits, model(**runner.inputs).logits)


def test_runner_passes_the_compile_mode(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    bench.Runner(tiny_model("bert"), 2, 8, torch_compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert seen == {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}


def test_compiled_runners_never_fall_back_to_eager(monkeypatch):
    """Dynamo recompiles the same forward for every model and input shape; past its default limit (8) it
    would run eager while the report says compiled. With the limit set to 2, four runners must each compile
    (tracing only, for speed)."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        before = counters["stats"]["unique_graphs"]
        for i in range(4):
            runner = bench.Runner(tiny_model("bert", seed=i), 2, 8 + i, "fp32", "cpu", torch_compile=True)
            runner.warm(1)
        assert counters["stats"]["unique_graphs"] - before == 4
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_forward_in_a_cuda_graph_matches_eager():
    model = tiny_model("roberta")
    model.set_attn_implementation("sdpa")
    runner = bench.Runner(model, 4, 16, "bf16", "cuda", cuda_graphs=True, torch_compile=True)
    runner.timed(2)
    with torch.inference_mode():
        eager = model(**runner.inputs).logits
    torch.testing.assert_close(runner.static_output.logits, eager, atol=2e-2, rtol=2e-2)
    r = runner.result()
    assert r["cuda_graphs"] and r["torch_compile"] and r["warmup"] == 1


def test_benchmark_rejects_too_long_inputs():
    with pytest.raises(ValueError, match="62 positions"):  # RoBERTa: 64 - (pad 1 + 1)
        benchmark(tiny_model("roberta"), 2, 63)


# ---------------------------------------------------------------------- command line
def _check_report(report, out):
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) >= {"env", "models", "results", "source", "command"}
    assert set(saved["env"]) >= {"device", "dtype", "seq_len", "warmup", "repeats", "torch"}
    names = list(saved["models"])
    assert names[0] == "dense"
    assert len(saved["results"]) == 2 * len(names)
    for r in saved["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["samples_per_s"] > 0 and r["latency_ms"] > 0
    dense = saved["models"]["dense"]
    for name in names[1:]:
        assert saved["models"][name]["params"] < dense["params"]
        assert saved["models"][name]["apt_params"] < dense["apt_params"]
    md = out.with_suffix(".md").read_text()
    assert "| model | params (M) | batch | samples/s | speedup vs dense |" in md
    assert md.count("\n| ") == len(saved["results"]) + 1
    assert not list(out.parent.glob("*.tmp"))
    return saved


def test_cli_model_dir(tmp_path, capsys):
    from apt_lightning.export import export_pruned

    model = tiny_model("bert")
    prune_to_sparsity(model, 0.5, scorer="uniform")
    folder = export_pruned(model, tmp_path / "pruned")
    out = tmp_path / "res" / "bench.json"
    report = run_cli(["--model-dir", str(folder), *FAST, "--out", str(out)])
    saved = _check_report(report, out)
    assert list(saved["models"]) == ["dense", "pruned"]
    assert saved["models"]["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.1)
    assert "| pruned |" in capsys.readouterr().out
    assert saved["env"]["order"] == "interleaved"
    seq = run_cli(["--model-dir", str(folder), *FAST, "--order", "sequential", "--out", str(out)])
    _check_report(seq, out)
    assert all(r["repeats"] == 2 and r["warmup"] == 1 for r in seq["results"])
    named_dense = export_pruned(model, tmp_path / "dense")  # a folder named like the reference
    both = run_cli(["--model-dir", str(named_dense), *FAST])
    assert list(both["models"]) == ["dense", "dense (model-dir)"]
    assert both["models"]["dense (model-dir)"]["sparsity"] == pytest.approx(0.5, abs=0.1)


def test_cli_config_json_several_sparsities(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("roberta", attn_implementation=None).to_dict()))
    out = tmp_path / "bench.json"
    report = run_cli(
        [
            "--config-json",
            str(cfg),
            "--sparsity",
            "0.3",
            "0.6",
            "--multiple-of",
            "4",
            "--scorer",
            "random",
            *FAST,
            "--block",
            "2",
            "--out",
            str(out),
        ]
    )
    saved = _check_report(report, out)
    assert list(saved["models"]) == ["dense", "pruned 0.3 (x4)", "pruned 0.6 (x4)"]
    assert all(len(r["block_ms_per_pass_all"]) == 2 for r in saved["results"])  # one block per round
    assert "+ 2 blocks of 2" in out.with_suffix(".md").read_text()
    rec = saved["models"]["pruned 0.6 (x4)"]["pruning"]
    assert rec["achieved_sparsity"] >= 0.6 and rec["scorer"] == "random" and rec["hidden"] % 4 == 0
    dense_rows = [r for r in saved["results"] if r["model"] == "dense"]
    assert all(r["speedup_vs_dense"] == 1.0 for r in dense_rows)


def test_cli_fuse_applies_to_every_model(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("bert", attn_implementation=None).to_dict()))
    out = tmp_path / "bench.json"
    report = run_cli(
        ["--config-json", str(cfg), "--sparsity", "0.5", "--fuse", "qkv", "gelu", *FAST, "--out", str(out)]
    )
    saved = _check_report(report, out)
    assert saved["env"]["fusions"] == ["qkv", "gelu"] and saved["env"]["block"] == 0  # CPU default
    assert saved["models"]["pruned 0.5"]["pruning"]["achieved_sparsity"] >= 0.5  # described before fusing
    assert "fused qkv+gelu" in out.with_suffix(".md").read_text()
    cfg.write_text(json.dumps(tiny_config("bert", attn_implementation=None, hidden_act="relu").to_dict()))
    with pytest.raises(SystemExit):
        run_cli(["--config-json", str(cfg), "--sparsity", "0.5", "--fuse", "gelu", *FAST])
    assert "--fuse gelu: the 'gelu' fusion needs a GELU activation" in capsys.readouterr().err


def test_cli_checkpoint(tmp_path, tiny_backbone_dir):
    from torch.utils.data import DataLoader

    from apt_lightning import APTModule

    data = [
        {
            "input_ids": torch.randint(5, 1000, (8,)),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(8)
    ]
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(APTModule(backbone=str(tiny_backbone_dir), task="sst2"), DataLoader(data, batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "b.json"
    report = run_cli(
        [
            "--checkpoint",
            str(ckpt),
            "--batch-sizes",
            "2",
            "--seq-len",
            "8",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert list(report["models"]) == ["dense", "last"]
    assert json.loads(out.read_text())["results"][1]["model"] == "last"


# ---------------------------------------------------------------------- input errors, before any work
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


P = ["--preset", "minilm-l6", "--sparsity", "0.5"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([*P, "--dtype", "fp8"], "invalid choice: 'fp8'"),
        ([*P, "--batch-sizes", "32", "0"], "positive integer (> 0), got 0"),
        ([*P, "--seq-len", "-4"], "got -4"),
        (["--preset", "minilm-l6", "--sparsity", "1.0"], "[0, 1)"),
        (["--preset", "minilm-l6", "--sparsity", "-0.2"], "got -0.2"),
        (["--preset", "minilm-l6", "--sparsity", "abc"], "'abc'"),
        ([*P, "--dtype", "bf16"], "--dtype bf16 needs a CUDA device"),
        ([*P, "--dtype", "fp16", "--device", "cpu"], "allowed on CPU: fp32"),
        ([*P, "--device", "cuda"], "--device cuda"),
        ([*P, "--cuda-graphs"], "--cuda-graphs needs a CUDA device; the chosen device is cpu"),
        ([*P, "--device", "tpu"], "invalid choice: 'tpu'"),
        (["--preset", "gpt-9"], "invalid choice: 'gpt-9'"),
        (["--preset", "minilm-l6"], "--sparsity is required"),
        (["--model-dir", "/nonexistent/folder"], "folder not found"),
        (["--checkpoint", "/nonexistent.ckpt"], "file not found"),
        (["--model-dir", ".", "--sparsity", "0.5"], "already pruned"),
        (["--model-dir", ".", "--even-kv-groups"], "--even-kv-groups / --random-weights apply to"),
        ([*P, "--random-weights"], "--random-weights goes with --backbone"),
        ([*P, "--scorer", "salience"], "invalid choice: 'salience'"),
        ([*P, "--out", "x.md"], "give the JSON path"),
        (["--sparsity", "0.5"], "one of the arguments"),
        ([*P, "--backbone", "minilm-l6"], "not allowed with"),
        ([*P, "--fuse", "rope"], "invalid choice: 'rope'"),
        ([*P, "--block", "-1"], "--block must be >= 0"),
        ([*P, "--block-seconds", "0"], "--block-seconds must be > 0, got 0.0"),
        ([*P, "--block", "5", "--block-seconds", "0.1"], "not allowed with"),
    ],
)
def test_cli_errors(argv, needle, capsys, no_cuda, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "load_models", fail)
    with pytest.raises(SystemExit) as exc:
        run_cli(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_seq_len_beyond_positions(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("bert", attn_implementation=None).to_dict()))
    with pytest.raises(SystemExit):
        run_cli(["--config-json", str(cfg), "--sparsity", "0.5", "--seq-len", "65", "--device", "cpu"])
    assert "--seq-len 65 exceeds the model's 64 position embeddings" in capsys.readouterr().err


def test_cli_unknown_backbone_offline_suggests_preset(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        run_cli(["--backbone", "roberta-base", "--sparsity", "0.5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "roberta-base" in err and "--preset roberta-base" in err


def test_console_entry_returns_none(tmp_path, capsys):
    """The console script runs sys.exit(main()): a returned report would become exit status 1."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("bert", attn_implementation=None).to_dict()))
    assert bench.main(["--config-json", str(cfg), "--sparsity", "0.5", *FAST]) is None
    assert "| pruned 0.5 |" in capsys.readouterr().out


def test_presets_match_published_shapes():
    c = preset_config("roberta-base")
    shape = (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings,
        c.type_vocab_size,
        c.pad_token_id,
    )
    assert shape == (768, 12, 12, 3072, 50265, 514, 1, 1)
    assert max_positions(c) == 512  # RoBERTa: 514 positions less pad + 1
    m = preset_config("minilm-l6")
    assert (m.hidden_size, m.num_hidden_layers, m.intermediate_size) == (384, 6, 1536)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("t5")


def test_alignment_warning_names_the_unaligned_widths():
    assert alignment_warning("x8", {"neurons_per_layer": [1376, 1384, 0], "hidden": 576}) is None
    message = alignment_warning("x1", {"neurons_per_layer": [1379, 1379, 1378], "hidden": 576})
    assert message.startswith("x1: widths 1378, 1379 are not multiples of 8") and "--multiple-of 8" in message
    assert alignment_warning("odd hidden", {"neurons_per_layer": [64], "hidden": 460}).startswith(
        "odd hidden: width 460 is not a multiple of 8"
    )
    assert alignment_warning("no structure", {"params": 10}) is None
    assert "width 37 is not a multiple" in alignment_warning("t", describe(tiny_model(intermediate_size=37)))
    assert alignment_warning("t", describe(tiny_model(intermediate_size=32))) is None


def test_unaligned_models_are_warned_about_but_not_the_dense_reference():
    infos = {
        "dense": {"neurons_per_layer": [37], "hidden": 32},
        "pruned 0.3": {"neurons_per_layer": [1379], "hidden": 576},
        "pruned 0.5 (x8)": {"neurons_per_layer": [1376], "hidden": 576},
    }
    stream = io.StringIO()
    assert len(warn_unaligned(infos, stream)) == 1
    assert stream.getvalue().startswith("apt-bench: warning: pruned 0.3: width 1379 is not a multiple of 8")
    assert "dense" not in stream.getvalue()
