"""Export of a pruned model: round trip in a new process, the sidecar checks, and `apt-export` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, bert_count, logits, tiny_batch, tiny_model
from safetensors.torch import load_file
from torch import nn

from apt_lightning.adapters import AdapterConfig, adapter_modules, inject_adapters
from apt_lightning.export import SIDECAR, export_pruned, load_pruned, main, module_from_checkpoint
from apt_lightning.structure import get_structure

ATOL = 1e-5


def randomize_adapters(model: nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def pick(n_total: int, n_keep: int, g: torch.Generator) -> torch.Tensor:
    m = torch.zeros(n_total)
    m[torch.randperm(n_total, generator=g)[:n_keep]] = 1.0
    return m


def pruned_adapted_model(seed=0, heads=(3, 2, 3), neurons=(24, 30, 0), hidden=24, **overrides):
    """A tiny BERT with grown random adapters and hard masks keeping the given counts (not compacted)."""
    model = tiny_model("bert", seed=seed, initializer_range=0.2, **overrides)
    inject_adapters(model, AdapterConfig(rank=4, alpha=8.0))
    for i, m in enumerate(adapter_modules(model).values()):
        m.grow_rank(4 + 2 * (i % 3))
    randomize_adapters(model, seed)
    masks = get_structure(model).install_masks()
    g = torch.Generator().manual_seed(seed)
    for i, (h, f) in enumerate(zip(heads, neurons, strict=True)):
        masks.set("head", pick(4, h, g), i)
        masks.set("neuron", pick(48, f, g), i)
    masks.set("hidden", pick(32, hidden, g))
    return model.eval()


# ---------------------------------------------------------------- round trip in a new process
LOADER = """
import sys, torch
from transformers import AutoTokenizer
from apt_lightning.export import load_pruned
folder, batch_file, out_file = sys.argv[1:4]
model = load_pruned(folder)
batch = torch.load(batch_file)
with torch.no_grad():
    logits = model(**batch).logits
