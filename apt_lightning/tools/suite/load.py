"""Reading a suite file: every check that can be made before anything trains.

Suite files (``configs/suites/*.yaml``; config paths are relative to the suite file, data and output
paths to the working directory)::

    name: smoke_cpu                       # W&B group and default output folder runs/ablations/<name>
    description: what this suite is for
    base: ../minilm_sst2_apt.yaml         # the recipe every overlay changes
    overlay_dir: ../ablations             # default: configs/ablations next to the suites folder
    output_dir: runs/ablations/smoke_cpu
    data_root: ../shared/data/glue        # substituted into "{data_root}" in task data_dir (--data-root)
    reference: ft                         # the FT variant: % of FT, TTA and memory ratios
    seeds: [0]                            # default seeds of every variant
    parallel: 1                           # concurrent training processes (they share one GPU)
    gpus: null                            # [0, 1] or auto (all visible): spread the processes over GPUs
    timeout_s: null                       # per-run wall-clock limit
    strict: false                         # exit 1 when any run failed
    keep_checkpoints: true                # keep <run>/final.ckpt after benchmarking
    args: ["--trainer.accelerator=cpu"]   # extra apt-fit arguments, appended to every run
    set: {trainer.max_steps: 12, pruning.start_step: 2}   # apt-fit keys, dotted, for every run
    variants:                             # a name (overlay <name>.yaml) or a mapping:
      - apt
      - {name: ft, seeds: [0, 1, 2], tasks: [sst2], overlay: ft, base: ../other.yaml, set: {...}}
    tasks:                                # GLUE task names or instruction, or labels with `task:`
      sst2: {data_dir: "{data_root}/sst2", set: {data.init_args.train_limit: 256}}
      mnli9k: {task: mnli, label: MNLI-9k subset, data_dir: "{data_root}/mnli_subset"}
    efficiency: {init_args: {}}           # EfficiencyMonitor options, or false
    benchmark: {batch_size: 128, seq_len: 128, dtype: auto, device: auto, warmup: 10, repeats: 30,
                rounds: 3, cuda_graphs: false,   # or false; auto: bf16 on CUDA, fp32 on the CPU
                prompt_len: 128, new_tokens: 128, kv_cache: static}   # causal LMs: generation (apt-bench)
    evaluation:                           # zero-shot accuracy of causal-LM runs (apt-eval); default false
      tasks: all                          # or a list: [arc_easy, arc_challenge, piqa, ...]
      limit: null                         # the first N items of each task (null: all)
      data_root: ../shared/data           # the local sets (null: apt-eval's default)
      batch_size: 32
      device: auto
      dtype: auto                         # auto: bfloat16 on CUDA, float32 on the CPU
      reference: lora                     # the variant whose average is 100% ("% of LoRA" in the report)
      backbone: true                      # also score the untuned backbone once
      timeout_s: null                     # per apt-eval process
    wandb: {project: apt-ablations, offline: true}   # or false (default); group = suite name

How each run's config is composed from these: `compose`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.gpus import select_gpus
from apt_lightning.tools.suite.overlay import load_overlay, load_yaml
from apt_lightning.tools.suite.spec import (
    BENCH_DEFAULTS,
    EVAL_DEFAULTS,
    Suite,
    SuiteError,
    TaskSpec,
    VariantSpec,
)

_SUITE_KEYS = {
    "name",
    "description",
    "base",
    "overlay_dir",
    "output_dir",
    "data_root",
    "reference",
    "seeds",
    "parallel",
    "gpus",
    "timeout_s",
    "strict",
    "keep_checkpoints",
    "args",
    "set",
    "variants",
    "tasks",
    "efficiency",
    "benchmark",
    "evaluation",
    "wandb",
}
_VARIANT_KEYS = {"name", "overlay", "base", "seeds", "tasks", "set", "description"}
_TASK_KEYS = {"task", "label", "data_dir", "set"}


def _as_seeds(value: Any, where: str) -> list[int]:
    if value is None:
        raise SuiteError(f"{where}: no seeds given; add `seeds: [0]` (a list of integers)")
    seeds = value if isinstance(value, list) else [value]
    if not seeds:
        raise SuiteError(f"{where}: zero seeds; give at least one (e.g. `seeds: [0]`)")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SuiteError(f"{where}: seeds must be integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: repeated seeds in {seeds}")
    return list(seeds)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def _evaluation(value: Any, path: Path) -> dict | None:
    """The `evaluation` block with its defaults, checked; None when it is off (false, null, absent)."""
    if value is None or value is False:
        return None
    where = f"suite {path}: evaluation"
    options = {**EVAL_DEFAULTS, **({} if value is True else _mapping(value, where))}
    bad = set(options) - set(EVAL_DEFAULTS)
    if bad:
        raise SuiteError(f"{where}: unknown keys {sorted(bad)}; allowed: {sorted(EVAL_DEFAULTS)}")
    tasks = options["tasks"]
    if isinstance(tasks, list):
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise SuiteError(f"{where}: tasks must be 'all' or a non-empty list of task names, got {tasks!r}")
        options["tasks"] = ",".join(tasks)
    elif not isinstance(tasks, str) or not tasks:
        raise SuiteError(f"{where}: tasks must be 'all' or a non-empty list of task names, got {tasks!r}")
    for key, kinds, allowed in (
        ("limit", (int, type(None)), "a positive integer or null"),
        ("batch_size", (int,), "a positive integer"),
        ("timeout_s", (int, float, type(None)), "a positive number or null"),
    ):
        v = options[key]
        if isinstance(v, bool) or not isinstance(v, kinds) or (v is not None and v <= 0):
            raise SuiteError(f"{where}: {key} must be {allowed}, got {v!r}")
    if options["device"] not in ("auto", "cpu", "cuda"):
        raise SuiteError(f"{where}: device must be auto, cpu or cuda, got {options['device']!r}")
    if options["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise SuiteError(
            f"{where}: dtype must be auto, float32, bfloat16 or float16, got {options['dtype']!r}"
        )
    if not isinstance(options["backbone"], bool):
        raise SuiteError(f"{where}: backbone must be true or false, got {options['backbone']!r}")
    if options["data_root"] is not None:
        root = Path(os.path.expandvars(str(options["data_root"]))).expanduser()
        if not root.is_dir():
            raise SuiteError(
                f"{where}: data_root {options['data_root']} is not a folder (the local zero-shot sets; "
                "relative paths are from the working directory)"
            )
        options["data_root"] = str(root)
    return options


def parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SuiteError(f"--set expects KEY=VALUE (YAML value), got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def load_suite(
    path: str | Path,
    data_root: str | None = None,
    output_dir: str | None = None,
    parallel: int | None = None,
    gpus: str | int | list[int | str] | None = None,
    variants: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    cli_set: dict | None = None,
) -> Suite:
    """Read a suite file and check everything that can be checked without training (raises SuiteError).

    The keyword arguments are the command line's overrides; `variants`, `tasks`, `seeds` select a subset.
    """
    from apt_lightning.data.tasks import GLUE_TASKS, INSTRUCTION_TASK, get_task

    path = Path(path)
    raw = load_yaml(path, "suite file")
    if not isinstance(raw, dict):
        raise SuiteError(f"suite file {path} must be a mapping")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise SuiteError(f"suite {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SUITE_KEYS)}")
    here = path.resolve().parent
    name = str(raw.get("name") or path.stem)
    if "base" not in raw:
        raise SuiteError(f"suite {path}: `base` (the apt-fit recipe the overlays change) is required")
    base_path = (here / raw["base"]).resolve()
    if not base_path.is_file():
        raise SuiteError(f"suite {path}: base config {base_path} not found")
    overlay_dir = here.parent / "ablations"
    if raw.get("overlay_dir"):
        overlay_dir = (here / raw["overlay_dir"]).resolve()
    default_seeds = raw.get("seeds")

    # tasks
    task_raw = _mapping(raw.get("tasks"), f"suite {path}: tasks")
    if not task_raw:
        raise SuiteError(
            f'suite {path}: no tasks; add e.g. `tasks: {{sst2: {{data_dir: "{{data_root}}/sst2"}}}}`'
        )
    root = data_root if data_root is not None else raw.get("data_root")
    task_specs: dict[str, TaskSpec] = {}
    for key, spec in task_raw.items():
        spec = _mapping(spec, f"suite {path}: tasks.{key}")
        bad = set(spec) - _TASK_KEYS
        if bad:
            raise SuiteError(
                f"suite {path}: tasks.{key}: unknown keys {sorted(bad)}; allowed: {sorted(_TASK_KEYS)}"
            )
        glue = str(spec.get("task", key))
        try:
            get_task(glue)
        except ValueError:
            raise SuiteError(
                f"suite {path}: unknown task {glue!r} (tasks.{key}); "
                f"known: {sorted([*GLUE_TASKS, INSTRUCTION_TASK.name])}"
            ) from None
        data_dir = spec.get("data_dir")
        if data_dir is not None:
            data_dir = str(data_dir)
            if "{data_root}" in data_dir:
                if root is None:
                    raise SuiteError(
                        f"suite {path}: tasks.{key}.data_dir uses {{data_root}} but no "
                        "data_root is set (suite `data_root:` or --data-root)"
                    )
                data_dir = data_dir.replace("{data_root}", str(root).rstrip("/"))
            if not Path(os.path.expandvars(data_dir)).expanduser().is_dir():
                raise SuiteError(
                    f"suite {path}: tasks.{key}.data_dir {data_dir} is not a folder "
                    "(relative paths are from the working directory; see --data-root)"
                )
        task_specs[key] = TaskSpec(
            key, glue, str(spec.get("label", key)), data_dir, _mapping(spec.get("set"), f"tasks.{key}.set")
        )
    if tasks:
        missing = [t for t in tasks if t not in task_specs]
        if missing:
            raise SuiteError(f"--tasks {missing}: not in the suite's tasks {sorted(task_specs)}")
        task_specs = {k: v for k, v in task_specs.items() if k in tasks}

    # variants
    var_raw = raw.get("variants")
    if not isinstance(var_raw, list) or not var_raw:
        raise SuiteError(f"suite {path}: `variants` must be a non-empty list of names or mappings")
    specs: list[VariantSpec] = []
    available = sorted(p.stem for p in overlay_dir.glob("*.yaml")) if overlay_dir.is_dir() else []
    for entry in var_raw:
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "name" not in entry:
            raise SuiteError(
                f"suite {path}: a variant must be a name or a mapping with `name`, got {entry!r}"
            )
        bad = set(entry) - _VARIANT_KEYS
        if bad:
            raise SuiteError(
                f"suite {path}: variant {entry['name']}: unknown keys {sorted(bad)}; "
                f"allowed: {sorted(_VARIANT_KEYS)}"
            )
        vname = str(entry["name"])
        if any(v.name == vname for v in specs):
            raise SuiteError(f"suite {path}: variant {vname!r} is listed twice")
        overlay = entry.get("overlay", vname)
        overlay_path = None
        if overlay is not None:
            overlay_path = overlay_dir / f"{overlay}.yaml"
            if not overlay_path.is_file():
                raise SuiteError(
                    f"suite {path}: unknown variant {overlay!r}: no overlay {overlay_path}; "
                    f"available in {overlay_dir}: {available}"
                )
        vbase = (here / entry["base"]).resolve() if entry.get("base") else base_path
        if not vbase.is_file():
            raise SuiteError(f"suite {path}: variant {vname}: base config {vbase} not found")
        vseeds = _as_seeds(entry.get("seeds", default_seeds), f"suite {path}: variant {vname}")
        vtasks = entry.get("tasks") or list(task_raw)
        bad_tasks = [t for t in vtasks if t not in task_raw]
        if bad_tasks:
            raise SuiteError(
                f"suite {path}: variant {vname}: unknown task(s) {bad_tasks}; "
                f"the suite's tasks are {sorted(task_raw)}"
            )
        desc = entry.get("description")
        if desc is None and overlay_path is not None:
            desc = (load_overlay(overlay_path).get("description") or "").strip()
        specs.append(
            VariantSpec(
                vname,
                overlay_path,
                vbase,
                vseeds,
                [t for t in vtasks if t in task_specs],
                _mapping(entry.get("set"), f"variant {vname}: set"),
                desc or "",
            )
        )
    reference = raw.get("reference")
    if reference is not None and not any(v.name == reference for v in specs):
        raise SuiteError(f"suite {path}: reference {reference!r} is not one of the variants")
    evaluation = _evaluation(raw.get("evaluation", False), path)
    zs_reference = (evaluation or {}).get("reference")
    if zs_reference is not None and not any(v.name == zs_reference for v in specs):
        raise SuiteError(
            f"suite {path}: evaluation.reference {zs_reference!r} is not one of the variants (the variant "
            "whose average zero-shot accuracy is 100% in the report; null: none)"
        )
    if variants:
        missing = [v for v in variants if not any(s.name == v for s in specs)]
        if missing:
            raise SuiteError(f"--variants {missing}: not in the suite's variants {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in variants]
    if seeds is not None:
        seeds = _as_seeds(seeds, "--seeds")
        for spec in specs:
            spec.seeds = [s for s in spec.seeds if s in seeds]

    if not any(spec.seeds and spec.tasks for spec in specs):
        raise SuiteError(f"suite {path}: the selection (--variants / --tasks / --seeds) leaves no runs")
    par = parallel if parallel is not None else raw.get("parallel", 1)
    if not isinstance(par, int) or par < 1:
        raise SuiteError(f"suite {path}: parallel must be an integer >= 1, got {par!r}")
    gpu_ids = select_gpus(gpus if gpus is not None else raw.get("gpus"), path)
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SuiteError(f"suite {path}: args must be a list of strings (apt-fit arguments)")
    bench = raw.get("benchmark", {})
    bench = None if bench is False else {**BENCH_DEFAULTS, **_mapping(bench, "benchmark")}
    if bench is not None and set(bench) - set(BENCH_DEFAULTS):
        raise SuiteError(f"suite {path}: benchmark: unknown keys {sorted(set(bench) - set(BENCH_DEFAULTS))}")
    if bench is not None and not isinstance(bench["cuda_graphs"], bool):
        raise SuiteError(
            f"suite {path}: benchmark: cuda_graphs must be true or false, got {bench['cuda_graphs']!r}"
        )
    if bench is not None and bench["cuda_graphs"] and bench["device"] == "cpu":
        raise SuiteError(f"suite {path}: benchmark: cuda_graphs needs device cuda or auto, got device cpu")
    if bench is not None and bench["kv_cache"] not in ("static", "dynamic"):
        raise SuiteError(
            f"suite {path}: benchmark: kv_cache must be static or dynamic, got {bench['kv_cache']!r}"
        )
    eff = raw.get("efficiency", {})
    wandb = raw.get("wandb", False)
    out = Path(output_dir or raw.get("output_dir") or f"runs/ablations/{name}")
    suite = Suite(
        path=path,
        name=name,
        description=str(raw.get("description") or "").strip(),
        output_dir=out,
        data_root=None if root is None else str(root),
        reference=reference,
        parallel=par,
        gpus=gpu_ids,
        timeout_s=raw.get("timeout_s"),
        strict=bool(raw.get("strict", False)),
        keep_checkpoints=bool(raw.get("keep_checkpoints", True)),
        args=list(args),
        set=_mapping(raw.get("set"), "set"),
        variants=specs,
        tasks=task_specs,
        efficiency=None if eff is False else _mapping(eff, "efficiency"),
        benchmark=bench,
        wandb=None if not wandb else ({} if wandb is True else _mapping(wandb, "wandb")),
        cli_set=dict(cli_set or {}),
        evaluation=evaluation,
    )
    plan(suite)  # compose every run's config now: overlay errors surface before anything runs
    return suite
