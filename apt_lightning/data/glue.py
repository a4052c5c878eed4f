"""Text classification / regression data as a LightningDataModule: the GLUE presets or a user's own
dataset (a :class:`TaskSpec`: text column(s), label column, label names, metric), from the hub or from a
local folder of TSV/CSV/JSON/JSONL/Parquet files.

Users bring GLUE in several layouts (the original GLUE TSVs, exports in the hub's column names as
JSONL/CSV/Parquet, or no files at all and a network), so every layout is normalised to the hub's columns
before tokenising. Bad data fails in ``prepare_data``/``setup`` with a message that names the file, the
line and the fix (``readers.py`` scans and parses, ``validation.py`` checks), rather than as a shape error
in the middle of the first epoch or as rows silently merged by a stray quote.

Besides train and dev, ``apt-fit test`` reads a *labeled* ``test.*`` file from the local folder (GLUE's
public test sets have no labels, so the hub has none to offer: it fails early and says what file to
provide), and ``apt-fit predict`` reads ``predict.*``, else ``test.*`` (labels optional: GLUE's unlabeled
test files work), else the dev split: with a data folder that has neither, or the hub, predictions are
made for the dev examples, whose labels let them be checked.

Honest model selection (``val_from_train``): a fixed-seed random part of the training set (rows, or
whole sentences with their phrases: ``carve_by``, ``carving.py``) becomes the validation split
(checkpoint selection, monitoring) and is removed from training; the dataset's own dev set then becomes
the ``test`` split, read only by ``apt-fit test`` / ``trainer.test`` (docs/method.md,
"Honest model selection").
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from datasets import Dataset, Value, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, DataCollatorWithPadding, PreTrainedTokenizerBase

from apt_lightning.backbone import load_tokenizer, resolve_backbone
from apt_lightning.data.carving import CARVE_BY, CarveBy, carve_sentences, carve_size, carve_validation
from apt_lightning.data.readers import EXTENSIONS, has_label, label_names_in, parse_file, read_split
from apt_lightning.data.tasks import GLUE_HUB_PATH, TaskSpec, get_task
from apt_lightning.data.validation import LabelError, MissingColumnError, check_max_length

__all__ = ["GLUE_HUB_PATH", "GLUEDataModule", "STAGE_SPLITS"]
# The splits each trainer stage reads; "predict" falls back to the dev split (see the module docstring).
STAGE_SPLITS = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("predict",),
}
# With a validation split carved from training: the source each split is read from (test: the dev file).
CARVED_SOURCES = {"train": "train", "validation": "train", "test": "validation", "predict": "predict"}


class GLUEDataModule(L.LightningDataModule):
    """Tokenised train/validation (and test, predict) splits with dynamic padding.

    Args:
        task: a GLUE task name (see ``GLUE_TASKS``), or a :class:`TaskSpec` (or a mapping of its fields)
            describing your own dataset; under ``apt-fit`` it is the model's ``task``.
        tokenizer: backbone name for the tokenizer: ``minilm-l6``, a local folder or a hub id.
        data_dir: ``None`` downloads the task's hub dataset (``nyu-mll/glue`` for GLUE); otherwise a
            folder with ``train.<ext>`` and a validation file (``dev``, ``validation``, or the task's
            validation split name, e.g. ``validation_matched``/``dev_matched`` for MNLI), ext one of tsv,
            jsonl, json, csv, parquet.
            Optional: a labeled ``test.<ext>`` (``apt-fit test``) and ``predict.<ext>`` (``apt-fit
            predict``, labels optional; without one it predicts ``test.<ext>``, else the dev split).
        max_length: truncate tokenised inputs to this many tokens (at most the backbone's positions).
        batch_size: training batch size.
        eval_batch_size: validation batch size.
        num_workers: DataLoader worker processes.
        train_limit: keep only the first N training examples (quick runs; after any carving).
        eval_limit: keep only the first N validation (and test, predict) examples.
        val_from_train: carve the validation split out of the training set: this many rows (an int) or
            this fraction (a float in (0, 1)), drawn with `split_seed` and removed from training; the
            dev file (hub: the validation split) becomes the ``test`` split. None: validate on the dev set.
        split_seed: the seed of that draw (the same rows for every run and variant).
        carve_by: ``row`` draws training rows; ``sentence`` (single-text tasks whose training rows include
            the phrases of their sentences, like SST-2) draws `val_from_train` sentences (or that fraction
            of them), takes every row of each one's group out of training and validates on the sentences
            alone (``carving.sentence_groups``).
    """

    def __init__(
        self,
        task: str | TaskSpec = "sst2",
        tokenizer: str = "minilm-l6",
        data_dir: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        val_from_train: int | float | None = None,
        split_seed: int = 0,
        carve_by: CarveBy = "row",
    ) -> None:
        super().__init__()
        self._task = get_task(task)
        if not isinstance(self._task, TaskSpec):
            raise ValueError(
                f"task {self._task.name!r} is causal-LM instruction tuning: use "
                "apt_lightning.data.InstructionDataModule (data: class_path) for its data"
            )
        task = self._task.to_config()  # the hyperparameters keep a name or a plain mapping
        for arg, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        for arg, value in (("train_limit", train_limit), ("eval_limit", eval_limit)):
            if value is not None and value <= 0:
                raise ValueError(f"{arg} must be a positive integer or None (all rows), got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if carve_by not in CARVE_BY:
            raise ValueError(f"carve_by must be one of {list(CARVE_BY)}, got {carve_by!r}")
        if val_from_train is not None:
            val_from_train = carve_size(val_from_train, carve_by)
        if carve_by == "sentence":
            if val_from_train is None:
                raise ValueError(
                    "carve_by='sentence' chooses how the validation split is carved from training; "
                    "set val_from_train (how many sentences, or a fraction) or leave carve_by='row'"
                )
            if len(self._task.text_columns) != 1:
                raise ValueError(
                    f"carve_by='sentence' groups the phrases of single-text rows; task {self._task.name!r} "
                    f"has text columns {list(self._task.text_columns)}: use carve_by='row'"
                )
        resolve_backbone(tokenizer)  # fail now, not after the data is read, on a tokenizer we can't load
        self.save_hyperparameters()
        self._data_dir = None if data_dir is None else Path(os.path.expandvars(data_dir)).expanduser()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._datasets: dict[str, Dataset] = {}
        self.predict_source: str | None = None  # the file (or hub split) predict reads, once set up
        self._names_read = False  # label names read from the data (a task with only num_labels)

    @property
    def task_spec(self) -> TaskSpec:
        """The task, with label names read from the data once set up (string labels, only num_labels)."""
        return self._task

    @property
    def num_labels(self) -> int:
        return self._task.num_labels

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def prepare_data(self) -> None:
        """Download the hub dataset once (rank 0), or check that the local folder has the files."""
        splits = STAGE_SPLITS.get(self._stage(), STAGE_SPLITS["fit"])
        if self._data_dir is None:
            if "test" in splits and not self.carved:
                raise self._no_labeled_test("the hub's GLUE test sets have no labels")
            self._hub_splits()
        else:
            self._local_files(self._sources(splits))

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits ``stage`` needs; splits already built are kept."""
        stage = str(getattr(stage, "value", stage or "fit"))  # Lightning passes a TrainerFn
        needed = STAGE_SPLITS.get(stage, STAGE_SPLITS["fit"])
        todo = [split for split in needed if split not in self._datasets]
        if not todo:
            return
        if self._data_dir is None and "test" in todo and not self.carved:
            raise self._no_labeled_test("the hub's GLUE test sets have no labels")
        self._check_max_length()
        sources = list(self._sources(todo))
        if self._data_dir is None:
            raw = self._load_hub()
        else:
            self._read_label_names(sources)
            raw = self._load_local(sources)
        if self.carved:
            raw = self._carve(raw)
        for split in todo:
            limit = self.hparams.train_limit if split == "train" else self.hparams.eval_limit
            data = raw[split]
            if split == "predict" and "idx" not in data.column_names:  # the hub's splits have one
                data = data.add_column("idx", list(range(len(data))))  # predictions name their row
            if limit is not None and limit < len(data):
                data = data.select(range(limit))
            self._datasets[split] = self._tokenize(data, split)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.hparams.eval_batch_size, shuffle=False)

    @property
    def carved(self) -> bool:
        """Whether validation is carved from the training set (the dev set is then the test split)."""
        return self.hparams.val_from_train is not None

    def _sources(self, splits) -> tuple[str, ...]:
        """The splits read to build `splits`: themselves, or with a carved validation split the training
        file for train and validation and the dev file for test."""
        if not self.carved:
            return tuple(splits)
        return tuple(dict.fromkeys(CARVED_SOURCES[split] for split in splits))

    def _carve(self, raw: dict[str, Dataset]) -> dict[str, Dataset]:
        """Splits as read (`_sources`) -> train and validation from the training rows, test from dev."""
        out = {"predict": raw["predict"]} if "predict" in raw else {}
        if "validation" in raw:
            out["test"] = raw["validation"]
        if "train" in raw:
            train = raw["train"]
            size, seed = self.hparams.val_from_train, self.hparams.split_seed
            if self.hparams.carve_by == "sentence":
                keep, held_out = carve_sentences(size, train[self._task.text_columns[0]], seed)
            else:
                keep, held_out = carve_validation(size, len(train), seed)
            out["train"], out["validation"] = train.select(keep), train.select(held_out)
        return out

    def _stage(self) -> str:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return getattr(fn, "value", "fit") if fn is not None else "fit"

    def _no_labeled_test(self, why: str, cls: type[Exception] = ValueError) -> Exception:
        names = ", ".join(f"test.{ext}" for ext in EXTENSIONS)
        columns = [*self._task.text_columns, self._task.label_column]
        where = "a local data_dir" if self._data_dir is None else f"data_dir {str(self._data_dir)!r}"
        return cls(
            f"apt-fit test needs a labeled test split, and {why} (GLUE's public test sets are unlabeled). "
            f"Put a labeled test file ({names}) with columns {columns} in {where}, "
            "or evaluate on the dev split with `apt-fit validate`."
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self._datasets:
            raise RuntimeError(f"the {split} split is not built yet: call setup() first")
        workers = self.hparams.num_workers
        return DataLoader(
            self._datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def _tokenize(self, data: Dataset, split: str) -> Dataset:
        # Only plain locals in the closure, so datasets can fingerprint it and reuse its cache of hub data.
        tokenizer, max_length = self.tokenizer, self.hparams.max_length
        columns = self._task.text_columns
        label_type = float if self._task.is_regression else int
        keep_index = split == "predict"  # only predictions carry the row index (the hub has it for all)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length)
            if "label" in batch:  # predict files may come without labels
                out["labels"] = [label_type(label) for label in batch["label"]]
            if keep_index:
                out["idx"] = batch["idx"]
            return out

        return data.map(encode, batched=True, remove_columns=data.column_names, desc=f"Tokenizing {split}")

    def _hub_splits(self):
        task = self._task
        if task.hub_path is None:
            raise ValueError(
                f"task {task.name!r} names no hub dataset and data_dir is None: pass data_dir=<folder with "
                "train and dev files> (--data.init_args.data_dir), or give the task a hub_path "
                "(and hub_config)"
            )
        try:
            return load_dataset(task.hub_path, task.hub_config)
        except ConnectionError as err:
            hint = "to train offline pass data_dir=<folder with train and dev files>"
            raise ConnectionError(f"{err}; {hint}") from err

    def _load_hub(self) -> dict[str, Dataset]:
        task = self._task
        splits = self._hub_splits()
        source = task.hub_path + (f"/{task.hub_config}" if task.hub_config else "")
        for split in ("train", task.validation_split):
            if split not in splits:
                raise ValueError(
                    f"{source} has no {split!r} split (it has {list(splits)}); set validation_split"
                )
        raw = {"train": splits["train"], "validation": splits[task.validation_split]}
        if not task.is_glue:
            raw = {split: self._hub_columns(data, f"{source} {split}") for split, data in raw.items()}
        raw["predict"] = raw["validation"]
        self.predict_source = f"{source} {task.validation_split}"
        return raw

    def _hub_columns(self, data: Dataset, where: str) -> Dataset:
        """A user's hub split with the task's text columns and ``label`` as class ids (or floats)."""
        task = self._task
        missing = [c for c in (*task.text_columns, task.label_column) if c not in data.column_names]
        if missing:
            raise MissingColumnError(
                where,
                f"missing column(s) {missing}; found {data.column_names}",
                "set text_columns / label_column",
            )
        feature = data.features[task.label_column]
        if task.label_column != "label":
            data = data.rename_column(task.label_column, "label")
        if task.is_regression:
            return data
        names = getattr(feature, "names", None)
        if names is not None:  # ClassLabel: ids in the dataset's order of names
            return self._hub_class_ids(data, list(names), where)
        values = data.unique("label")
        if all(isinstance(v, int | float) for v in values):
            bad = sorted(v for v in values if not (float(v).is_integer() and 0 <= v < self._task.num_labels))
            if bad:
                raise LabelError(
                    where,
                    f"label(s) {bad[:10]} are not class ids in [0, {self._task.num_labels})",
                    "correct num_labels / label_names, or filter those rows out",
                )
            return data
        if not task.label_names and not self._names_read:
            self._adopt_names(tuple(sorted(map(str, values))), where)
        ids = {name: i for i, name in enumerate(self._task.label_names)}
        unknown = sorted({str(v) for v in values} - set(ids))
        if unknown:
            raise LabelError(
                where,
                f"label(s) {unknown[:10]} are not among the label names {list(ids)}",
                "correct the task's label_names, or filter those rows out",
            )
        return data.map(lambda b: {"label": [ids[str(v)] for v in b["label"]]}, batched=True)

    def _hub_class_ids(self, data: Dataset, names: list[str], where: str) -> Dataset:
        """ClassLabel ids renumbered to the task's label names (the dataset's when the task has none); the
        two sets of names must agree."""
        task = self._task
        if not task.label_names:
            self._adopt_names(tuple(names), where)
            return data
        if set(names) != set(task.label_names):
            raise LabelError(
                where,
                f"the dataset's label names {names} are not the task's label_names {list(task.label_names)}",
                "give label_names as the dataset names them (any order), or leave them out",
            )
        if names == list(task.label_names):
            return data
        order = [task.label_names.index(n) for n in names]  # dataset id -> task id (-1: unlabeled, kept)
        data = data.cast_column("label", Value("int64"))
        return data.map(lambda b: {"label": [order[i] if i >= 0 else i for i in b["label"]]}, batched=True)

    def _read_label_names(self, splits: list[str]) -> None:
        """A classification task with ``num_labels`` only: names from the string labels of the training
        file (without one, of the first file the stage reads)."""
        if self._task.is_regression or self._task.label_names or self._names_read:
            return
        train = self._find("train", ("train",)) if self._data_dir.is_dir() else None
        split, path = ("train", train) if train else (splits[0], self._local_files((splits[0],))[splits[0]])
        names = label_names_in(path, self._task, split)
        if names is not None:
            self._adopt_names(names, str(path))
        self._names_read = True

    def _adopt_names(self, names: tuple[str, ...], where: str) -> None:
        if len(names) != self._task.num_labels:
            raise LabelError(
                where,
                f"{len(names)} label names {list(names)[:20]} but task {self._task.name!r} has "
                f"num_labels={self._task.num_labels}",
                "give the task's label_names (in class-id order), or correct num_labels",
            )
        self._task = self._task.with_label_names(names)
        self._names_read = True

    def _local_files(self, splits: tuple[str, ...] = STAGE_SPLITS["fit"]) -> dict[str, Path]:
        """The files of ``splits`` in the data folder (predict: ``predict.*``, ``test.*``, else dev)."""
        folder = self._data_dir
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data_dir {str(folder)!r} is not a folder; pass a folder with train and dev files"
                + (f" or data_dir=None to download {self._task.hub_path}" if self._task.hub_path else "")
            )
        valid = self._task.validation_split
        valid_stems = tuple(dict.fromkeys(("dev", "validation", valid, valid.replace("validation", "dev"))))
        stems = {"train": [("train",)], "validation": [valid_stems], "test": [("test",)]}
        stems["predict"] = [("predict",), ("test",), valid_stems]
        files = {}
        for split in splits:
            for names in stems[split]:
                found = self._find(split, names)
                if found is not None:
                    files[split] = found
                    break
            else:
                if split == "test":
                    raise self._no_labeled_test(
                        f"data_dir {str(folder)!r} has no test file", FileNotFoundError
                    )
                expected = [f"{stem}.{ext}" for stem in stems[split][-1] for ext in EXTENSIONS]
                listed = sorted(p.name for p in folder.iterdir()) or "nothing"
                raise FileNotFoundError(
                    f"data_dir {str(folder)!r} has no {split} file; expected one of "
                    f"{', '.join(expected)}; found: {listed}"
                )
        return files

    def _find(self, split: str, stems: tuple[str, ...]) -> Path | None:
        expected = [f"{stem}.{ext}" for stem in stems for ext in EXTENSIONS]
        matches = [self._data_dir / name for name in expected if (self._data_dir / name).is_file()]
        if len(matches) > 1:
            raise ValueError(
                f"data_dir {str(self._data_dir)!r} has several {split} files "
                f"({', '.join(p.name for p in matches)}); keep one"
            )
        return matches[0] if matches else None

    def _load_local(self, splits: list[str]) -> dict[str, Dataset]:
        files = self._local_files(tuple(splits))
        loaded = {}
        for split in splits:
            if split == "predict":
                frame = read_split(files[split], self._task, split, labels_optional=True)
                self.predict_source = str(files[split])
            else:
                try:
                    frame = read_split(files[split], self._task, split)
                except MissingColumnError as err:
                    if split == "test" and not has_label(
                        parse_file(files[split], self._task, split)[0], self._task
                    ):
                        raise self._no_labeled_test(f"{str(files[split])!r} has no label column") from err
                    raise
            loaded[split] = Dataset.from_pandas(frame, preserve_index=False)
        return loaded

    def _check_max_length(self) -> None:
        """Refuse a max_length beyond the tokenizer's backbone's position embeddings before reading data
        (APTModule.setup checks the model it trains too). A tokenizer-only folder has no config: skip."""
        backbone = self.hparams.tokenizer
        try:
            config = AutoConfig.from_pretrained(resolve_backbone(backbone))
        except (OSError, ValueError):
            return
        check_max_length(self.hparams.max_length, config, backbone)
