"""APT on one GPU against several under Lightning's DDP (docs/distributed.md, "Measured").

Three subcommands; each run is one `apt-fit fit` subprocess with `EfficiencyMonitor`, in its own folder under
`--out`, so every device command stays short (a lent GPU runs a command for at most 10 minutes):

    recipe      the MiniLM APT recipe (configs/minilm_sst2_apt.yaml) at a fixed global batch: one GPU takes
                the whole batch, N GPUs a share each (64 = 1 x 64 = 2 x 32). Both sides use the `ddp` strategy
                (one process on one GPU), so they are seeded alike (Lightning re-seeds at its DDP set-up).
    throughput  training samples/s at a fixed per-device batch and sequence length on synthetic tokens (no
                data loading, no padding), the APT module with adapters and no APT callbacks (the steady
                state between events). `--backbone preset:smollm2-135m` builds the architecture with random
                weights (offline, no download).
    report      reads every run under `--out`, prints a Markdown table and the acceptance checks, writes
                `ddp_scaling.json`.

    python benchmarks/ddp_scaling.py recipe --devices 1 --seed 0 --out runs/ddp_scaling
    python benchmarks/ddp_scaling.py recipe --devices 2 --seed 0 --out runs/ddp_scaling
    python benchmarks/ddp_scaling.py throughput --devices 1 --backbone preset:smollm2-135m
    python benchmarks/ddp_scaling.py throughput --devices 2 --backbone preset:smollm2-135m
    python benchmarks/ddp_scaling.py report --out runs/ddp_scaling

Extra `apt-fit` arguments follow `--` (e.g. `-- --trainer.max_epochs 1 --data.init_args.train_limit 20000`
to fit a 10-minute limit; the report records them). NCCL_NVLS_ENABLE=0 is set for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from apt_lightning.data import GLUEDataModule
from apt_lightning.files import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "minilm_sst2_apt.yaml"


# ---------------------------------------------------------------------- synthetic data (throughput)
class _Tokens(Dataset):
    """Row i: `length` token ids and a 0/1 label from a generator seeded with i (any rank, any order)."""

    def __init__(self, rows: int, length: int, vocab: int) -> None:
        self.rows, self.length, self.vocab = rows, length, vocab

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, self.vocab, (self.length,), generator=g)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(self.length, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=g),
        }


class SyntheticTokens(GLUEDataModule):
    """Fixed-length random token rows, `steps` batches per rank; no files, no tokenizer (`tokenizer` is the
    model's backbone, linked by apt-fit)."""

    def __init__(
        self,
        task: str = "sst2",
        tokenizer: str = "minilm-l6",
        batch_size: int = 32,
        max_length: int = 256,
        steps: int = 300,
        vocab: int = 1000,
    ) -> None:
        super().__init__(task=task, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.steps, self.vocab = steps, vocab

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        batch = self.hparams.batch_size
        rows = _Tokens(self.steps * batch * world, self.hparams.max_length, self.vocab)
        return DataLoader(
            rows, batch_size=batch, shuffle=False, num_workers=2, pin_memory=torch.cuda.is_available()
        )


# ---------------------------------------------------------------------- runs
def _preset_folder(name: str, out: Path) -> Path:
    """A backbone folder holding only the config.json of a preset architecture (random weights)."""
    from apt_lightning.structure import preset_config

    folder = out / "backbones" / name
    if not (folder / "config.json").is_file():
        preset_config(name).save_pretrained(folder)
    return folder


def _launch(name: str, out: Path, args: list[str], meta: dict) -> int:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "apt_lightning.cli",
        "fit",
        *args,
        "--trainer.callbacks+=apt_lightning.callbacks.EfficiencyMonitor",
        f"--trainer.logger.init_args.save_dir={folder}",
        "--trainer.logger.init_args.name=apt",
        f"--trainer.default_root_dir={folder}",
    ]
    env = {
        **os.environ,
        "NCCL_NVLS_ENABLE": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with (folder / "apt-fit.log").open("w") as log:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    meta = {**meta, "command": cmd, "returncode": code, "wall_s": time.perf_counter() - t0}
    write_json_atomic(folder / "run.json", meta)
    print(f"{name}: exit {code} after {meta['wall_s']:.0f} s (log: {folder / 'apt-fit.log'})", flush=True)
    return code


def recipe(args: argparse.Namespace) -> int:
    if args.global_batch % args.devices:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --devices {args.devices}")
    per_device = args.global_batch // args.devices
    fit = [
        "--config",
        str(RECIPE),
        f"--seed_everything={args.seed}",
        f"--trainer.accelerator={args.accelerator}",
        f"--trainer.devices={args.devices}",
        "--trainer.strategy=ddp",
        f"--data.init_args.batch_size={per_device}",
        "--checkpoint_every_n_steps=0",
    ]
    if args.data_dir:
        fit.append(f"--data.init_args.data_dir={args.data_dir}")
    name = f"recipe_{args.devices}gpu_seed{args.seed}"
    meta = {
        "kind": "recipe",
        "devices": args.devices,
        "seed": args.seed,
        "global_batch": args.global_batch,
        "per_device_batch": per_device,
        "extra": args.extra,
    }
    return _launch(name, args.out, fit + args.extra, meta)


def throughput(args: argparse.Namespace) -> int:
    backbone = args.backbone
    pretrained = True
    if backbone.startswith("preset:"):
        backbone, pretrained = str(_preset_folder(backbone.split(":", 1)[1], args.out)), False
    fit = [
        "--seed_everything=0",
        "--model=apt_lightning.APTModule",
        f"--model.init_args.backbone={backbone}",
        f"--model.init_args.pretrained={str(pretrained).lower()}",
        "--data=ddp_scaling.SyntheticTokens",
        f"--data.init_args.batch_size={args.batch}",
        f"--data.init_args.max_length={args.seq}",
        f"--data.init_args.steps={args.steps}",
        f"--trainer.accelerator={args.accelerator}",
        f"--trainer.devices={args.devices}",
        "--trainer.strategy=ddp",
        f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={args.steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=50",
    ]
    label = args.backbone.replace(":", "-").replace("/", "_")
    name = f"throughput_{label}_b{args.batch}_s{args.seq}_{args.devices}gpu"
    meta = {
        "kind": "throughput",
        "devices": args.devices,
        "backbone": args.backbone,
        "per_device_batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "precision": args.precision,
        "extra": args.extra,
    }
    return _launch(name, args.out, fit + args.extra, meta)


# ---------------------------------------------------------------------- report
def _read(run: Path) -> dict | None:
    meta_file = run / "run.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    logs = sorted((run / "apt").glob("version_*"))
    eff_file = logs[-1] / "efficiency.json" if logs else None
    if eff_file is None or not eff_file.is_file():
        return {**meta, "name": run.name, "finished": False}
    eff = json.loads(eff_file.read_text())
    ranks = eff.get("per_rank") or [{"peak_memory_mb": eff["peak_memory_mb"]}]
    row = {
        **meta,
        "name": run.name,
        "finished": meta["returncode"] == 0,
        "steps": eff["global_step"],
        "median_step_s": eff["median_step_s"],
        "train_wall_s": eff["train_wall_s"],
        "best_metric": eff["best_metric"],
        "final_metric": eff["metric_history"][-1]["metric"] if eff["metric_history"] else None,
        "sparsity": (eff.get("structure") or {}).get("sparsity"),
        "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in ranks],
        "device_name": eff["device_name"],
        # under DDP compaction and growth include re-wrapping the module (docs/distributed.md)
        "compact_s": eff["pruning_overhead"]["compact_s"],
        "grow_s": eff["pruning_overhead"]["grow_s"],
    }
    # every step runs in lockstep across ranks (gradient all-reduce): the global batch per median step
    global_batch = row["per_device_batch"] * row["devices"]
    row["samples_per_s"] = global_batch / row["median_step_s"] if row["median_step_s"] else None
    return row


def _checks(rows: list[dict]) -> dict:
    out: dict = {}
    recipes = [r for r in rows if r["kind"] == "recipe" and r["finished"]]
    one = [r for r in recipes if r["devices"] == 1]
    many = [r for r in recipes if r["devices"] > 1]
    if one and many:
        accs = [r["best_metric"] for r in one]
        lo, hi = min(accs), max(accs)
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        by_devices: dict[int, list[float]] = {}
        for r in many:
            by_devices.setdefault(r["devices"], []).append(r["best_metric"])
        out["recipe"] = {
            "one_gpu_best_metric": accs,
            "one_gpu_mean": mean,
            "one_gpu_std": std,
            "one_gpu_sparsity": [r["sparsity"] for r in one],
            # the seed spread read two ways: the one-GPU range, and its mean +- 2 sample deviations
            "multi_gpu_mean": {
                n: {"mean": statistics.mean(v), "within_one_gpu_range": lo <= statistics.mean(v) <= hi}
                for n, v in sorted(by_devices.items())
            },
            "multi_gpu": [
                {
                    "devices": r["devices"],
                    "seed": r["seed"],
                    "best_metric": r["best_metric"],
                    "sparsity": r["sparsity"],
                    "sparsity_equal": all(abs(r["sparsity"] - o["sparsity"]) < 1e-9 for o in one),
                    "metric_within_one_gpu_range": lo <= r["best_metric"] <= hi,
                    "metric_within_two_std": abs(r["best_metric"] - mean) <= 2 * std,
                    "metric_minus_one_gpu_mean": r["best_metric"] - mean,
                }
                for r in many
            ],
        }
    speed = [r for r in rows if r["kind"] == "throughput" and r["finished"] and r["samples_per_s"]]
    pairs = []
    for r in speed:
        if r["devices"] == 1:
            continue
        base = [
            b
            for b in speed
            if b["devices"] == 1
            and (b["backbone"], b["per_device_batch"], b["seq"], b["precision"])
            == (r["backbone"], r["per_device_batch"], r["seq"], r["precision"])
        ]
        if base:
            pairs.append(
                {
                    "backbone": r["backbone"],
                    "per_device_batch": r["per_device_batch"],
                    "seq": r["seq"],
                    "devices": r["devices"],
                    "one_gpu_samples_per_s": base[0]["samples_per_s"],
                    "samples_per_s": r["samples_per_s"],
                    "speedup": r["samples_per_s"] / base[0]["samples_per_s"],
                    "one_gpu_step_ms": 1000 * base[0]["median_step_s"],
                }
            )
    if pairs:
        out["throughput"] = pairs
    return out


def _table(rows: list[dict]) -> str:
    head = (
        "| run | GPUs | batch/GPU | steps | median step (ms) | samples/s | train wall (s) | best dev | "
        "sparsity | compact+grow (s) | peak mem/rank (MB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    for r in rows:
        if not r.get("finished"):
            lines.append(f"| {r['name']} | {r['devices']} | | | | | | | | | not finished |")
            continue
        mem = ", ".join(f"{m:.0f}" for m in r["peak_memory_mb_per_rank"] if m is not None)
        lines.append(
            f"| {r['name']} | {r['devices']} | {r['per_device_batch']} | {r['steps']} | "
            f"{fmt(1000 * r['median_step_s'], '.1f')} | {fmt(r['samples_per_s'], '.0f')} | "
            f"{fmt(r['train_wall_s'], '.0f')} | {fmt(r['best_metric'], '.4f')} | "
            f"{fmt(r['sparsity'], '.4f')} | {r['compact_s'] + r['grow_s']:.2f} | {mem} |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    rows = [row for run in sorted(args.out.iterdir()) if run.is_dir() and (row := _read(run))]
    if not rows:
        raise SystemExit(f"no runs under {args.out}")
    table = _table(rows)
    checks = _checks(rows)
    print(table)
    print(json.dumps(checks, indent=1))
    write_json_atomic(args.out / "ddp_scaling.json", {"runs": rows, "checks": checks})
    write_text_atomic(args.out / "ddp_scaling.md", table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipe", help="the MiniLM APT recipe at a fixed global batch")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--data-dir", default=None, help="SST-2 folder (default: the recipe's ../shared/data)")
    p = sub.add_parser("throughput", help="training samples/s at a fixed per-device batch")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--backbone", default="preset:smollm2-135m", help="alias, folder, or preset:<name>")
    p.add_argument("--batch", type=int, default=32, help="per-device batch")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--precision", default="bf16-mixed")
    sub.add_parser("report", help="table and checks of every run under --out")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=Path("runs/ddp_scaling"))
        p.add_argument("--accelerator", default="gpu", help="gpu; cpu for a smoke run (gloo)")
    args = parser.parse_args(argv)
    args.extra = extra
    args.out.mkdir(parents=True, exist_ok=True)
    return {"recipe": recipe, "throughput": throughput, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
