"""Instruction-tuning data (Alpaca format) for causal-LM training (``task: instruction``).

Each example is a record with ``instruction``, an optional ``input`` and ``output``. It becomes a prompt (the
instruction and input in a template) followed by the response (the output and the tokenizer's EOS), one
token sequence ``prompt + response + EOS``; labels are the token ids on the response and EOS and -100 on
the prompt and the padding, so the loss is taken on the response only (`apt_lightning.causal_lm`).

Templates (``template``):

- ``alpaca`` (default): the Stanford Alpaca prompt, its two forms, with and without an input (`ALPACA_PROMPT`,
  `ALPACA_PROMPT_NO_INPUT`); the prompt is tokenized with the tokenizer's own special tokens (a LLaMA
  tokenizer's BOS). Works for any base model, chat-tuned or not.
- ``chat``: the tokenizer's chat template, one user turn (the instruction, then a blank line and the input)
  with the generation prompt of the assistant turn; an error if the tokenizer has no chat template.

The prompt and the response are tokenized separately and concatenated, so the label boundary is exact and
the prompt's tokens are those a user's prompt has at generation time (`format_prompt` builds it).
``max_length`` truncates the sequence (the end of a long response, its EOS with it, is cut); an example
whose prompt alone takes ``max_length`` tokens or more has no response token left and is dropped (the
count is printed). Batches are padded dynamically on the right: ``input_ids`` with the pad id (the EOS
where the tokenizer has none), ``attention_mask`` 0 and ``labels`` -100.

Sources: a local folder (``data_dir``: ``train.jsonl`` or ``train.json``, and ``eval`` / ``dev`` /
``validation`` ``.jsonl`` / ``.json``: JSON lines or a JSON array of records, as Alpaca ships) or, with
``data_dir: null``, a hub dataset (``hub_dataset``: ``tatsu-lab/alpaca``, ``yahma/alpaca-cleaned``; its
validation or test split, else ``eval_size`` examples split off its training split with ``seed``).
Records are checked before training: a missing ``instruction`` or ``output``, a blank or non-text
instruction, an ``input`` or ``output`` that is not text, an empty file or a line that is not a JSON object
fail with the file, the line and the fix (an empty ``output`` is allowed: the response is the EOS alone).
``train_limit`` / ``eval_limit`` keep the first N examples that fit (quick CPU runs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from apt_lightning.backbone import load_tokenizer, resolve_backbone
from apt_lightning.causal_lm import IGNORE_INDEX
from apt_lightning.data.readers import parse_json_file
from apt_lightning.data.tasks import INSTRUCTION_TASK, InstructionTask, get_task
from apt_lightning.data.validation import EmptyDataError, EmptyTextError, MissingColumnError, Rows, check_text

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "TEMPLATES",
    "InstructionCollator",
    "InstructionDataModule",
    "encode_example",
    "format_prompt",
]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")
REQUIRED = ("instruction", "output")
_EXTENSIONS = ("jsonl", "json")
_EVAL_STEMS = ("eval", "dev", "validation")
_HUB_EVAL_SPLITS = ("validation", "eval", "test")
_FORMAT_FIX = 'write one record per line: {"instruction": "...", "input": "" or "...", "output": "..."}'


def format_prompt(
    instruction: str,
    input: str = "",
    template: str = "alpaca",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The prompt a model trained on this data answers: ``alpaca`` (no tokenizer needed) or ``chat`` (the
    tokenizer's chat template, one user turn, with the assistant's generation prompt)."""
    if template == "alpaca":
        if input and input.strip():
            return ALPACA_PROMPT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
            raise ValueError(
                f"template 'chat' needs a tokenizer with a chat template; {name} has none. Use "
                "template: alpaca (the Alpaca prompt, for any base model)"
            )
        content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, template: str = "alpaca"
) -> dict[str, list[int]] | None:
    """``input_ids`` (prompt, response, EOS; truncated to ``max_length``) and ``labels`` (-100 on the prompt),
    or None when the prompt alone leaves no room for a response token. A chat-template prompt carries its
    own special tokens; an Alpaca prompt gets the tokenizer's (e.g. a BOS)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
    if len(prompt_ids) >= max_length:
        return None
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids[: len(ids) - len(prompt_ids)],
    }


class InstructionCollator:
    """Right-pads a list of encoded examples to the longest in the batch: ``input_ids`` with `pad_id`,
    ``attention_mask`` 0 and ``labels`` -100 on the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class InstructionDataModule(L.LightningDataModule):
    """Alpaca-format instruction data for causal-LM training (see the module docstring).

    Args:
        task: must be ``instruction`` (under ``apt-fit`` the model's ``task``: the causal-LM objective).
        tokenizer: backbone name for the tokenizer: ``smollm2-135m``, a local folder or a hub id.
        data_dir: a folder with ``train.jsonl`` / ``train.json`` and ``eval`` (or ``dev``, ``validation``)
            ``.jsonl`` / ``.json``; None reads ``hub_dataset``.
        hub_dataset: the hub dataset read when ``data_dir`` is None (``tatsu-lab/alpaca``,
            ``yahma/alpaca-cleaned``).
        eval_size: examples split off a hub dataset's training split (with ``seed``) when it has no
            validation or test split.
        template: ``alpaca`` (the Alpaca prompt) or ``chat`` (the tokenizer's chat template).
        max_length: tokens per example (prompt + response + EOS): longer ones are truncated, those whose
            prompt alone is this long are dropped.
        batch_size: training batch size.
        eval_batch_size: validation batch size; None: ``batch_size``.
        num_workers: DataLoader worker processes.
        train_limit: keep the first N training examples that fit ``max_length`` (quick runs).
        eval_limit: keep the first N eval examples that fit ``max_length``.
        seed: the seed of the hub eval split.
    """

    def __init__(
        self,
        task: str | InstructionTask = "instruction",
        tokenizer: str = "smollm2-135m",
        data_dir: str | None = "../shared/data/alpaca",
        hub_dataset: str = "tatsu-lab/alpaca",
        eval_size: int = 1000,
        template: str = "alpaca",
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._task = get_task(task)
        if not isinstance(self._task, InstructionTask):
            raise ValueError(
                f"InstructionDataModule trains the causal-LM task {INSTRUCTION_TASK.name!r}, not task "
                f"{self._task.name!r}: set model.init_args.task: {INSTRUCTION_TASK.name}, or use "
                "GLUEDataModule for classification"
            )
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")
        for arg, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_size", eval_size)):
            if value <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        for arg, value in (
            ("eval_batch_size", eval_batch_size),
            ("train_limit", train_limit),
            ("eval_limit", eval_limit),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{arg} must be a positive integer or None, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        resolve_backbone(tokenizer)  # fail now, not after the data is read
        task = self._task.to_config()
        self.save_hyperparameters()
        self._data_dir = None if data_dir is None else Path(os.path.expandvars(data_dir)).expanduser()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._datasets: dict[str, list[dict[str, list[int]]]] = {}
        self.dropped: dict[str, int] = {}  # examples per split whose prompt alone exceeded max_length

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.hparams.tokenizer)
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    f"tokenizer {self.hparams.tokenizer!r} has no EOS token to end a response with; "
                    "set tokenizer.eos_token in the backbone folder's tokenizer files"
                )
            if self.hparams.template == "chat":
                format_prompt("x", template="chat", tokenizer=tokenizer)  # no chat template: say so now
            self._tokenizer = tokenizer
        return self._tokenizer

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download the hub dataset once (rank 0), or check that the local folder has the files."""
        if self._data_dir is None:
            self._load_hub()
        else:
            self._local_files()

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize the splits ``stage`` needs (fit: train and eval; validate: eval)."""
        stage = str(getattr(stage, "value", stage or "fit"))
        if stage in ("test", "predict"):
            raise ValueError(
                f"InstructionDataModule has no {stage} split: `apt-fit validate` reports the eval loss and "
                "perplexity; generate with the exported model (apt-export, then model.generate)"
            )
        needed = ("train", "validation") if stage == "fit" else ("validation",)
        todo = [split for split in needed if split not in self._datasets]
        if not todo:
            return
        frames = self._load_hub() if self._data_dir is None else self._load_local(todo)
        for split in todo:
            limit = self.hparams.train_limit if split == "train" else self.hparams.eval_limit
            self._datasets[split] = self._encode(frames[split], split, limit)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.hparams.eval_batch_size or self.hparams.batch_size, False)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self._datasets:
            raise RuntimeError(f"the {split} split is not built yet: call setup() first")
        workers = self.hparams.num_workers
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            self._datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=InstructionCollator(self.tokenizer.eos_token_id if pad is None else pad),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    # ------------------------------------------------------------------ reading and encoding
    def _encode(self, frame: pd.DataFrame, split: str, limit: int | None) -> list[dict[str, list[int]]]:
        tokenizer, template = self.tokenizer, self.hparams.template
        max_length = self.hparams.max_length
        examples, dropped = [], 0
        for instruction, inp, output in zip(
            frame["instruction"], frame["input"], frame["output"], strict=True
        ):
            if limit is not None and len(examples) >= limit:
                break
            prompt = format_prompt(instruction, inp, template, tokenizer)
            encoded = encode_example(tokenizer, prompt, output, max_length, template)
            if encoded is None:
                dropped += 1
            else:
                examples.append(encoded)
        self.dropped[split] = dropped
        if not examples:
            raise ValueError(
                f"no {split} example fits max_length={max_length}: every prompt alone is that long or "
                "longer; raise max_length"
            )
        if dropped:
            print(
                f"InstructionDataModule: {dropped} {split} example(s) dropped, their prompt alone has "
                f">= max_length={max_length} tokens ({len(examples)} kept)"
            )
        return examples

    def _local_files(self) -> dict[str, Path]:
        folder = self._data_dir
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data_dir {str(folder)!r} is not a folder; pass a folder with train.jsonl and eval.jsonl "
                f"(Alpaca format), or data_dir=None to download {self.hparams.hub_dataset}"
            )
        files = {}
        for split, stems in (("train", ("train",)), ("validation", _EVAL_STEMS)):
            expected = [f"{stem}.{ext}" for stem in stems for ext in _EXTENSIONS]
            found = [folder / name for name in expected if (folder / name).is_file()]
            if not found:
                listed = sorted(p.name for p in folder.iterdir()) or "nothing"
                raise FileNotFoundError(
                    f"data_dir {str(folder)!r} has no {split} file; expected one of {', '.join(expected)}; "
                    f"found: {listed}"
                )
            if len(found) > 1:
                raise ValueError(
                    f"data_dir {str(folder)!r} has several {split} files "
                    f"({', '.join(p.name for p in found)}); keep one"
                )
            files[split] = found[0]
        return files

    def _load_local(self, splits: list[str]) -> dict[str, pd.DataFrame]:
        files = self._local_files()
        out = {}
        for split in splits:
            frame, rows = parse_json_file(files[split], split)
            out[split] = check_records(frame, rows)
        return out

    def _load_hub(self) -> dict[str, pd.DataFrame]:
        from datasets import load_dataset

        name = self.hparams.hub_dataset
        try:
            splits = load_dataset(name)
        except ConnectionError as err:
            raise ConnectionError(f"{err}; to train offline pass data_dir=<folder with train.jsonl>") from err
        if "train" not in splits:
            raise ValueError(f"hub dataset {name} has no 'train' split (it has {list(splits)})")
        held_out = next((s for s in _HUB_EVAL_SPLITS if s in splits), None)
        if held_out is None:
            parts = splits["train"].train_test_split(test_size=self.hparams.eval_size, seed=self.hparams.seed)
            train, evaluation = parts["train"], parts["test"]
        else:
            train, evaluation = splits["train"], splits[held_out]
        out = {}
        for split, data in (("train", train), ("validation", evaluation)):
            frame = data.to_pandas()
            out[split] = check_records(frame, Rows(Path(name), split, len(frame), unit="record"))
        return out


