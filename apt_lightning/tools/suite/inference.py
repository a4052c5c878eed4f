"""The inference phase of a suite: every finished run's exported model (adapters merged, pruned blocks
removed) against the dense model of the same backbone and task, one model at a time after all training.

The numbers come from apt-bench's measurement protocol: each round is one call of
`apt_lightning.tools.bench.benchmark` (its `Runner`: warm-up, then timed single passes); `rounds` rounds
run back to back and the round with the median throughput is kept, beside every round's throughput.

A causal-LM run (its trained model is a ``...ForCausalLM``) is exported first (``<run>/export/``,
`tools.suite.exports`), and that export is timed generating by `apt_lightning.tools.bench.
generation_benchmark` (prefill of `prompt_len` tokens, `new_tokens` greedy decode steps through the KV
cache; the median round by decode tokens/s) against the dense model of the same architecture.

`apt-ablate bench --from-structure` times, in place of each export, the run's architecture with random
weights cut to the final widths its ``logs/pruning.json`` records (`tools.suite.structures`; the dense
architecture for a run that never pruned): timing depends only on the shapes, so no checkpoint is needed.
Its inference.json says so (``"source": "structure:logs/pruning.json"``, ``"weights": "random"``).

Numbers taken while a training process shares the device are refused, not flagged: before each run, and
again before anything is written, the suite's run locks are checked (`tools.suite.lock.training_on`: on
the CPU any live training worker of the suite, on a GPU those that may use it). While there is one, the
run is not measured (listed under ``busy``, with a ``[bench]`` line naming the training runs) and no
dense measurement is cached; ``apt-ablate bench`` measures it once they have finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apt_lightning.files import write_json_atomic
from apt_lightning.tools.suite.gpus import device_and_dtype
from apt_lightning.tools.suite.layout import BENCH_FAILED, DENSE_DIR, DONE, FINAL_CKPT, INFERENCE, read_json
from apt_lightning.tools.suite.lock import training_on
from apt_lightning.tools.suite.spec import RunSpec, Suite


def load_benchmark() -> Callable[..., dict] | None:
    """apt-bench's `benchmark` (`apt_lightning.tools.bench`), or None when it is not available (tests
    replace this seam)."""
    try:
        from apt_lightning.tools.bench import benchmark
    except ImportError:
        return None
    return benchmark


def load_generation_benchmark() -> Callable[..., dict] | None:
    """apt-bench's `generation_benchmark` (causal LMs), or None when it is not available (a seam too)."""
    try:
        from apt_lightning.tools.bench import generation_benchmark
    except ImportError:
        return None
    return generation_benchmark


def bench_settings(options: dict) -> tuple[str, str]:
    """(dtype, device) for apt-bench's `benchmark`: `auto` is bf16 on CUDA, fp32 on the CPU."""
    device, dtype = device_and_dtype(options)
    return dtype, device


