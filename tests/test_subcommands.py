"""`apt-fit validate`, `test` and `predict` on the checkpoints `fit` writes (the quickstart's APT recipe on
the tiny backbone): the student comes back at its pruned widths and adapter ranks, training-only state is
left out, and the metrics match fit's for the same weights and data."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GLUE_DIR, REPO

from apt_lightning.cli import main, run_cli

pytestmark = pytest.mark.skipif(not GLUE_DIR.exists(), reason="shared GLUE data not present")

EVAL = 32  # dev rows used by fit's validation, and copied into the labeled test file


def _common(backbone, data_dir, root):
    return [
        "--config",
        str(REPO / "configs" / "quickstart_cpu.yaml"),
        f"--model.init_args.backbone={backbone}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.train_limit=160",
        f"--data.init_args.eval_limit={EVAL}",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=16",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


def _tsv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def fitted(tiny_backbone_dir, tmp_path_factory):
    """One quickstart fit (pruning, rank growth, self-distillation) on a data folder with train and dev
    files only; returns what later subcommands need."""
    root = tmp_path_factory.mktemp("fit")
    data = root / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(GLUE_DIR / "sst2" / name, data / name)
    every_epoch = (
        '{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -1}}'
    )
    cli = run_cli(["fit", *_common(tiny_backbone_dir, data, root), f"--trainer.callbacks+={every_epoch}"])
    folder = Path(cli.trainer.log_dir)
    checkpoints = sorted((folder / "checkpoints").glob("*.ckpt"))
    ckpt = next(p for p in checkpoints if p.name.startswith("epoch=1-"))
    logged = [r for r in csv.DictReader(open(folder / "metrics.csv")) if r.get("val/accuracy")]
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert any(k.startswith("distiller.") for k in saved["state_dict"])  # the state that used to break
    assert "teacher" in saved["apt"]
    return {
        "root": root,
        "data": data,
        "backbone": tiny_backbone_dir,
        "ckpt": ckpt,
        "val": float(cli.trainer.callback_metrics["val/accuracy"]),
        "val_by_epoch": {int(r["epoch"]): float(r["val/accuracy"]) for r in logged},
        "checkpoints": checkpoints,
        "shapes": cli.model.structure.shapes().to_dict(),
        "ranks": {n: m.rank for n, m in cli.model.adapters().items()},
    }


def _run(fitted, sub, *extra, data=None, config=True, ckpt=None):
    args = _common(fitted["backbone"], data or fitted["data"], fitted["root"])
    if not config:  # the APT callbacks are fit's business: validate/test/predict without them
        args += ["--pruning=null", "--tuning=null", "--distillation=null"]
    return run_cli([sub, *args, f"--ckpt_path={ckpt or fitted['ckpt']}", *extra])


@pytest.mark.parametrize("config", [True, False], ids=["with_apt_callbacks", "without"])
def test_validate_restores_the_pruned_student(fitted, config):
    cli = _run(fitted, "validate", config=config)
    assert any(type(c).__name__ == "SelfDistillation" for c in cli.trainer.callbacks) == config
    assert cli.model.structure.shapes().to_dict() == fitted["shapes"]
    assert {n: m.rank for n, m in cli.model.adapters().items()} == fitted["ranks"]
    assert cli.model.distiller is None and cli.model.teacher is None
    assert float(cli.trainer.callback_metrics["val/accuracy"]) == pytest.approx(fitted["val"], abs=1e-6)


def test_test_on_a_labeled_test_file(fitted, tmp_path):
    """A labeled test.tsv holding fit's validation rows: test/accuracy equals fit's val/accuracy."""
    data = tmp_path / "data"
    shutil.copytree(fitted["data"], data)
    rows = _tsv_rows(data / "dev.tsv")
    with open(data / "test.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n").writerows(rows[: EVAL + 1])
    cli = _run(fitted, "test", data=data)
    metrics = cli.trainer.callback_metrics
    assert "test/loss" in metrics
    assert float(metrics["test/accuracy"]) == pytest.approx(fitted["val"], abs=1e-6)


def test_test_without_a_labeled_test_file_fails_clearly(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-fit test needs a labeled test split.*test\.tsv"):
        main(
            ["test", *_common(fitted["backbone"], fitted["data"], tmp_path), f"--ckpt_path={fitted['ckpt']}"]
        )
    data = tmp_path / "unlabeled"
    shutil.copytree(fitted["data"], data)
    sentences = [r[0] for r in _tsv_rows(data / "dev.tsv")[1:5]]
    (data / "test.tsv").write_text(
        "index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences))
    )
    with pytest.raises(ValueError, match=r"has no label column.*Put a labeled test file"):
        main(["test", *_common(fitted["backbone"], data, tmp_path), f"--ckpt_path={fitted['ckpt']}"])


def test_test_on_the_hub_fails_clearly(fitted, tmp_path):
    args = _common(fitted["backbone"], fitted["data"], tmp_path)
    args = [
        a if not a.startswith("--data.init_args.data_dir") else "--data.init_args.data_dir=null" for a in args
    ]
    with pytest.raises(ValueError, match="the hub's GLUE test sets have no labels"):
        main(["test", *args, f"--ckpt_path={fitted['ckpt']}"])


def _predictions(cli, capsys):
    path = cli.trainer.log_dir + "/predictions.jsonl"
    assert path in capsys.readouterr().out  # printed
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("config", [True, False], ids=["with_apt_callbacks", "without"])
def test_predict_writes_one_row_per_dev_example(fitted, config, capsys):
    cli = _run(fitted, "predict", config=config)
    rows = _predictions(cli, capsys)
    assert [r["index"] for r in rows] == list(range(EVAL))
    assert all(r["label_name"] == ("negative", "positive")[r["prediction"]] for r in rows)
    # the dev labels are known: predictions agree with fit's validation accuracy
    gold = [int(r[1]) for r in _tsv_rows(fitted["data"] / "dev.tsv")[1 : EVAL + 1]]
    correct = sum(r["prediction"] == g for r, g in zip(rows, gold, strict=True))
    assert correct / EVAL == pytest.approx(fitted["val"], abs=1e-6)


def test_predict_on_an_unlabeled_test_file(fitted, tmp_path, capsys):
    """GLUE's public test files have no label column: predict reads them, rows keep their index."""
    data = tmp_path / "data"
    shutil.copytree(fitted["data"], data)
    sentences = [r[0] for r in _tsv_rows(data / "dev.tsv")[1:6]]
    (data / "test.tsv").write_text(
        "index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences))
    )
    cli = _run(fitted, "predict", data=data)
    rows = _predictions(cli, capsys)
    assert [r["index"] for r in rows] == list(range(5))
    assert cli.datamodule.predict_source == str(data / "test.tsv")


def test_validate_every_checkpoint_fit_wrote(fitted):
    """Epoch 0's checkpoint is from inside the pruning phase (steps 10-30 of 40: masked, partly compacted,
    with a teacher); epoch 1's and the newest periodic one are after it. Each validates to the metric
    fit logged for the same weights."""
    files = fitted["checkpoints"]
    assert {p.name.split("-")[0] for p in files} == {"epoch=0", "epoch=1", "periodic"}
    for ckpt in files:
        saved = torch.load(ckpt, weights_only=True, map_location="cpu")
        epoch = saved["epoch"] if not ckpt.name.startswith("periodic") else 1
        if ckpt.name.startswith("epoch=0"):
            assert 0 < len(saved["callbacks"]["AdaptivePruning"]["history"]) < 4  # mid-pruning
        cli = _run(fitted, "validate", ckpt=ckpt)
        assert cli.model.structure.shapes().to_dict() == saved["apt"]["shapes"]
        assert float(cli.trainer.callback_metrics["val/accuracy"]) == pytest.approx(
            fitted["val_by_epoch"][epoch]
        )
