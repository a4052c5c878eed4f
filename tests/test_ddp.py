"""APT under Lightning's DDP on the CPU (2 processes, gloo): every rank ends in the same state, the decisions
are those of one process on the same global batch, a run resumes under DDP, and the consistency check and
the salience reduction hold on their own (docs/distributed.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_apt import make_module, synthetic_batch
from lightning import Callback
from test_resume import apt_fit, decisions, finish, processes, write_config  # noqa: F401 (a fixture)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from apt_lightning.callbacks import AdaptivePruning
from apt_lightning.callbacks.events import find_callback
from apt_lightning.data import GLUEDataModule
from apt_lightning.distributed import RankMismatchError, check_consistency, from_rank_zero
from apt_lightning.pruning import OutlierAwareSalience

STEPS_PER_EPOCH = 8
GLOBAL_BATCH = 8


# ---------------------------------------------------------------- used by the apt-fit runs (by class_path)
class DistinctData(GLUEDataModule):
    """`STEPS_PER_EPOCH` global batches of distinct fixed-length rows, in order. Under DDP the distributed
    sampler deals row i to rank i % 2, so rank r's k-th batch of `batch_size` rows and the other rank's
    make up the k-th batch of 2 x `batch_size` rows of one process. 16 validation rows."""

    def __init__(self, task: str = "sst2", tokenizer: str = "minilm-l6", batch_size: int = 8) -> None:
        super().__init__(task=task, tokenizer=tokenizer, batch_size=batch_size)

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass

    @staticmethod
    def _rows(n: int, seed: int) -> list[dict]:
        batch = synthetic_batch(n, 12, seed)
        return [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def train_dataloader(self):
        rows = self._rows(STEPS_PER_EPOCH * GLOBAL_BATCH, seed=0)
        return DataLoader(rows, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self._rows(16, seed=1), batch_size=self.hparams.batch_size, shuffle=False)


class DumpState(Callback):
    """Writes each rank's end state to `<folder>/rank<R>.pt`: weights and masks, adapter ranks, teacher
    snapshot, salience statistics, the blocks each pruning event kept, and the DDP wrappers it trained in."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.kept: list[dict] = []
        self.wrappers: list[int] = []
        self.covers = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        wrapper = trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel) and id(wrapper) not in self.wrappers:
            self.wrappers.append(id(wrapper))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruning = find_callback(trainer, AdaptivePruning)
        if pruning.targets is not None and pruning.window_start == trainer.global_step:
            keep = pruning.targets
            self.kept.append(
                [[t.tolist() for t in keep.heads], [t.tolist() for t in keep.neurons], keep.hidden.tolist()]
            )

    def on_train_end(self, trainer, pl_module) -> None:  # before the strategy unwraps the module
        wrapper = trainer.strategy.model
        current = list(pl_module.parameters())
        self.covers = (
            isinstance(wrapper, DistributedDataParallel)
            and len(wrapper._module_parameters) == len(current)
            and all(a is b for a, b in zip(wrapper._module_parameters, current, strict=True))
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {
            "step": trainer.global_step,
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "frozen": [n for n, p in pl_module.named_parameters() if not p.requires_grad],
            "ranks": {n: m.rank for n, m in pl_module.adapters().items()},
            "teacher": {k: v.cpu() for k, v in pl_module.teacher.tensors.items()},
            "salience": find_callback(trainer, AdaptivePruning).scorer.state_dict(),
            "kept": self.kept,
            "wrappers": len(self.wrappers),
            "wrapper_covers_parameters": self.covers,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


# ---------------------------------------------------------------- apt-fit configs
PRUNING = {"target_sparsity": 0.5, "start_step": 2, "end_step": 12, "num_events": 3, "decay_steps": 1}


def ddp_config(backbone, out: Path, devices: int) -> dict:
    """2 epochs of 8 global batches of 8 rows (`devices` x 8 / `devices` rows per device); events at 5, 9
    and 12, each growing ranks, the later two compacting; distillation; AdamW 1e-3; validation at each
    epoch end; every end-of-epoch checkpoint kept."""
    return {
        "seed_everything": 0,
        "checkpoint_every_n_steps": 0,
        "pruning": {**PRUNING, "plot": False},
        "tuning": {"budget_multiple": 3.0},
        "distillation": {"mu_max": 0.5},
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": devices,
            "strategy": "ddp",  # on one device too: Lightning's DDP set-up re-seeds (docs/distributed.md)
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out), "name": "apt"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_top_k": -1},
                },
                {"class_path": "apt_lightning.callbacks.EfficiencyMonitor"},
                {"class_path": "test_ddp.DumpState", "init_args": {"folder": str(out / "dump")}},
            ],
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
        "data": {
            "class_path": "test_ddp.DistinctData",
            "init_args": {"batch_size": GLOBAL_BATCH // devices},
        },
    }


