"""What a suite is once read: its tasks, variants, runs and settings (`load` reads the file into these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BENCH_DEFAULTS = {
    "batch_size": 128,
    "seq_len": 128,
    "dtype": "auto",
    "device": "auto",
    "warmup": 10,
    "repeats": 30,
    "rounds": 3,
    "cuda_graphs": False,
    # causal LMs (timed generating, apt_lightning.tools.bench.decoder): batch_size x prompt_len prefilled,
    # then new_tokens greedy decode steps through the KV cache; seq_len is the encoders'
    "prompt_len": 128,
    "new_tokens": 128,
    "kv_cache": "static",
}
# the zero-shot phase (causal-LM runs only; `evaluation`): apt-eval's options, the variant whose average
# zero-shot accuracy is 100% in the report ("% of LoRA"), and whether the untuned backbone is scored too
EVAL_DEFAULTS = {
    "tasks": "all",
    "limit": None,
    "data_root": None,
    "batch_size": 32,
    "device": "auto",
    "dtype": "auto",
    "reference": "lora",
    "backbone": True,
    "timeout_s": None,
}


class SuiteError(ValueError):
    """A suite, overlay or base config that cannot be run; raised before any run starts."""


# ---------------------------------------------------------------------- the suite
@dataclass
class TaskSpec:
    key: str  # folder name and label in tables
    task: str  # a task name of `apt_lightning.data.get_task` (GLUE, or instruction tuning)
    label: str
    data_dir: str | None
    set: dict


@dataclass
class VariantSpec:
    name: str
    overlay_path: Path | None
    base_path: Path
    seeds: list[int]
    tasks: list[str]
    set: dict
    description: str


@dataclass
class RunSpec:
    variant: VariantSpec
    task: TaskSpec
    seed: int
    run_dir: Path
    config: dict  # the merged config (the EfficiencyMonitor's TTA reference is filled in at launch)

    @property
    def run_id(self) -> str:
        return f"{self.variant.name}/{self.task.key}/seed{self.seed}"


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    output_dir: Path
    data_root: str | None
    reference: str | None
    parallel: int
    gpus: list[str] | None
    timeout_s: float | None
    strict: bool
    keep_checkpoints: bool
    args: list[str]
    set: dict
    variants: list[VariantSpec]
    tasks: dict[str, TaskSpec]
    efficiency: dict | None
    benchmark: dict | None
    wandb: dict | None
    cli_set: dict = field(default_factory=dict)
    evaluation: dict | None = None  # the zero-shot phase's options (EVAL_DEFAULTS), None: off