def _measure(bench: Callable[..., dict], model: Any, options: dict, causal_lm: bool = False) -> dict:
    """`rounds` back-to-back benchmarks; the round with the median throughput (decode tokens/s for a
    causal LM), plus every round's number (small models at batch 128 are launch-bound on a GPU: single
    rounds jitter by tens of percent)."""
    dtype, device = bench_settings(options)
    params = sum(p.numel() for p in model.parameters())
    shape = (
        {
            "prompt_len": options["prompt_len"],
            "new_tokens": options["new_tokens"],
            "kv_cache": options["kv_cache"],
        }
        if causal_lm
        else {"seq_len": options["seq_len"]}
    )
    results = []
    for _ in range(max(1, int(options.get("rounds", 1)))):
        results.append(
            dict(
                bench(
                    model,
                    batch_size=options["batch_size"],
                    **shape,
                    dtype=dtype,
                    device=device,
                    warmup=options["warmup"],
                    repeats=options["repeats"],
                    cuda_graphs=options["cuda_graphs"],
                )
            )
        )
    keys = ("decode_tokens_per_s", "prefill_tokens_per_s") if causal_lm else ("samples_per_s",)
    results.sort(key=lambda r: r.get(keys[0]) or 0.0)
    result = results[len(results) // 2]
    for timings in ("latency_ms_all", "prefill_ms_all", "decode_ms_all"):
        result.pop(timings, None)
    for key in keys:
        result[f"rounds_{key}"] = [r.get(key) for r in results]
    result.setdefault("params", params)
    return result


def _dense_result(
    suite: Suite, bench: Callable[..., dict], hparams: dict, options: dict, like: Any = None
) -> tuple[dict, Path | None]:
    """The unpruned model of the same backbone and task, measured once per suite, and the cache file to
    write it to (None: it came from there; the caller writes it once the number is known to be clean).
    `like`: a causal LM, whose dense form (its architecture at full width) is timed generating."""
    key = {"backbone": hparams.get("backbone"), "task": hparams.get("task"), "settings": options}
    if like is not None:
        key["kind"] = "causal-lm"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = suite.output_dir / DENSE_DIR / f"{hparams.get('task')}_{digest}.json"
    cached = read_json(path)
    if cached is not None:
        return cached, None
    if like is not None:
        from apt_lightning.tools.bench.models import dense_like

        return {**key, "result": _measure(bench, dense_like(like).eval(), options, causal_lm=True)}, path
    from apt_lightning.export import compact_for_inference
    from apt_lightning.module import APTModule

    dense_args = {k: v for k, v in hparams.items() if k in inspect.signature(APTModule).parameters}
    dense_args.update(adapters=None, pretrained=False)  # timing does not depend on the weights
    model = compact_for_inference(APTModule(**dense_args).student).eval()
    return {**key, "result": _measure(bench, model, options)}, path


def _busy(run_id: str, busy: list[dict], device: str, when: str) -> str:
    names = ", ".join(f"{b.get('run') or b['run_dir']} (pid {b.get('worker')})" for b in busy[:4])
    more = f" and {len(busy) - 4} more" if len(busy) > 4 else ""
    return (
        f"[bench] {run_id}: not measured: {len(busy)} training process(es) of this suite share {device} "
        f"{when}: {names}{more}; numbers now would be disturbed. Run `apt-ablate bench` when they finish"
    )


def load_final_module(ckpt: Path) -> Any:
    """`export.module_from_checkpoint` on a checkpoint written through LightningCLI.

    Such checkpoints carry `_class_path` / `_instantiator` in their hyperparameters and `adapters` as a
    plain mapping. If `module_from_checkpoint` trips over either, a cleaned copy (next to the checkpoint,
    deleted afterwards) is loaded instead.
    """
    import tempfile

    import torch

    from apt_lightning.adapters import AdapterConfig
    from apt_lightning.export import module_from_checkpoint

    try:
        return module_from_checkpoint(ckpt)
    except (TypeError, AttributeError) as err:
        first = err
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = state.get("hyper_parameters", {})
    clean = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if isinstance(clean.get("adapters"), dict):
        clean["adapters"] = AdapterConfig(**clean["adapters"])
    if clean.keys() == hparams.keys() and clean.get("adapters") is hparams.get("adapters"):
        raise first
    state["hyper_parameters"] = clean
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as tmp:
        torch.save(state, Path(tmp) / "clean.ckpt")
        del state
        return module_from_checkpoint(Path(tmp) / "clean.ckpt")


def _trained_model(run_dir: Path) -> tuple[Any, dict]:
    """The model a finished run's benchmark times and its module's hyperparameters: a causal LM's export
    (``<run>/export/``, written from ``final.ckpt`` on first use), a classifier's compacted checkpoint."""
    from apt_lightning.export import compact_for_inference, load_pruned
    from apt_lightning.tools.bench.models import is_causal_lm
    from apt_lightning.tools.suite.exports import export_causal_lm

    module = load_final_module(run_dir / FINAL_CKPT)
    hparams = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    if is_causal_lm(module.student):
        return load_pruned(export_causal_lm(run_dir, module)), hparams
    return compact_for_inference(module.student).eval(), hparams


def _measured_on_export(run_dir: Path) -> bool:
    """Whether the run's inference.json holds numbers of its real export (no ``source``: the normal path)."""
    existing = read_json(run_dir / INFERENCE)
    return existing is not None and "source" not in existing


def bench_runs(
    suite: Suite,
    runs: list[RunSpec],
    force: bool = False,
    log: Callable[[str], None] = print,
    from_structure: bool = False,
) -> dict:
    """Measure the exported model of every finished run against the dense model, one at a time.

    `from_structure`: time each run's architecture with random weights at the final widths its
    ``logs/pruning.json`` records (`tools.suite.structures`) instead of its export; no checkpoint needed,
    inference.json says so (``source``)."""
    result: dict[str, list[str]] = {"done": [], "failed": [], "skipped": [], "busy": []}
    if suite.benchmark is None:
        return result
    bench = load_benchmark()
    if bench is None:
        log("[bench] apt_lightning.tools.bench is not available: inference efficiency not measured")
        return result
    import torch
    import transformers

    from apt_lightning.tools.bench.models import is_causal_lm
    from apt_lightning.tools.suite.structures import structure_model

    transformers.logging.set_verbosity_error()  # rebuilding each model reports the fresh head; noise here
    if force:
        for cached in (suite.output_dir / DENSE_DIR).glob("*.json"):
            cached.unlink()  # measure the dense models again too, under the same conditions
    device = bench_settings(suite.benchmark)[1]
    for run in runs:
        ckpt = run.run_dir / FINAL_CKPT
        if not (run.run_dir / DONE).is_file() or ((run.run_dir / INFERENCE).is_file() and not force):
            result["skipped"].append(run.run_id)
            continue
        if from_structure and _measured_on_export(run.run_dir):
            log(
                f"[bench] {run.run_id}: {INFERENCE} was measured on the trained export; --from-structure "
                "keeps it (delete the file to time the recorded structure instead)"
            )
            result["skipped"].append(run.run_id)
            continue
        if not from_structure and not ckpt.is_file():
            log(f"[bench] {run.run_id}: no {FINAL_CKPT} (deleted?); skipped")
            result["skipped"].append(run.run_id)
            continue
        if busy := training_on(suite.output_dir, device):
            log(_busy(run.run_id, busy, device, "now"))
            result["busy"].append(run.run_id)
            continue
        try:
            source = None
            if from_structure:
                model, hparams, source = structure_model(run.run_dir)
            else:
                model, hparams = _trained_model(run.run_dir)
            causal = is_causal_lm(model)
            kind = "causal-lm" if causal else "classifier"
            timer = load_generation_benchmark() if causal else bench
            if timer is None:
                raise RuntimeError("apt_lightning.tools.bench.generation_benchmark is not available")
            measured = _measure(timer, model, suite.benchmark, causal_lm=causal)
            like = model if causal else None  # a classifier's dense model is built from its hparams
            del model
            dense, dense_cache = _dense_result(suite, timer, hparams, suite.benchmark, like=like)
            del like
            if busy := training_on(suite.output_dir, device):  # one started while we measured
                log(_busy(run.run_id, busy, device, "since the measurement began"))
                result["busy"].append(run.run_id)
                continue
            if dense_cache is not None:
                write_json_atomic(dense_cache, dense)
            record = {
                "kind": kind,
                "model": measured,
                "dense": dense["result"],
                "settings": suite.benchmark,
                "dtype": bench_settings(suite.benchmark)[0],
                "device": bench_settings(suite.benchmark)[1],
                "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            }
            if source is not None:  # random weights at the recorded widths, not the trained export
                record.update(source=source, weights="random")
            write_json_atomic(run.run_dir / INFERENCE, record)
            (run.run_dir / BENCH_FAILED).unlink(missing_ok=True)
            result["done"].append(run.run_id)
            key, unit = (
                ("decode_tokens_per_s", "decode tokens/s")
                if kind == "causal-lm"
                else ("samples_per_s", "samples/s")
            )
            log(
                f"[bench] {run.run_id}: {measured.get(key, float('nan')):.1f} {unit} "
                f"(dense {dense['result'].get(key, float('nan')):.1f})" + (f" [{source}]" if source else "")
            )
            if not from_structure and not suite.keep_checkpoints:
                ckpt.unlink()
        except Exception as err:  # noqa: BLE001 - one broken checkpoint must not stop the others
            result["failed"].append(run.run_id)
            write_json_atomic(run.run_dir / BENCH_FAILED, {"error": f"{type(err).__name__}: {err}"})
            log(f"[bench] {run.run_id} FAILED: {type(err).__name__}: {err}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result
