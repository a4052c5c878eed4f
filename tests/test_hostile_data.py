"""Hostile local data: every broken file fails in setup with an error that names the file, the line (where
the format has lines) and the fix, and nothing is silently merged, dropped or accepted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from transformers import LlamaConfig, RobertaConfig

from apt_lightning.backbone import MINILM_ALIAS
from apt_lightning.data import (
    DataEncodingError,
    DataFileError,
    EmptyDataError,
    EmptyTextError,
    GLUEDataModule,
    LabelError,
    MalformedDataError,
    MaxLengthError,
    MissingColumnError,
    check_max_length,
)

DEV_TSV = "sentence\tlabel\nfine\t1\n"


def _folder(
    tmp_path: Path, name: str, content: str | bytes, dev: tuple[str, str] = ("dev.tsv", DEV_TSV)
) -> Path:
    """A data folder whose train file is ``name`` with ``content`` and whose dev file is valid."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    (tmp_path / dev[0]).write_text(dev[1], encoding="utf-8")
    return path


def _setup(tmp_path: Path, task: str = "sst2", **kwargs) -> GLUEDataModule:
    dm = GLUEDataModule(task=task, tokenizer=MINILM_ALIAS, data_dir=str(tmp_path), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _fails(tmp_path: Path, kind: type[Exception], path: Path, line: int | None, *phrases: str, **kw) -> str:
    """Set up on ``tmp_path``; assert a ``kind`` error naming ``path`` (and ``line``) and ``phrases``."""
    with pytest.raises(kind) as info:
        _setup(tmp_path, **kw)
    message = str(info.value)
    assert isinstance(info.value, DataFileError) and isinstance(info.value, ValueError)
    assert f"`{path}`" in message, message
    assert info.value.path == path and info.value.line == line
    if line is not None:
        assert f"`{path}` line {line}:" in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


# ------------------------------------------------------------------ 1. silent corruption
def test_csv_unclosed_quote_would_swallow_rows(tmp_path):
    """Line 42 opens a quote that only the quote starting line 62 closes: pandas reads 80 rows, not 100."""
    rows = [f"sentence number {i},{i % 2}" for i in range(100)]
    rows[40] = '"an unclosed quote,1'  # line 42 (the header is line 1)
    rows[60] = '"quoted",0'  # line 62: its opening quote closes line 42's
    path = _folder(tmp_path, "train.csv", "sentence,label\n" + "\n".join(rows) + "\n")
    assert len(pd.read_csv(path, dtype=str, keep_default_na=False)) == 80  # what the old reader trained on
    _fails(tmp_path, MalformedDataError, path, 42, "unclosed quote opened here", "swallows 20 line(s)", "fix")


def test_csv_unclosed_quote_running_to_the_end(tmp_path):
    path = _folder(tmp_path, "train.csv", 'sentence,label\ngood,1\n"bad,0\nworse,0\n')
    _fails(tmp_path, MalformedDataError, path, 3, "runs to the end of the file", "swallowing the 1 line")
    path.write_text('sentence,label\ngood,1\n"bad,0')
    _fails(tmp_path, MalformedDataError, path, 3, "is never closed: the file ends first")


def test_tsv_empty_and_whitespace_text(tmp_path):
    path = _folder(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\n\t0\nok\t1\n   \t1\n")
    _fails(
        tmp_path, EmptyTextError, path, 3, "'sentence' is empty", "2 of 4 rows: lines 3, 5", "write the text"
    )


def test_jsonl_text_that_is_not_text(tmp_path):
    path = _folder(tmp_path, "train.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": 5, "label": 0}\n')
    _fails(tmp_path, EmptyTextError, path, 2, "not text", "got 5")


# ------------------------------------------------------------------ 2. max_length beyond the positions
def test_max_length_beyond_position_embeddings(tmp_path, tiny_backbone_dir):
    """The tiny backbone has 64 positions: 128 fails in setup (data side) and in APTModule.setup."""
    _folder(tmp_path, "train.tsv", DEV_TSV)
    dm = GLUEDataModule(tokenizer=str(tiny_backbone_dir), data_dir=str(tmp_path), max_length=128)
    with pytest.raises(MaxLengthError, match=r"max_length=128 .* cover 64 tokens .* max_length <= 64"):
        dm.setup("fit")
    assert not dm._datasets  # refused before reading or tokenising anything
    GLUEDataModule(tokenizer=str(tiny_backbone_dir), data_dir=str(tmp_path), max_length=64).setup("fit")

    from apt_lightning.module import APTModule

    module = APTModule(backbone=str(tiny_backbone_dir), task="sst2")
    # a datamodule whose tokenizer has more positions than the model it feeds
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"max_length": 65}))
    with pytest.raises(MaxLengthError, match=r"max_length=65 .* cover 64 tokens"):
        module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"max_length": 64}))
    module.setup("fit")


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        (RobertaConfig(max_position_embeddings=514, pad_token_id=1), 512),  # positions start at pad + 1
        (LlamaConfig(max_position_embeddings=256), 256),  # a decoder
    ],
    ids=["roberta", "llama"],
)
def test_max_length_position_offsets(config, limit):
    check_max_length(limit, config, "some-model")
    with pytest.raises(
        MaxLengthError, match=rf"max_length={limit + 1} .*'some-model'.* cover {limit} tokens"
    ):
        check_max_length(limit + 1, config, "some-model")


