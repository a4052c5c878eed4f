"""Resuming APT runs: configured optimizer after `--ckpt_path`, RNG of rank growth and the other random
choices, periodic checkpoints, schedule changes, and `apt-fit` killed mid-pruning then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers_apt import SaveAt, make_module, quiet_trainer, repeated_batch_loader
from lightning import Callback

from apt_lightning.adapters import APTLinear
from apt_lightning.callbacks import AdaptivePruning, AdaptiveTuning, SelfDistillation
from apt_lightning.cli import PeriodicCheckpoint, run_cli
from apt_lightning.data import GLUEDataModule

TESTS = Path(__file__).resolve().parent
TIMING = ("score_s", "search_s")


# ---------------------------------------------------------------- used by the apt-fit runs (by class_path)
class RepeatedData(GLUEDataModule):
    """Identical training batches (`repeated_batch_loader`), so a run resumed mid-epoch sees the data an
    uninterrupted one sees whatever Lightning does with a non-resumable loader; no files read."""

    def __init__(self, task: str = "sst2", tokenizer: str = "minilm-l6", num_batches: int = 24) -> None:
        super().__init__(task=task, tokenizer=tokenizer)
        self.num_batches = num_batches

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass

    def train_dataloader(self):
        return repeated_batch_loader(self.num_batches)

    def val_dataloader(self):
        return repeated_batch_loader(1)


class HoldAt(Callback):
    """At optimizer step `step`, touch `flag` and wait to be killed (the test SIGKILLs the process). Exits
    by itself after `limit_s`, so a test that fails to kill leaves no process behind."""

    def __init__(self, step: int, flag: str, limit_s: float = 300.0) -> None:
        self.step, self.flag, self.limit_s = step, flag, limit_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.flag).touch()
            deadline = time.monotonic() + self.limit_s
            while time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(3)


class StopAt(Callback):
    """Stops training cleanly after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


# ---------------------------------------------------------------- apt-fit configs
PRUNING = {"target_sparsity": 0.5, "start_step": 4, "end_step": 16, "num_events": 3, "decay_steps": 2}