def load_dump(out: Path, rank: int) -> dict:
    return torch.load(out / "dump" / f"rank{rank}.pt", map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, msg=name, **tolerance)


def test_apt_under_ddp_matches_one_process_and_resumes(backbone, tmp_path, processes):  # noqa: F811
    runs = {name: tmp_path / name for name in ("ddp", "single", "resumed")}
    ddp = apt_fit(
        write_config(runs["ddp"] / "apt.yaml", ddp_config(backbone, runs["ddp"], 2)), runs["ddp"] / "log"
    )
    single_cfg = write_config(runs["single"] / "apt.yaml", ddp_config(backbone, runs["single"], 1))
    single = apt_fit(single_cfg, runs["single"] / "log")
    processes += [ddp, single]
    finish(ddp, runs["ddp"] / "log")

    ckpt = runs["ddp"] / "apt" / "version_0" / "checkpoints" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    resumed_cfg = write_config(runs["resumed"] / "apt.yaml", ddp_config(backbone, runs["resumed"], 2))
    resumed = apt_fit(resumed_cfg, runs["resumed"] / "log", "--ckpt_path", str(ckpt))
    processes.append(resumed)

    # every rank: the same masks, widths, ranks, teacher and salience; weights to fp32 tolerance
    rank0, rank1 = load_dump(runs["ddp"], 0), load_dump(runs["ddp"], 1)
    assert rank0["step"] == rank1["step"] == 2 * STEPS_PER_EPOCH
    assert rank0["ranks"] == rank1["ranks"] and max(rank0["ranks"].values()) > 8  # grown
    assert_same_tensors(rank0["state_dict"], rank1["state_dict"])
    assert_same_tensors(rank0["teacher"], rank1["teacher"])
    assert_same_tensors(rank0["salience"]["salience"], rank1["salience"]["salience"])
    assert len(rank0["kept"]) == 3 and rank0["kept"] == rank1["kept"]
    # compaction and growth re-wrapped the module, and the wrapper in use covers its current parameters
    assert rank0["wrappers"] > 1 and rank0["wrapper_covers_parameters"] and rank1["wrapper_covers_parameters"]

    # one process on the same global batches: the same blocks at every event, the same ranks and widths;
    # the frozen weights are slices of the same tensors, so equal bit for bit
    finish(single, runs["single"] / "log")
    one = load_dump(runs["single"], 0)
    assert one["kept"] == rank0["kept"] and one["ranks"] == rank0["ranks"]
    ddp_dir, single_dir = (runs[n] / "apt" / "version_0" for n in ("ddp", "single"))
    assert decisions(ddp_dir) == decisions(single_dir)
    assert_same_tensors(
        {n: one["state_dict"][n] for n in one["frozen"]},
        {n: rank0["state_dict"][n] for n in one["frozen"]},
        rtol=0,
        atol=0,
    )
    # the summed-then-multiplied salience equals one process's up to float32 summation order
    assert_same_tensors(one["salience"]["salience"], rank0["salience"]["salience"], rtol=1e-4, atol=1e-9)
    ddp_eff, one_eff = (json.loads((d / "efficiency.json").read_text()) for d in (ddp_dir, single_dir))
    assert ddp_eff["world_size"] == 2 and [r["rank"] for r in ddp_eff["per_rank"]] == [0, 1]
    assert all(r["peak_memory_mb"] > 0 and r["samples"] == 8 * STEPS_PER_EPOCH for r in ddp_eff["per_rank"])
    # validation over both ranks' halves of the dev rows: one process's accuracy on all of them
    assert [e["metric"] for e in ddp_eff["metric_history"]] == [
        e["metric"] for e in one_eff["metric_history"]
    ]

    # resumed under DDP from the end of epoch 0 (events 1 and 2, compaction and growth still to come):
    # the uninterrupted run's decisions and state
    finish(resumed, runs["resumed"] / "log")
    again = load_dump(runs["resumed"], 0)
    assert again["kept"] == rank0["kept"][1:] and again["ranks"] == rank0["ranks"]
    assert decisions(runs["resumed"] / "apt" / "version_0") == decisions(ddp_dir)
    assert_same_tensors(rank0["state_dict"], again["state_dict"], rtol=1e-5, atol=1e-6)
    assert_same_tensors(again["state_dict"], load_dump(runs["resumed"], 1)["state_dict"])


