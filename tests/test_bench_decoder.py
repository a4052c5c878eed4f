"""apt-bench for causal LMs: prefill and greedy decoding through a KV cache on a tiny LLaMA, dense and pruned
(a layer without heads, uneven GQA groups), exported and pruned here; the command line and its errors."""

import json
import re

import pytest
import torch
from conftest import tiny_model
from test_llama import HEAD_DIM, KV, LAYERS, hard_masks, tiny_decoder, with_adapters
from torch.utils._python_dispatch import TorchDispatchMode

from apt_lightning.export import export_pruned, load_pruned
from apt_lightning.tools.bench import DecodeRunner, generation_benchmark, run_cli
from apt_lightning.tools.bench.models import dense_like

PROMPT, NEW = 6, 4
FAST = ["--warmup", "1", "--repeats", "2", "--device", "cpu", "--threads", "1"]
GENERATION_KEYS = {
    "prefill_tokens_per_s",
    "prefill_ms",
    "prefill_speedup_vs_dense",
    "decode_tokens_per_s",
    "decode_ms_per_token",
    "decode_host_ms_per_token",
    "decode_speedup_vs_dense",
    "decoded_tokens",
    "cache_length",
    "peak_mb",
    "kv_cache_mb",
    "weights_mb",
    "memory_vs_dense",
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny LLaMA with adapters and hard masks (layer 0 headless, layer 1 without FFN and one KV group,
    uneven groups in layer 2), exported: what apt-export writes for a pruned causal LM."""
    model = with_adapters(tiny_decoder(attn_implementation="sdpa"))
    hard_masks(model)
    return export_pruned(model, tmp_path_factory.mktemp("llama") / "exported")


def _pruned(folder):
    model = load_pruned(folder)
    assert [layer.self_attn.__class__.__name__ for layer in model.model.layers][0] == "SkippedSelfAttention"
    return model


def _greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_decoding_through_the_cache_is_generates_greedy_output(exported, kv_cache, which):
    pruned = _pruned(exported)
    model = pruned if which == "pruned" else dense_like(pruned)
    runner = DecodeRunner(model, batch_size=2, prompt_len=PROMPT, new_tokens=NEW, kv_cache=kv_cache)
    runner.warm(1)
    runner.timed(2)
    r = runner.result()
    assert r["decoded_tokens"] == NEW and r["cache_length"] == PROMPT + NEW
    tokens = runner.tokens()
    assert tokens.shape == (2, 1 + NEW) and (tokens >= 0).all()
    assert torch.equal(tokens, _greedy(model, runner.prompt, 1 + NEW))
    assert r["prefill_tokens_per_s"] == pytest.approx(2 * PROMPT / (r["prefill_ms"] / 1e3))
    assert r["decode_tokens_per_s"] == pytest.approx(2 * NEW / (r["decode_ms_per_token"] * NEW / 1e3))
    assert len(r["prefill_ms_all"]) == len(r["decode_ms_all"]) == 2 == r["repeats"]
    per_token = (
        2 * 2 * HEAD_DIM * 4
    )  # batch x (key + value) x head_dim x fp32 bytes, per KV head and position
    kv_heads = [0, 2, 3, KV] if which == "pruned" else [KV] * LAYERS  # layer 1 lost one of its groups
    if kv_cache == "static":
        assert r["kv_cache_mb"] * 2**20 == per_token * sum(kv_heads) * (PROMPT + NEW)


class _HostSyncs(TorchDispatchMode):
    """Records the operators that need the host to wait for the device (a value read back, a shape that
    depends on data): none may run inside a captured CUDA graph."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_prefill_and_decode_steps_never_wait_for_the_device(exported):
    """What --cuda-graphs captures (the prefill pass, one decode step with the static cache) runs on device
    tensors only; checked on the CPU through the dispatcher, for the pruned model's skipped layer and
    gathered KV groups too."""
    runner = DecodeRunner(_pruned(exported), batch_size=2, prompt_len=PROMPT, new_tokens=NEW)
    with torch.inference_mode():
        runner._reset()
        with _HostSyncs() as syncs:
            runner._prefill_step()
            for _ in range(NEW):
                runner._decode_step()
    assert syncs.seen == []
    assert (runner.generated >= 0).all()  # the steps did run


def test_generation_benchmark_checks_its_arguments(exported):
    with pytest.raises(ValueError, match="not a causal LM"):
        DecodeRunner(tiny_model("bert"), 1, 4, 2)
    pruned = _pruned(exported)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        DecodeRunner(pruned, 1, 120, 9)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        DecodeRunner(pruned, 1, 4, 2, cuda_graphs=True)
    with pytest.raises(ValueError, match="unknown kv_cache 'paged'"):
        DecodeRunner(pruned, 1, 4, 2, kv_cache="paged")
    with pytest.raises(ValueError, match="repeats >= 1"):
        generation_benchmark(pruned, 1, 4, 2, repeats=0)
    r = generation_benchmark(pruned, 1, 4, 2, warmup=0, repeats=1)
    assert r["decoded_tokens"] == 2 and r["warmup"] == 0


def test_cli_export_against_dense(exported, tmp_path):
    out = tmp_path / "gen.json"
    shape = ["--batch-sizes", "1", "2", "--prompt-len", "5", str(PROMPT), "--new-tokens", str(NEW)]
    report = run_cli(["--model-dir", str(exported), *shape, *FAST, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    env = report["env"]
    assert env["model_kind"] == "causal-lm" and env["kv_cache"] == "static" and env["seq_len"] is None
    assert env["prompt_lens"] == [5, PROMPT] and env["new_tokens"] == NEW
    results = report["results"]
    assert [(r["model"], r["batch_size"], r["prompt_len"]) for r in results] == [
        (m, b, p) for m in ("dense", "exported") for b in (1, 2) for p in (5, PROMPT)
    ]
    for r in results:
        assert GENERATION_KEYS <= set(r)
        assert r["decoded_tokens"] == NEW and r["cache_length"] == r["prompt_len"] + NEW
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert all(r["decode_speedup_vs_dense"] == 1.0 for r in results if r["model"] == "dense")
    models = report["models"]
    assert models["exported"]["heads_per_layer"] == [0, 3, 5, 6] and models["dense"]["sparsity"] == 0.0
    assert models["exported"]["params"] < models["dense"]["params"]
    md = out.with_suffix(".md").read_text()
    assert "apt-bench (generation)" in md and "| exported |" in md and "decode tok/s" in md


def test_cli_prunes_a_causal_lm_config_here(tmp_path):
    config = tiny_decoder().config
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained records: the kind is detected
    config.save_pretrained(tmp_path)
    argv = ["--config-json", str(tmp_path), "--sparsity", "0.5", "--prompt-len", "4", "--new-tokens", "2"]
    report = run_cli([*argv, "--batch-sizes", "1", "--kv-cache", "dynamic", *FAST])
    assert [r["model"] for r in report["results"]] == ["dense", "pruned 0.5"]
    assert report["env"]["kv_cache"] == "dynamic" and report["env"]["model_kind"] == "causal-lm"
    assert report["models"]["pruned 0.5"]["sparsity"] >= 0.5
    assert all(r["decoded_tokens"] == 2 for r in report["results"])
    even = run_cli([*argv, "--batch-sizes", "1", "--scorer", "uniform", "--even-kv-groups", *FAST])
    record = even["models"]["pruned 0.5 (even KV groups)"]["pruning"]
    assert record["even_kv_groups"] and record["achieved_sparsity"] >= 0.5
    assert even["source"]["even_kv_groups"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seq-len", "8"], "--seq-len \\(use --prompt-len\\): not for a causal LM"),
        (["--compile", "--block", "4"], "--block, --compile: not for a causal LM"),
        (["--prompt-len", "100", "--new-tokens", "29"], "--prompt-len 100 \\+ --new-tokens 29 exceeds"),
        (["--model-kind", "classifier"], "--model-kind classifier: exported holds a LlamaForCausalLM"),
    ],
)
def test_cli_rejects_encoder_flags_for_a_causal_lm(exported, extra, message, capsys):
    with pytest.raises(SystemExit):
        run_cli(["--model-dir", str(exported), *FAST, *extra])
    assert re.search(message, capsys.readouterr().err)


def test_cli_rejects_generation_flags_for_a_classifier(tmp_path, capsys):
    tiny_model("bert").config.save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["--config-json", str(tmp_path), "--sparsity", "0.5", "--new-tokens", "4", *FAST])
    assert "--new-tokens: for causal LMs; this model is a classifier" in capsys.readouterr().err