def fit_config(backbone, out: Path, callbacks: list[dict] = (), **top) -> dict:
    """24 identical batches, one epoch; prune at steps 8, 12, 16 (2-step decay windows), grow ranks,
    distil; AdamW at lr 1e-3 / wd 0.01 (not the module defaults 2e-4 / 0.1)."""
    return {
        "seed_everything": 0,
        "pruning": {**PRUNING, "plot": False},
        "tuning": {"budget_multiple": 3.0},
        "distillation": {"mu_max": 0.5},
        **top,
        "trainer": {
            "max_epochs": 1,
            "max_steps": 24,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out), "name": "apt"},
            },
            "callbacks": list(callbacks),
        },
        "model": {
            "class_path": "apt_lightning.APTModule",
            "init_args": {
                "backbone": str(backbone),
                "task": "sst2",
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": 1e-3, "weight_decay": 0.01},
                },
            },
        },
        "data": {"class_path": "test_resume.RepeatedData", "init_args": {"num_batches": 24}},
    }


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def apt_fit(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "apt_lightning.cli", "fit", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=config.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture
def processes():
    """The `apt-fit` processes a test starts; any still running at teardown (a failed test) is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def decisions(run_dir: Path) -> tuple[dict, dict]:
    pruning = json.loads((run_dir / "pruning.json").read_text())
    pruning.pop("timing")
    for event in pruning["events"]:
        for key in TIMING:
            event.pop(key)
    tuning = json.loads((run_dir / "tuning.json").read_text())
    tuning.pop("timing")
    return pruning, tuning


# ---------------------------------------------------------------- apt-fit SIGKILLed mid-pruning, resumed
def test_apt_fit_killed_mid_pruning_resumes_to_the_uninterrupted_result(backbone, tmp_path, processes):
    # auto interval: (16 - 4) // 4 = 3 steps, so periodic checkpoints at 3, 6, 9, 12, ...; event 0 at step 8
    # opens a decay window that closes (hard masks) at 10: the checkpoint at 9 has fractional masks
    ref_cfg = write_config(tmp_path / "ref" / "apt.yaml", fit_config(backbone, tmp_path / "ref"))
    flag = tmp_path / "killed" / "at_step_11"
    hold = {"class_path": "test_resume.HoldAt", "init_args": {"step": 11, "flag": str(flag)}}
    killed_cfg = write_config(
        tmp_path / "killed" / "apt.yaml", fit_config(backbone, tmp_path / "killed", callbacks=[hold])
    )
    ref = apt_fit(ref_cfg, tmp_path / "ref.log")  # uninterrupted, alongside the one that is killed
    killed = apt_fit(killed_cfg, tmp_path / "killed.log")
    processes += [ref, killed]
    ckpt_dir = tmp_path / "killed" / "apt" / "version_0" / "checkpoints"
    ckpt = ckpt_dir / "periodic-epoch=0-step=9.ckpt"
    deadline = time.monotonic() + 300
    while not (ckpt.is_file() and flag.exists()):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no periodic checkpoint at step 9 within 300 s"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [ckpt.name]  # only the newest periodic one is kept
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    pruning_state = next(v for k, v in state["callbacks"].items() if k.startswith("AdaptivePruning"))
    assert (
        state["global_step"] == 9
        and pruning_state["next_event"] == 1
        and pruning_state["targets"] is not None
    )

    resumed_cfg = write_config(tmp_path / "resumed" / "apt.yaml", fit_config(backbone, tmp_path / "resumed"))
    resumed = apt_fit(resumed_cfg, tmp_path / "resumed.log", "--ckpt_path", str(ckpt))
    processes.append(resumed)
    finish(resumed, tmp_path / "resumed.log")
    finish(ref, tmp_path / "ref.log")

    ref_dir, resumed_dir = (tmp_path / name / "apt" / "version_0" for name in ("ref", "resumed"))
    ref_pruning, ref_tuning = decisions(ref_dir)
    assert [e["step"] for e in ref_pruning["events"]] == [8, 12, 16]
    assert max(ref_tuning["events"][-1]["ranks"].values()) > 8  # it grew ranks after the kill point
    assert decisions(resumed_dir) == (ref_pruning, ref_tuning)
    config = yaml.safe_load((resumed_dir / "config.yaml").read_text())
    optimizer = config["model"]["init_args"]["optimizer"]  # the configured one, not the module default
    assert isinstance(optimizer, dict) and optimizer["class_path"] == "torch.optim.AdamW", optimizer

    final = "epoch=0-step=24.ckpt"
    a = torch.load(ref_dir / "checkpoints" / final, map_location="cpu", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / final, map_location="cpu", weights_only=False)
    assert a["apt"]["ranks"] == b["apt"]["ranks"] and a["apt"]["shapes"] == b["apt"]["shapes"]
    assert set(a["state_dict"]) == set(b["state_dict"])
    # fp32 on the CPU, one thread, the same operations on the same data: bit for bit
    different = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not different, different


# ---------------------------------------------------------------- the configured optimizer after resume
def test_resume_keeps_the_configured_optimizer_and_schedule(backbone, tmp_path):
    config = fit_config(backbone, tmp_path / "first")
    config["model"]["init_args"]["lr_scheduler"] = {
        "class_path": "apt_lightning.optim.WarmupLinearLR",
        "init_args": {"warmup_ratio": 0.25},
    }
    stop = {"class_path": "test_resume.StopAt", "init_args": {"step": 9}}
    first = {**config, "trainer": {**config["trainer"], "callbacks": config["trainer"]["callbacks"] + [stop]}}
    run_cli(["fit", "--config", str(write_config(tmp_path / "first.yaml", first))])
    ckpt = next((tmp_path / "first").rglob("periodic-epoch=0-step=9.ckpt"))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "second")
    cli = run_cli(
        ["fit", "--config", str(write_config(tmp_path / "second.yaml", config)), "--ckpt_path", str(ckpt)]
    )
    assert cli.trainer.global_step == 24  # through two more events, each rebuilding the optimizer
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = cli.model.optimizer_factory([param])
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1e-3, 0.01)
    assert cli.model.scheduler_factory(optimizer, total_steps=8, start_step=0, scale=1.0).warmup_ratio == 0.25
    saved = yaml.safe_load(next((tmp_path / "second").rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-3
    assert saved["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_ratio"] == 0.25


# ---------------------------------------------------------------- RNG: growth, layer sampling, random scorer
def test_grow_rank_with_a_generator_ignores_the_global_rng():
    def grown(global_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        layer = APTLinear(6, 5, rank=2)
        torch.manual_seed(global_seed)
        layer.grow_rank(5, generator=torch.Generator().manual_seed(7))
        return layer.lora_A.detach()[2:]

    torch.testing.assert_close(grown(1), grown(2), rtol=0, atol=0)


def fit_apt(backbone, tmp_path, ckpt_path=None, save_steps=(), global_seed=None, scorer="salience"):
    """Events at 4, 6, 8 (1-step windows); growth at each; distillation over the pruning phase."""
    model = make_module(backbone)
    pruning = AdaptivePruning(
        target_sparsity=0.5, start_step=2, end_step=8, num_events=3, decay_steps=1, scorer=scorer, plot=False
    )
    tuning, distill = AdaptiveTuning(budget_multiple=3.0), SelfDistillation(mu_max=0.5)
    saver = SaveAt(tmp_path, list(save_steps))
    trainer = quiet_trainer(
        max_steps=12, callbacks=[pruning, tuning, distill, saver], default_root_dir=tmp_path
    )
    if global_seed is not None:  # a resumed process whose global RNG is anything at all
        torch.manual_seed(global_seed)
    loader = repeated_batch_loader(12)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
    return model, pruning, tuning, distill, saver


@pytest.mark.parametrize("scorer", ["salience", "random"])
def test_resume_draws_the_same_random_numbers_as_an_uninterrupted_run(backbone, tmp_path, scorer):
    ref, ref_pruning, ref_tuning, ref_distill, saver = fit_apt(
        backbone, tmp_path, save_steps=[5], scorer=scorer
    )
    model, pruning, tuning, distill, _ = fit_apt(
        backbone, tmp_path, ckpt_path=saver.paths[5], global_seed=1234, scorer=scorer
    )
    assert [h["step"] for h in ref_tuning.history] == [4, 6, 8]  # two growths after the resume point
    assert tuning.history == ref_tuning.history and distill.history == ref_distill.history
    strip = [{k: v for k, v in e.items() if k not in TIMING} for e in ref_pruning.history]
    assert [{k: v for k, v in e.items() if k not in TIMING} for e in pruning.history] == strip
    assert ref_distill._distiller.generator.get_state().equal(distill._distiller.generator.get_state())
    state, ref_state = model.state_dict(), ref.state_dict()
    assert set(state) == set(ref_state)
    for name, value in ref_state.items():  # lora_A rows grown at 6 and 8 come from the growth generator
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- periodic checkpoints
def test_periodic_checkpoints_by_default_inside_the_pruning_phase(backbone, tmp_path):
    config = fit_config(backbone, tmp_path)
    cli = run_cli(["fit", "--config", str(write_config(tmp_path / "apt.yaml", config))])
    periodic = [cb for cb in cli.trainer.callbacks if isinstance(cb, PeriodicCheckpoint)]
    # (16 - 4) // 4: saves at 6, 9, 12, 15 fall inside the pruning phase (the killed run resumes from 9)
    assert len(periodic) == 1 and periodic[0]._every_n_train_steps == 3
    names = sorted(p.name for p in (Path(cli.trainer.log_dir) / "checkpoints").iterdir())
    assert names == ["epoch=0-step=24.ckpt", "periodic-epoch=0-step=24.ckpt"]  # the newest is kept


@pytest.mark.parametrize(
    "top,trainer,expected",
    [
        ({"checkpoint_every_n_steps": 5}, {}, ["ModelCheckpoint", "PeriodicCheckpoint"]),
        ({"checkpoint_every_n_steps": 0}, {}, ["ModelCheckpoint"]),
        ({}, {"enable_checkpointing": False}, []),
    ],
)
def test_periodic_checkpoint_settings(backbone, tmp_path, top, trainer, expected):
    config = fit_config(backbone, tmp_path, **top)
    config["trainer"].update(trainer, max_steps=1, callbacks=[])
    config.update(pruning=None, tuning=None, distillation=None)
    cli = run_cli(["fit", "--config", str(write_config(tmp_path / "apt.yaml", config))])
    kinds = [type(cb).__name__ for cb in cli.trainer.callbacks if "Checkpoint" in type(cb).__name__]
    assert kinds == expected
    if "checkpoint_every_n_steps" in top and expected[-1] == "PeriodicCheckpoint":
        periodic = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PeriodicCheckpoint))
        assert periodic._every_n_train_steps == 5


# ---------------------------------------------------------------- schedule changes on resume
def fit_pruning(backbone, tmp_path, ckpt_path=None, save_steps=(), max_steps=16, **kw):
    """Events at 6, 10, 14 (1-step windows) unless `kw` changes the schedule."""
    args = {"target_sparsity": 0.5, "start_step": 2, "end_step": 14, "num_events": 3, "decay_steps": 1, **kw}
    pruning = AdaptivePruning(plot=False, **args)
    saver = SaveAt(tmp_path, list(save_steps))
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[pruning, saver], default_root_dir=tmp_path)
    loader = repeated_batch_loader(max_steps)
    trainer.fit(make_module(backbone), train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
    return pruning, saver


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train_norms": True}, r"trained with train_norms: False, this run configures True"),
        (
            {"head_modules": ["classifier"]},
            r"trained with head_modules: None, this run configures \['classifier'\]",
        ),
    ],
)
def test_resuming_with_another_trained_set_is_refused_with_both_values(backbone, tmp_path, change, match):
    saver = SaveAt(tmp_path, [2])
    quiet_trainer(max_steps=3, callbacks=[saver], default_root_dir=tmp_path).fit(
        make_module(backbone), train_dataloaders=repeated_batch_loader(3)
    )
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        trainer.fit(
            make_module(backbone, **change),
            train_dataloaders=repeated_batch_loader(4),
            ckpt_path=saver.paths[2],
            weights_only=False,
        )
    validated = make_module(backbone, **change)  # evaluating the weights needs no optimizer state
    quiet_trainer(default_root_dir=tmp_path).validate(
        validated, dataloaders=repeated_batch_loader(1), ckpt_path=saver.paths[2], weights_only=False
    )


@pytest.mark.parametrize(
    "change,match",
    [
        ({"target_sparsity": 0.7}, r"target_sparsity: 0.5 in the checkpoint, 0.7 configured"),
        ({"end_step": 8}, r"end_step: 14 in the checkpoint, 8 configured"),  # before the saved step (10)
        ({"num_events": 2}, r"num_events: 3 in the checkpoint, 2 configured"),
        ({"decay_alpha": 0.5}, r"decay_alpha: None in the checkpoint, 0.5 configured"),
    ],
)
def test_schedule_change_on_resume_is_refused_with_old_and_new_values(backbone, tmp_path, change, match):
    _, saver = fit_pruning(backbone, tmp_path, save_steps=[10])  # inside event 1's decay window
    with pytest.raises(ValueError, match=match) as err:
        fit_pruning(backbone, tmp_path, ckpt_path=saver.paths[10], **change)
    message = str(err.value)
    assert "2 of 3 events taken, the last at step 10" in message and "Resume with the saved values" in message


def test_checkpoint_without_a_recorded_decay_alpha_is_not_checked_for_it():
    """Checkpoints from before decay_alpha was recorded may have run any value: no refusal on its account."""
    pruning = AdaptivePruning(
        plot=False, start_step=2, end_step=14, num_events=3, decay_steps=1, decay_alpha=0.5
    )
    pruning.schedule = pruning.plan_schedule(16)
    saved = {k: v for k, v in pruning._schedule_state().items() if k != "decay_alpha"}
    pruning._check_schedule(saved, 1, [])
    with pytest.raises(ValueError, match="decay_alpha: 0.25 in the checkpoint, 0.5 configured"):
        pruning._check_schedule({**saved, "decay_alpha": 0.25}, 1, [])


def test_longer_run_keeps_the_saved_pruning_steps(backbone, tmp_path):
    ref, saver = fit_pruning(backbone, tmp_path, save_steps=[5], max_steps=16, end_step=0.5)  # end at 8
    with pytest.warns(UserWarning, match=r"keeps the saved pruning steps \[2, 8\]"):
        resumed, _ = fit_pruning(backbone, tmp_path, ckpt_path=saver.paths[5], max_steps=24, end_step=0.5)
    assert resumed.schedule.end_step == 8
    assert [e["step"] for e in resumed.history] == [e["step"] for e in ref.history] == [4, 6, 8]
