"""`apt-fit` end to end on a tiny backbone, and the errors users get before training starts."""

import csv
import json

import pytest
from conftest import GLUE_DIR, REPO
from helpers_apt import quickstart_args

from apt_lightning.backbone import BackboneNotFoundError
from apt_lightning.cli import main, run_cli
from apt_lightning.module import APTModule

pytestmark = pytest.mark.skipif(not GLUE_DIR.exists(), reason="shared GLUE data not present")


def _args(backbone, tmp_path, *extra):
    return ["fit", *quickstart_args(backbone, tmp_path, *extra)]


def test_fit_end_to_end_with_apt_callbacks(tiny_backbone_dir, tmp_path):
    """The quickstart's APT callbacks on a tiny model: prunes to target, grows ranks, logs metrics."""
    cli = run_cli(_args(tiny_backbone_dir, tmp_path))
    module = cli.model
    pruning = next(c for c in cli.trainer.callbacks if type(c).__name__ == "AdaptivePruning")
    assert pruning.history and pruning.history[-1]["achieved_sparsity"] == pytest.approx(0.4, abs=0.05)
    assert module.structure.masks is not None and module.structure.masks.is_hard()
    assert max(a.rank for a in module.adapters().values()) > 8  # adaptive tuning grew ranks
    log_dir = cli.trainer.log_dir
    tuning = json.loads(open(f"{log_dir}/tuning.json").read())
    assert tuning["events"] and max(tuning["events"][-1]["ranks"].values()) > 8  # ranks per adapter per event
    rows = list(csv.DictReader(open(f"{log_dir}/metrics.csv")))
    assert any(r.get("val/accuracy") for r in rows)
    assert (tmp_path / "apt").exists()
    assert any(p.name == "config.yaml" for p in (tmp_path / "apt").rglob("config.yaml"))  # saved with the run


def test_unknown_task_fails_before_training(tiny_backbone_dir, tmp_path):
    with pytest.raises((ValueError, SystemExit)) as err:
        main(_args(tiny_backbone_dir, tmp_path, "--model.init_args.task=sst3"))
    assert err.type is SystemExit or "sst3" in str(err.value)


def test_unknown_task_message():
    with pytest.raises(ValueError, match="unknown task 'sst3'.*sst2"):
        APTModule(backbone="minilm-l6", task="sst3")


def test_adapter_target_matching_nothing(tiny_backbone_dir):
    from apt_lightning.adapters import AdapterConfig

    with pytest.raises(ValueError, match="'qkv_proj' matches no Linear"):
        APTModule(backbone=str(tiny_backbone_dir), adapters=AdapterConfig(targets=["qkv_proj"]))


def test_backbone_missing_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError, match="not-a-real-org/no-model"):
        APTModule(backbone="not-a-real-org/no-model")


def test_data_folder_without_files(tiny_backbone_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no train file; expected one of train.tsv"):
        main(_args(tiny_backbone_dir, tmp_path, f"--data.init_args.data_dir={empty}"))


def test_full_finetuning_trains_every_weight(tiny_backbone_dir):
    module = APTModule(backbone=str(tiny_backbone_dir), adapters=None)
    assert not module.adapters()
    assert all(p.requires_grad for p in module.student.parameters())


def test_lora_trains_adapters_and_head_only(tiny_backbone_dir):
    module = APTModule(backbone=str(tiny_backbone_dir))
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("classifier", "bert.pooler")) for n in trainable)
    assert any("lora_A" in n for n in trainable) and any(n.startswith("classifier") for n in trainable)


def test_train_norms_adds_every_layernorm_to_adapters_and_head_and_steps_them(tiny_backbone_dir):
    import torch

    torch.manual_seed(0)
    module = APTModule(backbone=str(tiny_backbone_dir), train_norms=True)
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if ".LayerNorm." in n}
    layers = module.student.config.num_hidden_layers
    assert len(norms) == 2 * (1 + 2 * layers)  # weight and bias: the embeddings' and two per layer
    plain = APTModule(backbone=str(tiny_backbone_dir)).student.named_parameters()
    assert trainable - norms == {n for n, p in plain if p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    ids = torch.randint(1000, 3000, (4, 8), generator=torch.Generator().manual_seed(0))
    logits = module.student(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    grads = {n: p.grad for n, p in module.student.named_parameters() if n in norms}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # learned, not only decayed
    optimizer.step()
    moved = {n for n, p in module.student.named_parameters() if not torch.equal(p, before[n])}
    assert norms <= moved <= trainable


def test_scheduler_factory_must_take_apt_arguments(tiny_backbone_dir):
    import functools

    import torch

    bad = functools.partial(torch.optim.lr_scheduler.LinearLR, total_iters=5)
    with pytest.raises(
        ValueError, match=r"LinearLR does not accept \['scale', 'start_step', 'total_steps'\]"
    ):
        APTModule(backbone=str(tiny_backbone_dir), lr_scheduler=bad)


def test_console_script_exits_zero_after_a_run(tiny_backbone_dir, tmp_path):
    """`apt-fit` is `sys.exit(main())`: main must return None, or a finished run exits with status 1."""
    import subprocess
    import sys

    args = _args(tiny_backbone_dir, tmp_path, "--trainer.max_epochs=2")
    code = f"import sys; from apt_lightning.cli import main; sys.exit(main({args!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_wandb_logger_offline(tiny_backbone_dir, tmp_path, monkeypatch):
    """configs/logger/wandb.yaml on an APT run, W&B offline: the run folder stays the CSV one, and the
    pruning and tuning events reach W&B (scalars, score histograms, tables)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_args(tiny_backbone_dir, tmp_path, "--config", str(REPO / "configs/logger/wandb.yaml")))
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]
    assert (tmp_path / "runs" / "apt").exists() and list((tmp_path / "runs" / "apt").rglob("pruning.json"))
    import wandb

    wandb.finish()  # the offline run file is written by W&B's service process: flush it before reading
    records = b"".join(p.read_bytes() for p in tmp_path.rglob("*.wandb"))
    for key in (b"prune/achieved_sparsity", b"prune/head_scores", b"prune/kept_per_layer", b"tune/ranks"):
        assert key in records
