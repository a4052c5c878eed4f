"""InstructionDataModule: the Alpaca template as documented, labels only on the response and EOS (never on
the prompt or the padding), max_length and limits, the hub path, and clear errors for bad files."""

import json

import pytest
import torch
from conftest import REPO
from helpers_causal import ALPACA_ROWS, save_tiny_causal_backbone, tiny_tokenizer, write_alpaca

from apt_lightning.causal_lm import IGNORE_INDEX
from apt_lightning.data import InstructionDataModule, format_prompt
from apt_lightning.data.instruction import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, encode_example
from apt_lightning.data.validation import (
    DataFileError,
    EmptyDataError,
    MalformedDataError,
    MissingColumnError,
)

ALPACA_DIR = REPO.parent / "shared" / "data" / "alpaca"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_causal_backbone(tmp_path_factory.mktemp("causal"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def module(backbone, data_dir, **kw) -> InstructionDataModule:
    kw = {"max_length": 128, "batch_size": 4, **kw}
    return InstructionDataModule(tokenizer=str(backbone), data_dir=str(data_dir), **kw)


def test_alpaca_template_as_documented():
    assert format_prompt("Sum it.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum it.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert (
        format_prompt("Name a color.")
        == format_prompt("Name a color.", "  ")
        == (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
        )
    )
    assert ALPACA_PROMPT.endswith(ALPACA_PROMPT_NO_INPUT[-len("### Response:\n") :])


def test_chat_template_is_the_tokenizers_and_absent_one_is_an_error(tokenizer):
    assert (
        format_prompt("Sum it.", "2 and 3", "chat", tokenizer)
        == "<|user|>Sum it.\n\n2 and 3</s><|assistant|>"
    )
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no.*chat template|chat template.*none"):
        format_prompt("Sum it.", template="chat", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="template must be one of"):
        format_prompt("Sum it.", template="vicuna")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_labels_are_the_response_and_eos_only(backbone, tokenizer, tmp_path, template):
    data = write_alpaca(tmp_path)
    dm = module(backbone, data, template=template, batch_size=len(ALPACA_ROWS))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, example in enumerate(ALPACA_ROWS):
        prompt = format_prompt(example["instruction"], example["input"], template, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
        response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        n, p = len(prompt_ids) + len(response), len(prompt_ids)
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert ids[:n].tolist() == prompt_ids + response
        assert (labels[:p] == IGNORE_INDEX).all()  # the prompt carries no loss
        assert labels[p:n].tolist() == response  # the response and its EOS do
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]  # padded to the longest only
    assert tokenizer.decode(batch["labels"][4][batch["labels"][4] != IGNORE_INDEX]) == "</s>"  # empty output


def test_max_length_truncates_responses_and_drops_prompts_that_fill_it(tokenizer):
    prompt = format_prompt("Describe the sky.")
    p = len(tokenizer(prompt)["input_ids"])
    cut = encode_example(tokenizer, prompt, "The sky is blue on a clear day.", p + 2)
    assert len(cut["input_ids"]) == p + 2 and cut["labels"][p:] == cut["input_ids"][p:]
    assert cut["labels"][-1] != tokenizer.eos_token_id  # the EOS went with the end of the response
    assert encode_example(tokenizer, prompt, "Blue.", p) is None  # no room for a response token
    assert encode_example(tokenizer, prompt, "Blue.", p + 1)["labels"][p:] != []


def test_limits_keep_the_first_examples_that_fit(backbone, tokenizer, tmp_path):
    rows = [{"instruction": "Repeat the word. " * 40, "input": "", "output": "no"}, *ALPACA_ROWS]
    data = write_alpaca(tmp_path, train=rows, evaluation=rows)
    dm = module(backbone, data, max_length=96, train_limit=2, eval_limit=3)
    dm.setup("fit")
    assert dm.dropped == {"train": 1, "validation": 1}  # the long prompt, seen before the limit was reached
    assert len(dm._datasets["train"]) == 2 and len(dm._datasets["validation"]) == 3
    first = format_prompt(ALPACA_ROWS[0]["instruction"])
    assert dm._datasets["train"][0]["input_ids"][:3] == tokenizer(first)["input_ids"][:3]
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == 2
    dm = module(backbone, data, max_length=8)
    with pytest.raises(ValueError, match="no train example fits max_length=8"):
        dm.setup("fit")


@pytest.mark.skipif(not ALPACA_DIR.is_dir(), reason="shared Alpaca data absent")
def test_reads_the_shared_alpaca_folder(backbone):
    dm = module(backbone, ALPACA_DIR, train_limit=5, eval_limit=3)
    dm.setup("fit")
    assert len(dm._datasets["train"]) == 5 and len(dm._datasets["validation"]) == 3
    frame = dm._load_local(["train", "validation"])
    assert len(frame["train"]) == 10_000 and len(frame["validation"]) == 1_000


def test_hub_dataset_without_eval_split_is_split_with_the_seed(backbone, monkeypatch):
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    calls = []

    def fake_load_dataset(name, *args, **kw):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    def eval_outputs(seed):
        dm = InstructionDataModule(
            tokenizer=str(backbone), data_dir=None, hub_dataset="yahma/alpaca-cleaned", eval_size=8, seed=seed
        )
        dm.setup("fit")
        assert len(dm._datasets["train"]) == 32 and len(dm._datasets["validation"]) == 8
        return [e["input_ids"] for e in dm._datasets["validation"]]

    assert eval_outputs(0) == eval_outputs(0) != eval_outputs(1)
    assert set(calls) == {"yahma/alpaca-cleaned"}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.parent


@pytest.mark.parametrize(
    "train, error, message",
    [
        ("", EmptyDataError, "train file .*train.jsonl.*empty"),
        ("[]", EmptyDataError, "no records"),
        ('{"instruction": "a", "output": "b"}\nnot json\n', MalformedDataError, "line 2: not valid JSON"),
        (
            '{"prompt": "a", "completion": "b"}\n',
            MissingColumnError,
            r"missing key\(s\) \['instruction', 'output'\]",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            MissingColumnError,
            "line 2: no 'output'",
        ),
        ('{"instruction": " ", "output": "b"}\n', DataFileError, "line 1: 'instruction' is empty"),
        ('{"instruction": "a", "input": 3, "output": "b"}\n', DataFileError, "line 1: 'input' is not text"),
        ('{"instruction": "a", "output": ["b"]}\n', DataFileError, "'output' is not text"),
    ],
)
def test_bad_files_fail_with_the_file_and_line(backbone, tmp_path, train, error, message):
    folder = _write(tmp_path / "data" / "train.jsonl", train)
    (folder / "eval.jsonl").write_text(json.dumps(ALPACA_ROWS[0]) + "\n")
    with pytest.raises(error, match=message):
        module(backbone, folder).setup("fit")


def test_input_may_be_absent_or_null(backbone, tmp_path):
    rows = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": null, "output": "d"}\n'
    folder = _write(tmp_path / "data" / "train.jsonl", rows)
    (folder / "eval.json").write_text(json.dumps(ALPACA_ROWS))  # a JSON array, as Alpaca ships
    dm = module(backbone, folder)
    dm.setup("fit")
    assert len(dm._datasets["train"]) == 2 and len(dm._datasets["validation"]) == len(ALPACA_ROWS)


def test_bad_folders_and_arguments(backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        module(backbone, tmp_path / "nowhere").setup("fit")
    folder = _write(tmp_path / "d" / "train.jsonl", json.dumps(ALPACA_ROWS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="no validation file; expected one of eval.jsonl"):
        module(backbone, folder).setup("fit")
    (folder / "eval.jsonl").write_text(json.dumps(ALPACA_ROWS[0]) + "\n")
    (folder / "dev.json").write_text(json.dumps(ALPACA_ROWS))
    with pytest.raises(ValueError, match="several validation files"):
        module(backbone, folder).setup("fit")
    with pytest.raises(ValueError, match="not task 'sst2'"):
        module(backbone, folder, task="sst2")
    with pytest.raises(ValueError, match="template must be one of"):
        module(backbone, folder, template="vicuna")
    with pytest.raises(ValueError, match="train_limit must be a positive integer"):
        module(backbone, folder, train_limit=0)
    for stage in ("test", "predict"):
        with pytest.raises(ValueError, match=f"no {stage} split"):
            module(backbone, folder).setup(stage)


def test_glue_datamodule_refuses_the_instruction_task(tiny_backbone_dir):
    from apt_lightning.data import GLUEDataModule

    with pytest.raises(ValueError, match="InstructionDataModule"):
        GLUEDataModule(task="instruction", tokenizer=str(tiny_backbone_dir))


def test_collator_pads_on_the_right():
    from apt_lightning.data.instruction import InstructionCollator

    batch = InstructionCollator(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
