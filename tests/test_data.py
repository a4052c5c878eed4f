"""GLUE data: real shared files, every supported layout, and the errors users hit before training."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import split_texts, write_file

from apt_lightning.backbone import MINILM_ALIAS, BackboneNotFoundError, load_tokenizer, resolve_backbone
from apt_lightning.data import GLUEDataModule, build_metrics, get_task
from apt_lightning.data.carving import carve_validation

GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"


def _setup(**kwargs) -> GLUEDataModule:
    dm = GLUEDataModule(tokenizer=MINILM_ALIAS, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _check_batch(batch: dict[str, torch.Tensor], num_labels: int) -> None:
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    # dynamic padding: padded to the longest row of this batch, not to max_length
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
    assert batch["labels"].dtype == torch.long
    assert 0 <= batch["labels"].min() and batch["labels"].max() < num_labels


def _train_labels(dm: GLUEDataModule) -> list:
    return list(dm.train_dataloader().dataset["labels"])


@pytest.mark.skipif(not (GLUE / "sst2").is_dir(), reason="shared GLUE data not present")
def test_sst2_glue_tsv():
    dm = _setup(task="sst2", data_dir=str(GLUE / "sst2"), train_limit=64, batch_size=16, max_length=64)
    assert len(dm.train_dataloader().dataset) == 64
    assert len(dm.val_dataloader().dataset) == 872
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, num_labels=2)
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] < 64
    val = next(iter(dm.val_dataloader()))
    assert val["labels"][:2].tolist() == [1, 0]  # dev.tsv order: not shuffled
    train_data = dm.train_dataloader().dataset
    dm.setup("fit")
    assert dm.train_dataloader().dataset is train_data  # setup is idempotent


@pytest.mark.skipif(not (GLUE / "mnli_subset").is_dir(), reason="shared GLUE data not present")
def test_mnli_subset_jsonl_pairs():
    dm = _setup(task="mnli", data_dir=str(GLUE / "mnli_subset"), train_limit=32, eval_limit=16)
    assert dm.num_labels == 3
    batch = next(iter(dm.val_dataloader()))
    _check_batch(batch, num_labels=3)
    assert batch["labels"].shape == (16,)
    assert (batch["token_type_ids"] == 1).any()  # the hypothesis is the second segment


def test_mnli_glue_tsv_with_string_labels(tmp_path):
    header = "index\tpromptID\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = [
        '0\t7\tA man "plays.\tSomeone plays.\tneutral\tentailment\n',
        "1\t8\tIt rains.\tIt is dry.\tneutral\tcontradiction\n",
        "2\t9\tNA\tMaybe.\tneutral\tneutral\n",
    ]
    write_file(tmp_path, "train.tsv", header + "".join(rows))
    write_file(tmp_path, "dev_matched.tsv", header + rows[0])
    write_file(tmp_path, "dev_mismatched.tsv", header + rows[1])
    dm = _setup(task="mnli", data_dir=str(tmp_path))
    batch = next(iter(dm.train_dataloader().dataset.iter(batch_size=3)))
    assert batch["labels"] == [0, 2, 1]  # quotes kept literally, "NA" stays text
    assert len(dm.val_dataloader().dataset) == 1


def test_cola_headerless_tsv(tmp_path):
    rows = "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n"
    write_file(tmp_path, "train.tsv", rows)
    write_file(tmp_path, "dev.tsv", rows)
    assert _train_labels(_setup(task="cola", data_dir=str(tmp_path))) == [1, 0]


def test_csv_and_parquet_with_hub_columns(tmp_path):
    rte = pd.DataFrame({"sentence1": ["A b.", "C d."], "sentence2": ["A.", "D."], "label": [1, 0]})
    (tmp_path / "rte").mkdir()
    rte.to_csv(tmp_path / "rte" / "train.csv", index=False)
    rte.to_csv(tmp_path / "rte" / "validation.csv", index=False)
    assert _train_labels(_setup(task="rte", data_dir=str(tmp_path / "rte"))) == [1, 0]

    stsb = pd.DataFrame({"sentence1": ["A b.", "C d."], "sentence2": ["A.", "D."], "label": [4.5, 0.25]})
    (tmp_path / "stsb").mkdir()
    stsb.to_parquet(tmp_path / "stsb" / "train.parquet")
    stsb.to_parquet(tmp_path / "stsb" / "dev.parquet")
    batch = next(iter(_setup(task="stsb", data_dir=str(tmp_path / "stsb")).val_dataloader()))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.5, 0.25]


def test_carved_validation_rows():
    train, val = carve_validation(30, 200, seed=0)
    assert len(val) == 30 and len(train) == 170 and not set(train) & set(val)
    assert sorted(train + val) == list(range(200)) and val == sorted(val)
    assert carve_validation(30, 200, seed=0) == (train, val)  # the same rows for every run
    assert carve_validation(30, 200, seed=1)[1] != val
    assert len(carve_validation(0.25, 200, seed=0)[1]) == 50
    with pytest.raises(ValueError, match="takes 200 of the 200 training rows"):
        carve_validation(200, 200, seed=0)


def test_validation_carved_from_training_and_dev_as_test(tmp_path):
    rows = "".join(f"film number {i}\t{i % 2}\n" for i in range(40))
    write_file(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)
    write_file(tmp_path, "dev.tsv", "sentence\tlabel\nthe dev one\t1\nthe dev two\t0\n")
    dm = _setup(task="sst2", data_dir=str(tmp_path), val_from_train=10, split_seed=3)
    train, val = split_texts(dm, "train"), split_texts(dm, "validation")
    assert len(train) == 30 and len(val) == 10 and not set(train) & set(val)
    assert sorted(train + val) == sorted(f"film number {i}" for i in range(40))
    dm.setup("test")
    assert split_texts(dm, "test") == ["the dev one", "the dev two"]  # the official dev set is the test split
    again = GLUEDataModule(
        tokenizer=MINILM_ALIAS, task="sst2", data_dir=str(tmp_path), val_from_train=10, split_seed=3
    )
    again.setup("validate")
    assert split_texts(again, "validation") == val  # the same rows in every stage and every run
    other = _setup(task="sst2", data_dir=str(tmp_path), val_from_train=0.25, split_seed=4, train_limit=5)
    assert len(split_texts(other, "validation")) == 10 and split_texts(other, "validation") != val
    assert len(split_texts(other, "train")) == 5  # the limit applies to what carving left


def test_whole_float_carve_size_is_a_row_count(tmp_path):
    """jsonargparse 4.53 (the GPU image's) parses `val_from_train: 2000` of an `int | float` option as
    2000.0: a whole float >= 1 means that many rows, the same split as the int."""
    rows = "".join(f"film number {i}\t{i % 2}\n" for i in range(40))
    write_file(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)
    write_file(tmp_path, "dev.tsv", "sentence\tlabel\nthe dev one\t1\n")
    as_float = _setup(task="sst2", data_dir=str(tmp_path), val_from_train=10.0, split_seed=3)
    as_int = _setup(task="sst2", data_dir=str(tmp_path), val_from_train=10, split_seed=3)
    assert as_float.hparams.val_from_train == 10 and isinstance(as_float.hparams.val_from_train, int)
    assert split_texts(as_float, "validation") == split_texts(as_int, "validation")
    with pytest.raises(ValueError, match=r"must be a whole row count or a fraction in \(0, 1\), got 10.5"):
        GLUEDataModule(val_from_train=10.5)
    with pytest.raises(ValueError, match=r"as a fraction must be in \(0, 1\), got 1.0"):
        GLUEDataModule(val_from_train=1.0)  # all of training? one row? neither: refused


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "xyz"}, "unknown task 'xyz'; choose one of: sst2, mnli"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"train_limit": -1}, "train_limit must be a positive integer or None"),
        (
            {"val_from_train": 1.5},
            r"val_from_train must be a whole row count or a fraction in \(0, 1\), got 1.5",
        ),
        ({"val_from_train": 0}, "val_from_train as a row count must be 1 or more, got 0"),
        ({"val_from_train": True}, "val_from_train must be a row count or a fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GLUEDataModule(**kwargs)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        GLUEDataModule(data_dir=str(tmp_path / "nope")).prepare_data()
    write_file(tmp_path, "notes.txt", "")
    expected = r"no train file; expected one of train\.tsv.*found: \['notes\.txt'\]"
    with pytest.raises(FileNotFoundError, match=expected):
        GLUEDataModule(data_dir=str(tmp_path)).prepare_data()


def test_missing_column(tmp_path):
    write_file(tmp_path, "train.jsonl", '{"text": "good", "label": 1}\n')
    write_file(tmp_path, "dev.jsonl", '{"text": "bad", "label": 0}\n')
    expected = r"missing column\(s\) \['sentence'\].*found columns \['text', 'label'\]"
    with pytest.raises(ValueError, match=expected):
        _setup(task="sst2", data_dir=str(tmp_path))


def test_label_out_of_range(tmp_path):
    write_file(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nodd\t5\nodder\t5\n")
    write_file(tmp_path, "dev.tsv", "sentence\tlabel\nbad\t0\n")
    with pytest.raises(ValueError, match=r"train file .*label '5' is not valid .*\(2 of 3 rows\).*\[0, 2\)"):
        _setup(task="sst2", data_dir=str(tmp_path))


def test_resolve_backbone(tmp_path, monkeypatch):
    monkeypatch.delenv("APT_MINILM_PATH", raising=False)
    minilm = Path(resolve_backbone(MINILM_ALIAS))
    assert (minilm / "config.json").is_file()
    assert load_tokenizer(MINILM_ALIAS).vocab_size == 30522
    monkeypatch.setenv("APT_MINILM_PATH", str(tmp_path))
    assert resolve_backbone(MINILM_ALIAS) == str(tmp_path.resolve())
    with pytest.raises(BackboneNotFoundError, match="folder not found.*local model folder"):
        resolve_backbone("./no/such/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError, match="not in the local Hugging Face cache.*unset HF_HUB_OFFL"):
        resolve_backbone("nobody-here/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_backbone("nobody-here/no-such-model") == "nobody-here/no-such-model"


@pytest.mark.parametrize(
    ("task", "keys"),
    [
        ("sst2", {"val/accuracy"}),
        ("mrpc", {"val/accuracy", "val/f1"}),
        ("cola", {"val/matthews"}),
        ("stsb", {"val/pearson", "val/spearman"}),
    ],
)
def test_build_metrics_keys(task, keys):
    assert set(build_metrics(get_task(task))) == keys
    assert f"val/{get_task(task).primary_metric}" in keys