# ---------------------------------------------------------------- the helpers in two processes
def _two_ranks(rank: int, folder: Path, backbone: Path) -> None:
    """Rank `rank` of 2 (gloo): salience of its half of a batch; the consistency check, passing and then
    failing on injected differences; a decision taken from rank 0. Writes what it saw to rank<R>.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        seen = {}
        model = make_module(backbone)
        structure = model.structure
        structure.install_masks()
        scorer = OutlierAwareSalience()
        scorer.attach(structure)
        seen.update(_salience(model, scorer, rows=slice(rank, None, 2)))
        check_consistency(model, "the start")  # equal: passes
        seen["decision"] = from_rank_zero({"layer": rank}, "a test decision")
        if rank == 1:
            structure.masks.set("head", torch.tensor([1.0, 0.0, 1.0, 1.0]), 1)
            model.grow_adapters({"bert.encoder.layer.2.attention.self.value": 12})
        try:
            check_consistency(model, "the injected difference")
        except RankMismatchError as err:
            seen["error"] = str(err)
        torch.save(seen, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _salience(model, scorer, rows: slice) -> dict:
    batch = synthetic_batch(8, 12, seed=0)
    batch = {k: v[rows] for k, v in batch.items()}
    labels = batch.pop("labels")
    model.structure.masks.observer = scorer
    model.task_loss(model(**batch).logits, labels).backward()
    model.structure.masks.observer = None
    scorer.step()
    return {"salience": dict(scorer.salience), "mean_act": dict(scorer.mean_act)}


def test_salience_reduction_and_consistency_check_across_two_processes(backbone, tmp_path):
    mp.spawn(_two_ranks, args=(tmp_path, backbone), nprocs=2, join=True)
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # each rank saw half of the batch; after the reduction both hold one process's salience on all of it
    model = make_module(backbone)
    model.structure.install_masks()
    scorer = OutlierAwareSalience()
    scorer.attach(model.structure)
    whole = _salience(model, scorer, rows=slice(None))
    for r in (0, 1):
        for key in ("salience", "mean_act"):
            assert_same_tensors(whole[key], seen[r][key], rtol=1e-5, atol=1e-9)

    assert seen[0]["decision"] == seen[1]["decision"] == {"layer": 0}
    for r in (0, 1):  # every rank raises, naming the rank and what differs
        message = seen[r]["error"]
        assert "at the injected difference: rank 1 differs from rank 0" in message
        assert "masks: head_1" in message
        assert (
            "adapter ranks: bert.encoder.layer.2.attention.self.value (8 on rank 0, 12 on rank 1)" in message
        )
        assert "weights: " in message and "lora_A" in message


@pytest.mark.usefixtures("one_thread")
def test_single_process_helpers_are_no_ops(backbone):
    model = make_module(backbone)
    check_consistency(model, "anywhere")  # no process group: nothing to compare
    assert from_rank_zero([1, 2], "a decision") == [1, 2]
