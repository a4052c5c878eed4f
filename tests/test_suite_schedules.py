"""Every shipped suite's pruning schedules fit the runs they are in: for each run with an AdaptivePruning
group, the events (with their decay windows and warm-up) end within the optimizer steps the run will have,
counted from the local data the suite reads (rows, the carved validation split by row or by sentence,
train_limit, batch size, epochs / max_steps). A suite that composes but fails at the trainer's set-up
wastes a device call (one did, 2026-11-30)."""

import functools
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.data.carving import carve_sentences
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.load import load_suite

SUITES = sorted((REPO / "configs" / "suites").glob("*.yaml"))


def training_rows(data_dir: Path) -> int | None:
    """Rows of the training file the datamodules read (GLUE TSV with a header, or JSONL); None if absent."""
    for name, header in (("train.tsv", 1), ("train.jsonl", 0)):
        path = data_dir / name
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                return sum(1 for line in f if line.strip()) - header
    return None


@functools.cache
def rows_left_by_sentences(train_tsv: Path, size: int | float, seed: int) -> int:
    """Training rows a sentence carve leaves (every phrase of a drawn sentence leaves with it)."""
    lines = train_tsv.read_text(encoding="utf-8").splitlines()[1:]
    return len(carve_sentences(size, [line.rsplit("\t", 1)[0] for line in lines if line.strip()], seed)[0])


def optimizer_steps(config: dict, rows: int) -> int:
    data, trainer = config["data"]["init_args"], config["trainer"]
    carve = data.get("val_from_train") or 0
    if carve and data.get("carve_by") == "sentence":
        rows = rows_left_by_sentences(Path(data["data_dir"]) / "train.tsv", carve, data.get("split_seed", 0))
    else:
        rows -= carve if isinstance(carve, int) else int(carve * rows)
    if data.get("train_limit"):
        rows = min(rows, data["train_limit"])
    batches = math.ceil(rows / data["batch_size"]) // trainer.get("accumulate_grad_batches", 1)
    steps = batches * trainer.get("max_epochs", 1)
    max_steps = trainer.get("max_steps") or -1
    return steps if max_steps < 0 else min(steps, max_steps)


@pytest.mark.parametrize("suite_file", SUITES, ids=[s.stem for s in SUITES])
def test_every_pruning_phase_fits_its_run(suite_file):
    raw = yaml.safe_load(suite_file.read_text())
    data_root = (REPO / raw["data_root"]).resolve()
    if not data_root.is_dir():
        pytest.skip(f"{data_root} not found (../shared/data beside the repository)")
    checked = 0
    for run in plan(load_suite(suite_file, data_root=str(data_root))):
        pruning = run.config.get("pruning")
        rows = training_rows(Path(run.config["data"]["init_args"]["data_dir"]))
        if pruning is None or rows is None:
            continue
        args = {k: v for k, v in pruning["init_args"].items() if k != "scorer"}
        steps = optimizer_steps(run.config, rows)
        try:
            AdaptivePruning(**args).plan_schedule(steps)
        except ValueError as err:
            pytest.fail(f"{suite_file.name} {run.run_id}: {err} ({rows} training rows)")
        checked += 1
    assert checked > 0, f"{suite_file.name}: no run with pruning and local data was checked"
