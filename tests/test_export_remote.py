"""Exported folders in plain transformers: `from_pretrained(folder, trust_remote_code=True)` and
`pipeline(..., trust_remote_code=True)` in a fresh process where apt_lightning cannot be imported give the
logits of `load_pruned`; without `trust_remote_code` the load is refused; labels, model card, modes."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import logits, tiny_batch, tiny_model
from test_export import ATOL, pruned_adapted_model, randomize_adapters
from test_llama import batch as decoder_batch
from test_llama import hard_masks, tiny_decoder, with_adapters
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from apt_lightning.adapters import AdapterConfig, inject_adapters
from apt_lightning.data.tasks import get_task
from apt_lightning.export import SIDECAR, export_pruned, load_pruned, main
from apt_lightning.export_remote import base_config_dict
from apt_lightning.structure import get_structure

DECODER_ATOL = 1e-4

# Runs first in the child: apt_lightning (installed editable in the venv) must not be importable.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "apt_lightning" or name.startswith("apt_lightning."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
try:
    import apt_lightning
except ImportError:
    pass
else:
    raise SystemExit("apt_lightning is importable in the child")
"""

CHILD = """
import json, torch, transformers
jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
results = []
for job in jobs:
    auto = getattr(transformers, job["auto"])
    refused = []
    for kw in ({}, {"ignore_mismatched_sizes": True}):
        try:
            auto.from_pretrained(job["folder"], **kw)
        except Exception as err:
            refused.append(f"{type(err).__name__}: {err}")
    model, info = auto.from_pretrained(job["folder"], trust_remote_code=True, output_loading_info=True)
    x = torch.load(job["batch"])
    with torch.no_grad():
        got = {"logits": model(**x).logits}
        if job.get("generate"):
            got["generated"] = model.generate(x["input_ids"][1:], max_new_tokens=6, do_sample=False)
    got.update(
        refused=refused,
        info={k: sorted(map(str, v)) for k, v in info.items()},
        cls=type(model).__name__,
        module=type(model).__module__,
        training=model.training,
        id2label=model.config.id2label,
    )
    if job.get("texts"):
        pipe = transformers.pipeline("text-classification", model=job["folder"], trust_remote_code=True)
        got["pipeline"] = pipe(job["texts"], top_k=None)
    assert not any(m.startswith("apt_lightning") for m in sys.modules)
    results.append(got)
torch.save(results, out_file)
"""


def run_child(tmp_path, jobs: list[dict]) -> list[dict]:
    """Run `jobs` in `python -I` (no PYTHONPATH, no cwd on sys.path) with apt_lightning blocked."""
    out = tmp_path / "child.pt"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", BLOCK + CHILD, json.dumps(jobs), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def job(tmp_path, folder, auto: str, x: dict, **extra) -> dict:
    path = tmp_path / f"{folder.name}.batch.pt"
    torch.save(x, path)
    return {"folder": str(folder), "auto": auto, "batch": str(path), **extra}


def check_loaded(got: dict, expected_cls: str) -> None:
    assert got["cls"] == expected_cls and got["module"].startswith("transformers_modules")
    assert not any(got["info"].values()), got["info"]  # no missing / unexpected / mismatched keys
    assert got["training"] is False
    assert len(got["refused"]) == 2 and all("trust_remote_code" in r for r in got["refused"])


