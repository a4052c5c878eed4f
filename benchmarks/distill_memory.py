"""Training memory and step time of the distillation schedules on a CPU (docs/method.md section 7): the
MiniLM-L6 recipe (configs/minilm_sst2_apt.yaml) without distillation, with its in-pruning distillation,
and with the authors' schedule (configs/ablations/distill_authors.yaml), each in its own process.

    python benchmarks/distill_memory.py --out distill_memory.json

Per run: the process's peak RSS since fit start (EfficiencyMonitor; dominated by the libraries and the
data, so it barely tells the schedules apart), and per phase (pruning, post-pruning distillation, final):
the median step time of the unprofiled steps, the largest RSS at a step's end, the largest bytes of the
training state at a step's start (the student's parameters and buffers, the teacher snapshot, the kept best
state, the optimizer's moments; each and their sum), and `peak_tensor_mb`: the most tensor memory of a
step, that state plus the peak of what the step allocated on top (activations, gradients, the teacher's
forward; PyTorch's CPU profiler, every `--profile-every` steps). Small data and a short schedule: the numbers
compare the schedules with each other; the GPU measurement is `torch.cuda.max_memory_allocated` in a suite
run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "no_distillation": REPO / "configs" / "ablations" / "no_distillation.yaml",
    "in_pruning": None,  # the base recipe
    "authors": REPO / "configs" / "ablations" / "distill_authors.yaml",
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _transient_peak(prof) -> int:
    """The largest sum of the bytes allocated minus freed at any point of a profiled window (CPU)."""
    points = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, change in points:
        current += change
        peak = max(peak, current)
    return peak


def child(variant: str, args: argparse.Namespace) -> dict:
    import torch
    from lightning import Callback
    from torch.profiler import ProfilerActivity, profile

    from apt_lightning.callbacks import EfficiencyMonitor, SelfDistillation
    from apt_lightning.callbacks.events import find_callback
    from apt_lightning.cli import run_cli
    from apt_lightning.telemetry import current_rss_mb

    torch.set_num_threads(args.threads)

    class PhaseMeter(Callback):
        """Per step: the phase, the step time, the RSS, the training state's bytes; every `every`-th step
        also the peak of the tensors allocated during the step (CPU profiler) on top of that state."""

        def __init__(self, every: int) -> None:
            self.every = every
            self.rows: list[dict] = []
            self._t0 = 0.0
            self._state: dict = {}
            self._prof = None

        def state(self, trainer, pl_module) -> dict:
            distill = find_callback(trainer, SelfDistillation)
            teacher = pl_module.teacher.tensors.values() if pl_module.teacher is not None else []
            best = (distill.best or {}).get("tensors", {}).values() if distill is not None else []
            opt = trainer.optimizers[0].state.values()
            moments = [t for st in opt for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
            return {
                "params_mb": _bytes([*pl_module.parameters(), *pl_module.buffers()]) / 2**20,
                "teacher_mb": _bytes(teacher) / 2**20,
                "best_mb": _bytes(best) / 2**20,
                "optimizer_mb": _bytes(moments) / 2**20,
            }

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._state = self.state(trainer, pl_module)  # after SelfDistillation's phase switch
            if trainer.global_step % self.every == 0:
                self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._prof.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seconds = time.perf_counter() - self._t0
            step_peak = None
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                step_peak = _transient_peak(self._prof) / 2**20
                self._prof = None
            distill = find_callback(trainer, SelfDistillation)
            step = trainer.global_step - 1
            if distill is None:
                phase = "training"
            elif distill.finished:
                phase = "final"
            else:
                phase = "pruning" if step < distill.end else "post_pruning"
            self.rows.append(
                {
                    "step": step,
                    "phase": phase,
                    "step_s": seconds if step_peak is None else None,  # profiled steps run slower
                    "rss_mb": current_rss_mb(),
                    "transient_mb": step_peak,
                    **self._state,
                }
            )

    with tempfile.TemporaryDirectory() as tmp:
        configs = ["--config", str(REPO / "configs" / "minilm_sst2_apt.yaml")]
        if VARIANTS[variant] is not None:
            overlay = yaml.safe_load(VARIANTS[variant].read_text())
            partial = {k: v for k, v in overlay.items() if k not in ("description", "paper")}
            (Path(tmp) / "overlay.yaml").write_text(yaml.safe_dump(partial))
            configs += ["--config", str(Path(tmp) / "overlay.yaml")]
        cli = run_cli(
            [
                *configs,
                "--trainer.accelerator=cpu",
                f"--trainer.max_epochs={args.epochs}",
                "--trainer.val_check_interval=0.25",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false",
                "--checkpoint_every_n_steps=null",
                f"--trainer.logger.init_args.save_dir={tmp}",
                f"--data.init_args.data_dir={REPO.parent / 'shared' / 'data' / 'glue' / 'sst2'}",
                f"--data.init_args.train_limit={args.train_limit}",
                "--data.init_args.eval_limit=128",
                f"--data.init_args.batch_size={args.batch_size}",
                "--data.init_args.max_length=64",
                "--pruning.start_step=10",
                "--pruning.num_events=4",
                "--pruning.decay_steps=2",
            ],
            run=False,
        )
        meter, efficiency = PhaseMeter(args.profile_every), EfficiencyMonitor(output_dir=tmp, log=False)
        cli.trainer.callbacks.extend([meter, efficiency])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        summary = json.loads((Path(tmp) / "efficiency.json").read_text())
    phases = {}
    for phase in dict.fromkeys(r["phase"] for r in meter.rows):
        rows = [r for r in meter.rows if r["phase"] == phase]
        state = ("params_mb", "teacher_mb", "best_mb", "optimizer_mb")
        profiled = [r for r in rows if r["transient_mb"] is not None]
        timed = [r["step_s"] for r in rows if r["step_s"] is not None]
        phases[phase] = {
            "steps": [rows[0]["step"], rows[-1]["step"]],
            "median_step_s": statistics.median(timed) if timed else None,
            "max_rss_mb": max(r["rss_mb"] for r in rows),
            **{k: max(r[k] for r in rows) for k in state},
            "max_state_mb": max(sum(r[k] for k in state) for r in rows),
            "profiled_steps": [r["step"] for r in profiled],
            # the step's tensor peak: the state before it plus what the step allocated on top
            "peak_tensor_mb": max(
                (sum(r[k] for k in state) + r["transient_mb"] for r in profiled), default=None
            ),
        }
    return {
        "variant": variant,
        "peak_rss_mb": summary["peak_memory_mb"],
        "memory_kind": summary["memory_kind"],
        "best_metric": summary["best_metric"],
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("distill_memory.json"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train-limit", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-every", type=int, default=4, help="profile tensor memory every N steps")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=1))
    from apt_lightning.files import write_json_atomic

    write_json_atomic(args.out, {"settings": vars(args) | {"out": str(args.out)}, "runs": results})


if __name__ == "__main__":
    main()
