"""A run's best metric counts only validations at the final structure (issue 15, deviation 7;
`events.structure_final`): the EfficiencyMonitor's efficiency.json, the RunDashboard summary, checkpoint
selection (`FinalStructureCheckpoint`) and the suite report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_apt import quiet_trainer, repeated_batch_loader
from lightning import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import APTModule
from apt_lightning.callbacks import AdaptivePruning, EfficiencyMonitor, FinalStructureCheckpoint, RunDashboard
from apt_lightning.callbacks.efficiency import best_entry, best_metric, counted
from apt_lightning.callbacks.summary import format_summary
from apt_lightning.tools.report import collect_runs, write_report
from apt_lightning.tools.report.collect import best_over
from apt_lightning.tools.suite import layout

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 steps, validation every 2 (steps 2, ..., 16); pruning events at 4, 6, 8 with 1-step windows: the
# final structure holds from step 9, so validations at 10, 12, 14, 16 count. The maximum (step 6) is
# mid-pruning.
SCRIPT = {2: 0.6, 4: 0.7, 6: 0.95, 8: 0.9, 10: 0.7, 12: 0.8, 14: 0.75, 16: 0.65}


class ScriptedModule(APTModule):
    """Validation logs `val/accuracy` = SCRIPT[global_step]."""

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", SCRIPT[self.global_step])


def pruning(**kw) -> AdaptivePruning:
    args = {"start_step": 2, "end_step": 8, "num_events": 3, "decay_steps": 1, "plot": False}
    return AdaptivePruning(**{**args, **kw})


def run(backbone, tmp_path, prune: AdaptivePruning | None = None):
    torch.manual_seed(0)
    model = ScriptedModule(backbone=str(backbone), task="sst2")
    efficiency, dashboard = EfficiencyMonitor(output_dir=tmp_path), RunDashboard(print_summary=False)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", monitor="val/accuracy", mode="max")
    final = FinalStructureCheckpoint(dirpath=tmp_path / "final")
    callbacks = [efficiency, dashboard, plain, final]
    if prune is not None:
        callbacks.insert(0, prune)
    trainer = quiet_trainer(
        max_steps=16,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
        enable_checkpointing=True,
    )
    trainer.fit(model, repeated_batch_loader(16), repeated_batch_loader(1))
    return json.loads((tmp_path / "efficiency.json").read_text()), dashboard, plain, final


def test_best_metric_counts_only_validations_at_the_final_structure(backbone, tmp_path):
    eff, dashboard, plain, final = run(backbone, tmp_path, pruning(target_sparsity=0.5))
    flags = {h["step"]: h["at_final_structure"] for h in eff["metric_history"]}
    assert flags == {s: s >= 10 for s in SCRIPT}
    assert eff["best_metric"] == pytest.approx(0.8) and eff["best_step"] == 12  # not the mid-pruning 0.95
    assert eff["best_counted_steps"] == [10, 12, 14, 16]
    assert eff["final_metric"] == pytest.approx(0.65) and eff["final_step"] == 16
    summary = dashboard.summary
    assert summary["best_metric"] == pytest.approx(0.8) and summary["best_step"] == 12
    assert summary["final_metric"] == pytest.approx(0.65)
    assert (summary["counted_points"], summary["validation_points"]) == (4, 8)
    text = format_summary(summary, {}, [])
    assert "best 0.8 (step 12), final 0.65 (step 16); best over the 4 of 8 validations at the final" in text
    # checkpoint selection: a plain ModelCheckpoint keeps the mid-pruning maximum, this one does not
    assert float(plain.best_model_score) == pytest.approx(0.95) and "step=6" in plain.best_model_path
    assert float(final.best_model_score) == pytest.approx(0.8)
    assert final.best_model_path.endswith("best-12.ckpt")


def test_mask_decay_before_counts_from_the_last_event_on(backbone, tmp_path):
    """With `mask_decay="before"` the last event is announced when its window opens (step 11 here) and its
    masks turn hard at step 14: the validation at step 12, inside that window, scores a wider model and
    does not count; the one at step 14 does."""
    prune = pruning(target_sparsity=0.5, end_step=14, decay_steps=3, mask_decay="before")
    eff, dashboard, plain, final = run(backbone, tmp_path, prune)
    assert prune.schedule.window(2) == (11, 14)
    flags = {h["step"]: h["at_final_structure"] for h in eff["metric_history"]}
    assert flags == {s: s >= 14 for s in SCRIPT}
    assert eff["best_metric"] == pytest.approx(0.75) and eff["best_step"] == 14  # not 0.8 at step 12
    assert final.best_model_path.endswith("best-14.ckpt")


def test_without_pruning_every_validation_counts(backbone, tmp_path):
    eff, dashboard, plain, final = run(backbone, tmp_path)
    assert all(h["at_final_structure"] for h in eff["metric_history"])
    assert eff["best_metric"] == pytest.approx(0.95) and eff["best_step"] == 6
    assert dashboard.summary["best_metric"] == pytest.approx(0.95)
    assert final.best_model_path.endswith("best-6.ckpt") and "step=6" in plain.best_model_path


def test_best_helpers_on_flagged_histories():
    history = [
        {"step": 2, "metric": 0.9, "at_final_structure": False},
        {"step": 4, "metric": 0.7, "at_final_structure": True},
        {"step": 6, "metric": float("nan"), "at_final_structure": True},
        {"step": 8, "metric": 0.8, "at_final_structure": True},
    ]
    assert [e["step"] for e in counted(history)] == [4, 8]
    assert best_metric(history) == 0.8 and best_entry(history)["step"] == 8
    assert best_metric(history, "min") == 0.7
    assert best_metric(history[:1]) is None  # no validation at the final structure: no best
    old = [{"step": 2, "metric": 0.9}, {"step": 4, "metric": 0.7}]  # files from before the flag
    assert best_metric(old) == 0.9
    assert best_over({"metric_history": history}) == "2 of 4, steps 4-8"  # the NaN one is not counted
    assert best_over({"metric_history": old}) == "all 2"
    assert best_over({"metric_history": history[:1]}) == "none of 1"
    assert best_over(None) == ""
    # the suite reads efficiency.json's best, and keeps its None rather than the best of every point
    eff = {"best_metric": None, "metric_history": history[:1]}
    assert layout.best_metric(eff, {"best_metric": 0.9}, [0.9]) is None
    assert layout.best_metric(None, None, [0.9, 0.7]) == 0.9


def _suite_run(root: Path) -> None:
    run = root / "apt" / "sst2" / "seed0"
    (run / "logs").mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps(
            {"variant": "apt", "task": "sst2", "task_key": "sst2", "seed": 0, "monitor": "val/accuracy"}
        )
    )
    (run / "done.json").write_text(json.dumps({"best_metric": 0.8, "wall_s": 40.0}))
    history = [
        {"step": 10 * (i + 1), "wall_s": 10.0 * (i + 1), "metric": m, "at_final_structure": i >= 2}
        for i, m in enumerate([0.7, 0.95, 0.8, 0.75])
    ]
    (run / "logs" / "efficiency.json").write_text(
        json.dumps({"best_metric": 0.8, "metric_history": history, "monitor": "val/accuracy"})
    )


def test_report_says_which_validations_counted(tmp_path):
    _suite_run(tmp_path)
    (row,) = collect_runs(tmp_path)
    assert row["best_metric"] == 0.8 and row["final_metric"] == 0.75
    assert row["best_over"] == "2 of 4, steps 30-40"
    md = write_report(tmp_path).read_text()
    assert "| 0.8000 | 2 of 4, steps 30-40 | 0.7500 | – |" in md  # no test metric: no carved split
    assert "validation checks at the final structure" in md
    assert "best_over" in (tmp_path / "runs.csv").read_text().splitlines()[0]


def test_apt_fit_warns_about_a_plain_monitored_checkpoint_next_to_pruning(
    tiny_backbone_dir, tmp_path, recwarn
):
    from conftest import GLUE_DIR
    from helpers_apt import quickstart_args

    from apt_lightning.cli import run_cli

    if not GLUE_DIR.exists():
        pytest.skip("shared GLUE data not present")
    plain = "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"
    with pytest.warns(UserWarning, match="FinalStructureCheckpoint"):  # (pytest.warns records its own)
        run_cli(
            [
                *quickstart_args(tiny_backbone_dir, tmp_path),
                plain,
                "--trainer.callbacks.monitor=val/accuracy",
            ],
            run=False,
        )
    chosen = "--trainer.callbacks+=apt_lightning.callbacks.FinalStructureCheckpoint"
    cli = run_cli(
        [*quickstart_args(tiny_backbone_dir, tmp_path), chosen, "--trainer.callbacks.monitor=val/accuracy"],
        run=False,
    )
    assert any(isinstance(c, FinalStructureCheckpoint) for c in cli.trainer.callbacks)
    assert not [w for w in recwarn if str(w.message).startswith("ModelCheckpoint(monitor=")]


class CarvedData(LightningDataModule):
    """The loaders of `run`, with the validation split marked as carved from training (as
    `GLUEDataModule(val_from_train=...)`), so the suite worker tests its selected checkpoint."""

    carved = True

    def train_dataloader(self):
        return repeated_batch_loader(16)

    def val_dataloader(self):
        return repeated_batch_loader(1)

    def test_dataloader(self):
        return repeated_batch_loader(2, seed=1)


def test_selected_checkpoint_is_tested_at_its_saved_widths(backbone, tmp_path):
    """Under `SelfDistillation(schedule="authors")` the student trains masked and is compacted when
    distillation ends (step 12), after the selected point (step 12, full widths with hard masks) was saved:
    the suite worker tests that checkpoint as saved, not loaded into the compacted model."""
    from apt_lightning.callbacks import SelfDistillation
    from apt_lightning.structure import ModelShapes
    from apt_lightning.tools.suite.train import test_selected

    torch.manual_seed(0)
    model, data = ScriptedModule(backbone=str(backbone), task="sst2"), CarvedData()
    select = FinalStructureCheckpoint(dirpath=tmp_path / "final")
    distill = SelfDistillation(schedule="authors", distill_until=12, layer_blocks=3)
    trainer = quiet_trainer(
        max_steps=16,
        callbacks=[pruning(target_sparsity=0.5, compact_at="never"), distill, select],
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=data)
    path = select.best_model_path
    saved = ModelShapes.from_dict(torch.load(path, weights_only=True)["apt"]["shapes"])
    assert distill.phases["final"] == 12 and path.endswith("best-12.ckpt")
    assert not saved.same_widths(model.structure.shapes())  # compacted after the save
    cli = SimpleNamespace(trainer=trainer, datamodule=data, model=model)
    out = test_selected(cli, "val/accuracy")
    assert "test_error" not in out
    assert (out["selected_checkpoint"], out["selected_step"]) == ("best", 12)
    assert out["selected_val_metric"] == pytest.approx(0.8)
    assert out["test_monitor"] == "test/accuracy" and 0.0 <= out["test_metric"] <= 1.0
    assert not Path(path).exists()  # tested, then deleted


def test_checkpoint_monitor_follows_the_task(backbone, tmp_path):
    """Without monitor and mode, `FinalStructureCheckpoint` ranks by the task's primary metric in the
    task's direction: `val/accuracy`, max, on SST-2; `val/loss`, min, for a causal LM
    (`task: instruction`). Explicit values are kept."""
    from helpers_causal import save_tiny_causal_backbone

    causal = APTModule(backbone=str(save_tiny_causal_backbone(tmp_path / "causal")), task="instruction")
    sst2 = APTModule(backbone=str(backbone), task="sst2")

    def resolved(module, **kw) -> tuple[str, str]:
        checkpoint = FinalStructureCheckpoint(dirpath=tmp_path / "ckpt", **kw)
        checkpoint.setup(quiet_trainer(), module, "fit")
        return checkpoint.monitor, checkpoint.mode

    assert resolved(causal) == ("val/loss", "min")
    assert resolved(sst2) == ("val/accuracy", "max")
    assert resolved(causal, monitor="val/perplexity") == ("val/perplexity", "min")  # the task's metric
    assert resolved(causal, monitor="val/loss", mode="max") == ("val/loss", "max")
    assert resolved(sst2, monitor="val/loss") == ("val/loss", "min")
    assert resolved(sst2, mode="min") == ("val/accuracy", "min")
    with pytest.raises(ValueError, match="mode must be one of"):
        FinalStructureCheckpoint(mode="lowest")
