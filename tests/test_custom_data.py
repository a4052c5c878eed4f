"""Data beyond GLUE: a user's own CSV/JSONL/Parquet (or hub dataset) described once by a `TaskSpec`
(text columns, label column, label names or num_labels, metric), read by the model and the data module."""

import csv
import json
import random

import pytest
import torch
import yaml

from apt_lightning.cli import run_cli
from apt_lightning.data import GLUE_TASKS, GLUEDataModule, LabelError, MissingColumnError, TaskSpec, get_task
from apt_lightning.export import export_pruned, module_from_checkpoint
from apt_lightning.module import APTModule

WORDS = {
    "neg": ["awful", "dull", "bad", "boring", "weak"],
    "neu": ["okay", "plain", "average", "fine", "middling"],
    "pos": ["great", "superb", "lovely", "brilliant", "fun"],
}
SENTIMENT = {"name": "sentiment", "text_columns": ["text"], "label_names": ["neg", "neu", "pos"]}


def _sentences(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["neg", "neu", "pos"][i % 3]
        rows.append(
            (f"the film was {rng.choice(WORDS[label])} and the cast {rng.choice(WORDS[label])}", label)
        )
    return rows


def _logs(root) -> list[str]:
    return [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]


def _write_csv(path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _data(task, folder, backbone, **kw) -> GLUEDataModule:
    return GLUEDataModule(task=task, tokenizer=str(backbone), data_dir=str(folder), max_length=32, **kw)


@pytest.fixture
def sentiment_dir(tmp_path):
    folder = tmp_path / "sentiment"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["text", "label"], _sentences(120, 0))
    _write_csv(folder / "dev.csv", ["text", "label"], _sentences(120, 1))
    return folder


def test_user_csv_trains_through_apt_fit(sentiment_dir, tiny_backbone_dir, tmp_path):
    """The acceptance run: a few-line config, `text,label` CSVs with 3 string labels, `apt-fit fit`."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False},
                "model": {"init_args": {"backbone": str(tiny_backbone_dir), "task": SENTIMENT}},
                "data": {"init_args": {"data_dir": str(sentiment_dir), "batch_size": 16, "max_length": 32}},
            }
        )
    )
    root = tmp_path / "runs"
    cli = run_cli(["fit", "--config", str(config)] + _logs(root))
    model, data = cli.model, cli.datamodule
    assert model.student.config.num_labels == 3 and model.student.classifier.out_features == 3
    assert model.task.label_names == ("neg", "neu", "pos")
    assert model.student.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert data.task_spec == model.task  # one description, both sides (the CLI link carried the mapping)
    labels = sorted(set(data._datasets["train"]["labels"]))
    assert labels == [0, 1, 2]
    assert cli.trainer.global_step == 120 // 16 + 1
    assert "val/accuracy" in cli.trainer.callback_metrics
    ckpt = next(root.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")  # hparams hold plain values
    assert get_task(saved["hyper_parameters"]["task"]) == model.task
    # the checkpoint carries the task on: validate re-reads it, an export names the labels
    checked = run_cli(["validate", "--config", str(config), f"--ckpt_path={ckpt}"] + _logs(root))
    assert checked.model.task == model.task and "val/accuracy" in checked.trainer.callback_metrics
    exported = export_pruned(module_from_checkpoint(ckpt).student, tmp_path / "export", labels=None)
    config_json = json.loads((exported / "config.json").read_text())
    assert config_json["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}


def test_label_names_read_from_string_labels(sentiment_dir, tiny_backbone_dir):
    """Only num_labels: the names are the data's sorted string labels; the model takes them at setup."""
    task = {"name": "sentiment", "text_columns": ["text"], "num_labels": 3}
    data = _data(task, sentiment_dir, tiny_backbone_dir)
    data.setup("fit")
    assert data.task_spec.label_names == ("neg", "neu", "pos")
    model = APTModule(backbone=str(tiny_backbone_dir), task=task)
    assert model.task.label_names == ()
    model._trainer = type("T", (), {"datamodule": data})()
    model.setup("fit")
    assert model.task.label_names == ("neg", "neu", "pos")
    assert model.student.config.id2label[2] == "pos"
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)  # names read from the data travel with the checkpoint
    restored = APTModule(backbone=str(tiny_backbone_dir), task=task)
    restored.on_load_checkpoint({"apt": checkpoint["apt"], "state_dict": {}})
    assert restored.task.label_names == ("neg", "neu", "pos")
    bad = {"name": "sentiment", "text_columns": ["text"], "num_labels": 2}
    with pytest.raises(LabelError, match=r"train.csv.*3 distinct labels.*num_labels=2.*label_names"):
        _data(bad, sentiment_dir, tiny_backbone_dir).setup("fit")