def pipeline_scores(model, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.softmax(-1)


def check_pipeline(got: list, reference: torch.Tensor, labels) -> None:
    for row, ref in zip(got, reference, strict=True):
        scores = {r["label"]: r["score"] for r in row}
        assert set(scores) == set(labels)
        torch.testing.assert_close(torch.tensor([scores[n] for n in labels]), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- apt-export of a BERT checkpoint (SST-2)
def test_apt_export_folder_loads_in_plain_transformers(tmp_path, tiny_backbone_dir, minilm_tokenizer):
    from apt_lightning.module import APTModule

    module = APTModule(backbone=str(tiny_backbone_dir), task="sst2", attn_implementation="eager")
    randomize_adapters(module.student, 9)
    masks = module.structure.install_masks()
    masks.set("head", torch.zeros(4), 1)  # a skipped attention sublayer
    masks.set("head", torch.tensor([1.0, 0, 1, 1]), 0)
    masks.set("neuron", torch.zeros(48), 2)  # a skipped FFN sublayer
    masks.set("neuron", (torch.arange(48) % 2 == 0).float(), 0)
    masks.set("hidden", (torch.arange(32) % 4 != 1).float())
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    out = tmp_path / "exported"
    main([str(tmp_path / "tiny.ckpt"), str(out)])

    reference = load_pruned(out)
    x = tiny_batch(seed=9, vocab=len(minilm_tokenizer))
    texts = ["a gripping, funny film", "dull and far too long", "ok"]
    (got,) = run_child(tmp_path, [job(tmp_path, out, "AutoModelForSequenceClassification", x, texts=texts)])
    check_loaded(got, "AptPrunedBertForSequenceClassification")
    torch.testing.assert_close(got["logits"], logits(reference, x), rtol=0, atol=ATOL)
    module.eval()
    torch.testing.assert_close(got["logits"], logits(module.student, x), rtol=0, atol=ATOL)
    assert got["id2label"] == {0: "negative", 1: "positive"} == dict(enumerate(get_task("sst2").label_names))
    check_pipeline(
        got["pipeline"], pipeline_scores(reference, minilm_tokenizer, texts), ["negative", "positive"]
    )

    config = json.loads((out / "config.json").read_text())
    assert config["label2id"] == {"negative": 0, "positive": 1}
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "AutoModelForSequenceClassification" in card
    assert "| 1 | 0 / 4 | - | 48 / 48 |" in card and "| 2 | 4 / 4 | - | 0 / 48 |" in card  # widths per layer
    assert '"task": "sst2"' in card  # the training configuration saved in the checkpoint
    assert f"apt-export {tmp_path / 'tiny.ckpt'} {out}" in card  # the command


# ---------------------------------------------------------------- RoBERTa and LLaMA (uneven KV groups)
def pruned_roberta():
    model = tiny_model("roberta", seed=11, initializer_range=0.2, vocab_size=120)
    inject_adapters(model, AdapterConfig(rank=4, alpha=8.0))
    randomize_adapters(model, 11)
    masks = get_structure(model).install_masks()
    masks.set("head", torch.tensor([0.0, 1, 1, 0]), 0)
    masks.set("head", torch.zeros(4), 2)
    masks.set("neuron", torch.zeros(48), 1)
    masks.set("neuron", (torch.arange(48) % 3 != 0).float(), 2)
    masks.set("hidden", (torch.arange(32) % 5 != 0).float())
    return model.eval()


def test_pruned_roberta_and_llama_load_in_plain_transformers(tmp_path, minilm_tokenizer):
    roberta = export_pruned(pruned_roberta(), tmp_path / "roberta", labels=get_task("mnli").label_names)
    causal = with_adapters(tiny_decoder("causal", tied=True))
    hard_masks(causal)  # a layer without heads, one without neurons, uneven KV groups
    llama_lm = export_pruned(causal, tmp_path / "llama_lm")
    vocab = len(minilm_tokenizer)
    seqcls = with_adapters(tiny_decoder("seqcls", tied=False, seed=2, vocab_size=vocab), seed=2)
    hard_masks(seqcls, seed=2)
    mnli = get_task("mnli").label_names
    llama_cls = export_pruned(seqcls, tmp_path / "llama_cls", tokenizer=minilm_tokenizer, labels=mnli)
    assert json.loads((llama_lm / SIDECAR).read_text())["shapes"]["kv_groups"][2] == [1, 2, 2]

    x_rob, x_lm = tiny_batch(seed=12, vocab=120), decoder_batch(seed=13)
    x_cls = {
        "input_ids": torch.randint(1000, vocab, (3, 9)),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    texts = ["the cat sat on the mat", "a cat sat", "no"]
    got = run_child(
        tmp_path,
        [
            job(tmp_path, roberta, "AutoModelForSequenceClassification", x_rob),
            job(tmp_path, llama_lm, "AutoModelForCausalLM", x_lm, generate=True),
            job(tmp_path, llama_cls, "AutoModelForSequenceClassification", x_cls, texts=texts),
        ],
    )
    check_loaded(got[0], "AptPrunedRobertaForSequenceClassification")
    torch.testing.assert_close(got[0]["logits"], logits(load_pruned(roberta), x_rob), rtol=0, atol=ATOL)
    assert got[0]["id2label"] == dict(enumerate(mnli))

    check_loaded(got[1], "AptPrunedLlamaForCausalLM")
    reference = load_pruned(llama_lm)
    torch.testing.assert_close(got[1]["logits"], logits(reference, x_lm), rtol=0, atol=DECODER_ATOL)
    with torch.no_grad():
        greedy = reference.generate(x_lm["input_ids"][1:], max_new_tokens=6, do_sample=False)
    assert torch.equal(got[1]["generated"], greedy)

    check_loaded(got[2], "AptPrunedLlamaForSequenceClassification")
    reference = load_pruned(llama_cls)
    torch.testing.assert_close(got[2]["logits"], logits(reference, x_cls), rtol=0, atol=DECODER_ATOL)
    check_pipeline(got[2]["pipeline"], pipeline_scores(reference, minilm_tokenizer, texts), mnli)


# ---------------------------------------------------------------- refusal, old exports, card, modes
def test_plain_load_is_refused_and_load_pruned_reads_old_and_new_exports(tmp_path):
    model = pruned_adapted_model(seed=14)
    x = tiny_batch(seed=14)
    reference = logits(model, x)
    folder = export_pruned(model, tmp_path / "new")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "apt_pruned_bert" and config["apt_widths"]["heads"] == [3, 2, 3]
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_apt_pruned.")
    for kw in ({}, {"ignore_mismatched_sizes": True}):  # never the dense model with random weights
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForSequenceClassification.from_pretrained(folder, **kw)
    torch.testing.assert_close(logits(load_pruned(folder), x), reference, rtol=0, atol=ATOL)
    # an export written before the remote code: config.json of the family's own model type
    (folder / "config.json").write_text(json.dumps(base_config_dict(config)))
    for name in ("modeling_apt_pruned.py", "configuration_apt_pruned.py"):
        (folder / name).unlink()
    torch.testing.assert_close(logits(load_pruned(folder), x), reference, rtol=0, atol=ATOL)

    lm = with_adapters(tiny_decoder("causal", tied=False, seed=3), seed=3)
    hard_masks(lm, seed=3)
    lm_folder = export_pruned(lm, tmp_path / "lm")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(lm_folder)
    x = decoder_batch(seed=3)
    torch.testing.assert_close(logits(load_pruned(lm_folder), x), logits(lm, x), rtol=0, atol=DECODER_ATOL)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_export_modes_follow_the_umask_and_labels_are_checked(tmp_path, umask):
    model = pruned_adapted_model(seed=15, num_labels=2)
    old = os.umask(umask)
    try:
        folder = export_pruned(model, tmp_path / "modes", labels=["no", "yes"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    assert {"README.md", "config.json", SIDECAR, "modeling_apt_pruned.py"} <= {p.name for p in files}
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}
    with pytest.raises(ValueError, match="3 label names"):
        export_pruned(model, tmp_path / "bad", labels=["a", "b", "c"])