def check_records(frame: pd.DataFrame, rows: Rows) -> pd.DataFrame:
    """The ``instruction``, ``input`` and ``output`` of every record, checked: ``instruction`` present and
    non-blank text; ``output`` present and text (empty: the response is the EOS alone, as for Alpaca's
    few empty outputs); ``input`` text, or absent or null (then empty)."""
    if rows.count == 0:
        raise rows.error(EmptyDataError, "no records", "add Alpaca records to it")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise rows.error(
            MissingColumnError,
            f"missing key(s) {missing} (Alpaca format: instruction, input (optional), output); found keys "
            f"{list(frame.columns)}",
            _FORMAT_FIX,
        )
    frame = frame.reset_index(drop=True)
    check_text(frame["instruction"], "instruction", rows)
    inputs = frame["input"] if "input" in frame.columns else pd.Series([""] * len(frame))
    inputs = inputs.where(inputs.notna(), "")
    absent = frame["output"].isna().to_numpy()
    if absent.any():
        line, listed = rows.at(np.flatnonzero(absent))
        raise rows.error(
            MissingColumnError,
            f"no 'output' field in {int(absent.sum())} of {rows.count} records: {listed}",
            "give every record an 'output' (the response to train on), or delete the record",
            line=line,
        )
    for column, values in (("input", inputs), ("output", frame["output"])):
        bad = np.flatnonzero([not isinstance(v, str) for v in values])
        if len(bad):
            line, listed = rows.at(bad)
            raise rows.error(
                EmptyTextError,
                f"{column!r} is not text (got {values.iloc[bad[0]]!r}) in {len(bad)} of {rows.count} "
                f"records: {listed}",
                f'write the {column} as a string ("" for none)',
                line=line,
            )
    return pd.DataFrame({"instruction": frame["instruction"], "input": inputs, "output": frame["output"]})