def test_label_outside_the_names_is_a_clear_error(sentiment_dir, tiny_backbone_dir):
    rows = _sentences(10, 2)
    rows[6] = ("the film was whatever", "meh")
    _write_csv(sentiment_dir / "dev.csv", ["text", "label"], rows)
    data = _data(SENTIMENT, sentiment_dir, tiny_backbone_dir)
    with pytest.raises(LabelError) as err:
        data.setup("fit")
    message = str(err.value)
    assert "dev.csv" in message and "line 8" in message and "'meh'" in message
    assert "['neg', 'neu', 'pos']" in message and "label_names" in message


def test_text_pair_jsonl_with_own_column_names(tmp_path, tiny_backbone_dir):
    """Two text columns and a label column under another name, in JSONL; ids, no names: f1 works."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split in ("train", "dev"):
        lines = [
            {"claim": f"claim {i}", "evidence": f"evidence {i % 7}", "verdict": i % 2, "extra": "x"}
            for i in range(24)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    task = TaskSpec(
        name="pairs",
        text_columns=("claim", "evidence"),
        label_column="verdict",
        num_labels=2,
        metric="f1+accuracy",
    )
    data = _data(task, folder, tiny_backbone_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert {"input_ids", "token_type_ids", "labels"} <= set(batch)
    assert (batch["token_type_ids"] == 1).any()  # the second text is a second segment
    model = APTModule(backbone=str(tiny_backbone_dir), task=task, adapters=None)
    assert set(model.val_metrics) == {"val/f1", "val/accuracy"}
    out = model.student(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[-1] == 2
    missing = TaskSpec(name="pairs", text_columns=("claim", "reason"), label_column="verdict", num_labels=2)
    with pytest.raises(MissingColumnError, match=r"train.jsonl.*\['reason'\].*text_columns / label_column"):
        _data(missing, folder, tiny_backbone_dir).setup("fit")


def test_regression_parquet(tmp_path, tiny_backbone_dir):
    pd = pytest.importorskip("pandas")
    folder = tmp_path / "scores"
    folder.mkdir()
    for split in ("train", "validation"):
        frame = pd.DataFrame(
            {"review": [f"review number {i}" for i in range(20)], "score": [i / 4 for i in range(20)]}
        )
        frame.to_parquet(folder / f"{split}.parquet")
    task = {"name": "scores", "text_columns": ["review"], "label_column": "score", "is_regression": True}
    data = _data(task, folder, tiny_backbone_dir)
    data.setup("fit")
    assert data._datasets["validation"]["labels"][5] == pytest.approx(1.25)
    model = APTModule(backbone=str(tiny_backbone_dir), task=task, adapters=None)
    assert model.task.is_regression and model.task.num_labels == 1 == model.student.config.num_labels
    assert model.student.config.problem_type == "regression"
    assert set(model.val_metrics) == {"val/pearson", "val/spearman"}


def test_task_descriptions_are_checked():
    with pytest.raises(ValueError, match="give label_names.*or num_labels"):
        TaskSpec(name="x", text_columns=("text",))
    with pytest.raises(ValueError, match="one text column or two"):
        TaskSpec(name="x", text_columns=("a", "b", "c"), num_labels=2)
    with pytest.raises(ValueError, match=r"metric \['pearson'\] is not a classification metric"):
        TaskSpec(name="x", num_labels=2, metric="pearson")
    with pytest.raises(ValueError, match=r"num_labels=3 but 2 label_names"):
        TaskSpec(name="x", num_labels=3, label_names=("a", "b"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['labels'\]"):
        get_task({"name": "x", "labels": ["a", "b"]})
    with pytest.raises(ValueError, match="names no hub dataset.*data_dir"):
        GLUEDataModule(task=SENTIMENT, tokenizer="minilm-l6").prepare_data()


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_glue_presets_resolve_as_before(name):
    """Every GLUE name resolves to the same columns, labels, metric, splits and hub config as before."""
    before = {
        "sst2": (("sentence",), 2, "accuracy", ("negative", "positive"), "validation"),
        "mnli": (
            ("premise", "hypothesis"),
            3,
            "accuracy",
            ("entailment", "neutral", "contradiction"),
            "validation_matched",
        ),
        "qnli": (("question", "sentence"), 2, "accuracy", ("entailment", "not_entailment"), "validation"),
        "qqp": (("question1", "question2"), 2, "f1+accuracy", ("not_duplicate", "duplicate"), "validation"),
        "mrpc": (
            ("sentence1", "sentence2"),
            2,
            "f1+accuracy",
            ("not_equivalent", "equivalent"),
            "validation",
        ),
        "cola": (("sentence",), 2, "matthews", ("unacceptable", "acceptable"), "validation"),
        "stsb": (("sentence1", "sentence2"), 1, "pearson+spearman", (), "validation"),
        "rte": (("sentence1", "sentence2"), 2, "accuracy", ("entailment", "not_entailment"), "validation"),
    }[name]
    task = get_task(name)
    assert (
        task.text_columns,
        task.num_labels,
        task.metric,
        task.label_names,
        task.validation_split,
    ) == before
    assert task.is_regression == (name == "stsb") and task.label_column == "label"
    assert (task.hub_path, task.hub_config) == ("nyu-mll/glue", name)
    assert task.is_glue and task.to_config() == name  # stored and linked as the plain name
    assert get_task(task) is task


def test_glue_name_on_a_user_csv_says_how_to_describe_it(sentiment_dir, tiny_backbone_dir):
    data = _data("sst2", sentiment_dir, tiny_backbone_dir)
    with pytest.raises(MissingColumnError, match=r"missing column\(s\) \['sentence'\].*give a task mapping"):
        data.setup("fit")


# ---------------------------------------------------------------- hub datasets: the same label checks
def _hub_module(tiny_backbone_dir, **task):
    from apt_lightning.data import GLUEDataModule, TaskSpec

    spec = TaskSpec(name="hub", hub_path="user/dataset", **task)
    return GLUEDataModule(task=spec, tokenizer=str(tiny_backbone_dir))


def test_hub_class_labels_follow_the_tasks_names(tiny_backbone_dir):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    data = Dataset.from_dict({"text": ["bad", "good", "fine"], "label": [0, 1, 1]}, features=features)
    swapped = _hub_module(tiny_backbone_dir, label_names=("pos", "neg"))._hub_columns(data, "hub train")
    assert swapped["label"] == [1, 0, 0]  # ids renumbered by name: "good" is the task's "pos" = 0
    same = _hub_module(tiny_backbone_dir, label_names=("neg", "pos"))._hub_columns(data, "hub train")
    assert same["label"] == [0, 1, 1]
    with pytest.raises(ValueError, match=r"label names \['neg', 'pos'\] are not the task's"):
        _hub_module(tiny_backbone_dir, label_names=("bad", "good"))._hub_columns(data, "hub train")


def test_hub_integer_labels_must_be_class_ids(tiny_backbone_dir):
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["a", "b"], "label": [0, 7]})
    with pytest.raises(ValueError, match=r"label\(s\) \[7\] are not class ids in \[0, 2\)"):
        _hub_module(tiny_backbone_dir, num_labels=2)._hub_columns(data, "hub train")