# ------------------------------------------------------------------ 3. malformed files
def test_empty_file(tmp_path):
    path = _folder(tmp_path, "train.tsv", "")
    _fails(tmp_path, EmptyDataError, path, None, "the file is empty")


def test_header_only_file(tmp_path):
    path = _folder(tmp_path, "train.csv", "sentence,label\n")
    _fails(tmp_path, EmptyDataError, path, 1, "the header is the only record: no data rows")


def test_tsv_line_with_an_extra_tab(tmp_path):
    path = _folder(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nbad\tfilm\t0\n")
    _fails(tmp_path, MalformedDataError, path, 3, "3 tab-separated field(s) where the header has 2", "tab")


def test_tsv_line_with_a_missing_field(tmp_path):
    """A line break inside the text splits one row in two; neither half is a row."""
    path = _folder(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nhalf a\nsentence\t0\n")
    _fails(tmp_path, MalformedDataError, path, 3, "1 tab-separated field(s) where the header has 2")


def test_bad_jsonl_line(tmp_path):
    good = '{"sentence": "good", "label": 1}\n'
    path = _folder(tmp_path, "train.jsonl", good + "\n" + good + '{"sentence": "bad", "label": 0\n')
    _fails(tmp_path, MalformedDataError, path, 4, "not valid JSON", "one JSON object per line")


def test_non_utf8_bytes(tmp_path):
    path = _folder(tmp_path, "train.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9 au lait\t0\n")
    _fails(tmp_path, DataEncodingError, path, 3, "byte 0xe9 at byte offset 25 (column 4)", "UTF-8")


def test_missing_label_column(tmp_path):
    path = _folder(tmp_path, "train.csv", "sentence,score\ngood,1\n")
    _fails(tmp_path, MissingColumnError, path, 1, "missing column(s) ['label']", "name the columns")


def test_label_outside_the_task_range(tmp_path):
    path = _folder(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n")
    _fails(tmp_path, LabelError, path, 4, "label '2' is not valid for task 'sst2', out of range", "[0, 2)")


@pytest.mark.parametrize(
    ("label", "why"), [("1.5", "not an integer"), ("pos", "not a number or a label name")]
)
def test_non_integer_label(tmp_path, label, why):
    path = _folder(
        tmp_path,
        "train.jsonl",
        f'{{"sentence": "good", "label": 1}}\n{{"sentence": "hm", "label": "{label}"}}\n',
    )
    _fails(tmp_path, LabelError, path, 2, f"label '{label}' is not valid for task 'sst2', {why}")


def test_validation_file_is_checked_too(tmp_path):
    (tmp_path / "train.tsv").write_text(DEV_TSV)
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nfine\t1\n\n\nbad\t7\n")  # blank lines skipped, still counted
    message = _fails(tmp_path, LabelError, path, 5, "out of range")
    assert message.startswith(f"validation file `{path}` line 5:")


# ------------------------------------------------------------------ what stays valid
def test_valid_quoting_and_blank_lines_still_read(tmp_path):
    """Quoted commas, doubled quotes, CRLF, a BOM and blank lines are valid CSV, read as before."""
    text = 'sentence,label\r\n"a, b",1\r\n\r\n"he said ""hi""",0\r\nplain,1\r\n'
    _folder(tmp_path, "train.csv", b"\xef\xbb\xbf" + text.encode())
    batch = next(iter(_setup(tmp_path).train_dataloader().dataset.iter(batch_size=3)))
    assert batch["labels"] == [1, 0, 1]