tok = AutoTokenizer.from_pretrained(folder)
torch.save({
    "logits": logits,
    "ids": tok("pruned models are small")["input_ids"],
    "classes": sorted({type(m).__name__ for m in model.modules()}),
    "encoder_params": sum(p.numel() for n, p in model.named_parameters() if ".encoder.layer." in n),
    "training": model.training,
}, out_file)
"""


def test_round_trip_40_percent_with_tokenizer_in_a_new_process(tmp_path, minilm_tokenizer):
    tok = minilm_tokenizer
    heads, neurons, hidden = [3, 2, 3], [24, 30, 0], 24
    full = bert_count([4] * 3, [48] * 3, 32, 8)
    kept_fraction = bert_count(heads, neurons, hidden, 8) / full
    assert abs(kept_fraction - 0.4) <= 0.05
    model = pruned_adapted_model(
        seed=3, heads=heads, neurons=neurons, hidden=hidden, vocab_size=len(tok), num_labels=2
    )
    batch = tiny_batch(seed=3, vocab=len(tok))
    reference = logits(model, batch)
    masks = get_structure(model).masks
    masks.enabled = False
    assert (logits(model, batch) - reference).abs().max() > 1e-3  # pruning changed the model
    masks.enabled = True

    folder = export_pruned(model, tmp_path / "export", tokenizer=tok)
    # the model passed in is left as it was: masked, with adapters, same outputs
    assert get_structure(model).masks is masks and masks.sizes()["hidden"] == 32 and adapter_modules(model)
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=0)

    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["model_class"] == "BertForSequenceClassification"
    assert sidecar["shapes"]["heads"] == heads and sidecar["shapes"]["neurons"] == neurons
    assert sidecar["shapes"]["hidden"] == hidden and sidecar["shapes"]["full_hidden"] == 32
    assert sidecar["full_apt_param_count"] == full
    assert sidecar["apt_param_count"] / sidecar["full_apt_param_count"] == pytest.approx(kept_fraction)
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not [k for k in keys if "lora_" in k or "apt_masks" in k]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "export"]  # no temporary folder left

    batch_file, out_file = tmp_path / "batch.pt", tmp_path / "out.pt"
    torch.save(batch, batch_file)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(batch_file), str(out_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out_file)
    torch.testing.assert_close(got["logits"], reference, rtol=0, atol=ATOL)
    assert got["ids"] == tok("pruned models are small")["input_ids"]
    assert "APTLinear" not in got["classes"] and "MaskedLayerNorm" not in got["classes"]
    assert "SkippedFFNOutput" in got["classes"]  # layer 2 lost every neuron
    assert got["encoder_params"] == sidecar["encoder_param_count"]
    assert got["training"] is False


def test_export_without_masks_or_tokenizer(tmp_path, family):
    model = tiny_model(family, seed=4, initializer_range=0.2)
    inject_adapters(model, AdapterConfig())
    randomize_adapters(model, 4)
    batch = tiny_batch(seed=4)
    folder = export_pruned(model, tmp_path / "plain")
    assert not (folder / "tokenizer_config.json").exists()
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["apt_param_count"] == sidecar["full_apt_param_count"] == 21504
    loaded = load_pruned(folder)
    assert type(loaded).__name__ == type(model).__name__
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=ATOL)
    as64 = load_pruned(folder, dtype=torch.float64)
    assert next(as64.parameters()).dtype == torch.float64


def test_export_after_in_place_compaction_with_skipped_sublayers(tmp_path, family):
    """Training compacts in place (masks stay installed): export deep-copies that model, which used to
    fail on the dead hook handles of the replaced sublayers."""
    model = tiny_model(family, seed=5, initializer_range=0.2)
    inject_adapters(model, AdapterConfig())
    randomize_adapters(model, 5)
    structure = get_structure(model)
    masks = structure.install_masks()
    masks.set("head", torch.zeros(4), 0)
    masks.set("neuron", torch.zeros(48), 1)
    masks.set("hidden", (torch.arange(32) % 5 != 0).float())
    structure.compact()
    masks.set("neuron", (torch.arange(48) % 3 != 0).float(), 2)  # a further hard mask, not yet compacted
    batch = tiny_batch(seed=5)
    reference = logits(model, batch)
    folder = export_pruned(model, tmp_path / "compacted")
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["shapes"]["heads"] == [0, 4, 4] and sidecar["shapes"]["neurons"] == [48, 0, 32]
    torch.testing.assert_close(logits(load_pruned(folder), batch), reference, rtol=0, atol=ATOL)
    # the original keeps working, and can be exported again
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=0)
    export_pruned(model, folder, overwrite=True)


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small_export(tmp_path):
    model = pruned_adapted_model(seed=6)
    return export_pruned(model, tmp_path / "small"), model


def test_export_to_existing_folder_needs_overwrite(small_export):
    folder, model = small_export
    (folder / "marker.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        export_pruned(model, folder)
    assert (folder / "marker.txt").exists()
    export_pruned(model, folder, overwrite=True)
    assert not (folder / "marker.txt").exists() and (folder / SIDECAR).is_file()


def test_export_with_fractional_masks_raises(tmp_path):
    model = pruned_adapted_model(seed=7)
    get_structure(model).masks.set("neuron", torch.full((48,), 0.5), 0)
    with pytest.raises(ValueError, match="masks are fractional"):
        export_pruned(model, tmp_path / "frac")
    assert not (tmp_path / "frac").exists()
    assert not list(tmp_path.iterdir())  # the temporary folder is not left behind either


def _edit_sidecar(folder, edit):
    path = folder / SIDECAR
    sidecar = json.loads(path.read_text())
    edit(sidecar)
    path.write_text(json.dumps(sidecar))


def test_load_pruned_rejects_a_sidecar_that_disagrees_with_the_weights(small_export):
    folder, _ = small_export
    _edit_sidecar(folder, lambda s: s["shapes"]["heads"].__setitem__(0, 2))  # weights hold 3 heads
    with pytest.raises(
        ValueError,
        match=r"apt_shapes.json disagrees with model.safetensors: .*"
        r"layer.0.attention.self.query.weight: sidecar shape \(16, 24\), "
        r"weights \(24, 24\)",
    ):
        load_pruned(folder)


def test_load_pruned_rejects_a_sidecar_hidden_size_change(small_export):
    folder, _ = small_export
    _edit_sidecar(folder, lambda s: s["shapes"].__setitem__("hidden", 20))
    with pytest.raises(ValueError, match="disagrees with model.safetensors"):
        load_pruned(folder)


def test_load_pruned_rejects_a_skipped_sublayer_the_weights_have(small_export):
    folder, _ = small_export
    _edit_sidecar(folder, lambda s: s["shapes"]["neurons"].__setitem__(0, 0))  # weights hold 24 neurons
    with pytest.raises(ValueError, match="disagrees with model.safetensors: unexpected bert.encoder.layer.0"):
        load_pruned(folder)


def test_load_pruned_rejects_impossible_or_unknown_sidecars(small_export):
    folder, _ = small_export
    _edit_sidecar(folder, lambda s: s["shapes"]["heads"].__setitem__(1, 9))
    with pytest.raises(ValueError, match="heads of layer 1: 9 exceeds the model's 4"):
        load_pruned(folder)
    _edit_sidecar(folder, lambda s: s.__setitem__("model_class", "NoSuchModel"))
    with pytest.raises(ValueError, match="names model class 'NoSuchModel', unknown to transformers"):
        load_pruned(folder)


def test_load_pruned_needs_a_sidecar(small_export):
    folder, _ = small_export
    (folder / SIDECAR).unlink()
    with pytest.raises(FileNotFoundError, match="has no apt_shapes.json: not a folder written by apt-export"):
        load_pruned(folder)


# ---------------------------------------------------------------- apt-export end to end
def test_apt_export_end_to_end(tmp_path, tiny_backbone_dir, minilm_tokenizer, capsys):
    import lightning as L

    from apt_lightning.module import APTModule

    module = APTModule(backbone=str(tiny_backbone_dir), task="sst2", attn_implementation="eager")
    randomize_adapters(module.student, 8)
    masks = module.structure.install_masks()
    masks.set("head", torch.zeros(4), 1)
    masks.set("head", torch.tensor([1.0, 0, 1, 1]), 0)
    masks.set("neuron", torch.zeros(48), 2)
    masks.set("hidden", (torch.arange(32) % 4 != 1).float())
    module.compact()
    name = "bert.encoder.layer.0.attention.self.query"
    module.grow_adapters({name: 11})
    masks.set("neuron", (torch.arange(48) % 2 == 0).float(), 0)  # hard, not compacted: export compacts it

    batch = tiny_batch(seed=8, vocab=len(minilm_tokenizer))
    rows = [
        {
            "input_ids": batch["input_ids"][i],
            "attention_mask": batch["attention_mask"][i],
            "labels": torch.tensor(i % 2),
        }
        for i in range(4)
    ]
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=4))
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    module.eval()
    reference = logits(module.student, batch)

    restored = module_from_checkpoint(ckpt)
    assert restored.adapters()[name].rank == 11
    assert restored.structure.shapes() == module.structure.shapes()
    torch.testing.assert_close(logits(restored.student.eval(), batch), reference, rtol=0, atol=ATOL)

    out = tmp_path / "exported"
    main([str(ckpt), str(out)])
    assert "exported to" in capsys.readouterr().out
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["shapes"]["heads"] == [3, 0, 4] and sidecar["shapes"]["neurons"] == [24, 48, 0]
    assert sidecar["shapes"]["hidden"] == 24
    loaded = load_pruned(out)
    assert loaded.config.num_labels == 2
    torch.testing.assert_close(logits(loaded, batch), reference, rtol=0, atol=ATOL)
    assert (out / "tokenizer_config.json").is_file()

    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        main([str(ckpt), str(out)])
    main([str(ckpt), str(out), "--overwrite"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])
    assert "checkpoint" in capsys.readouterr().err
