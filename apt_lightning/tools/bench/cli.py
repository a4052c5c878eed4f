"""`apt-bench`: inference throughput, latency and peak memory of a pruned model against its dense form.

The pruned model comes from an exported folder (`--model-dir`), a training checkpoint (`--checkpoint`,
adapters merged and pruned blocks removed), or an architecture pruned here to a target sparsity by the
project's own block search (`--backbone`, `--preset`, `--config-json` with `--sparsity`): budget
`(1 - S)` of the full APT count, scores from a data-free scorer, `select_blocks`, hard masks, compaction.
The dense reference is the same architecture, uncompacted. Inputs are random token ids of `--seq-len`
with a full attention mask, run under `torch.inference_mode`.

A causal LM (`--model-kind causal-lm`, detected from the model class or the config's `architectures`)
is timed generating instead: prefill of `--prompt-len` tokens and `--new-tokens` greedy decode steps
through a KV cache (`decoder`).

How it measures: `apt_lightning.tools.bench.protocol` (encoders), `decoder` (causal LMs); the table:
`reporting`; the models: `models`, and where they come from: `sources`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from apt_lightning.argtypes import positive_int
from apt_lightning.files import write_text_atomic
from apt_lightning.fusion import FUSIONS, fuse_for_inference
from apt_lightning.pruning import DATA_FREE_SCORERS as SCORERS
from apt_lightning.structure import max_positions
from apt_lightning.tools.bench.decoder import KV_CACHES, measure_decoders
from apt_lightning.tools.bench.models import PRESETS, describe, is_causal_lm, warn_unaligned
from apt_lightning.tools.bench.protocol import _MIN_BLOCK, DTYPES, measure_all
from apt_lightning.tools.bench.reporting import markdown_table
from apt_lightning.tools.bench.sources import load_models, source_config

DEVICES = ("auto", "cpu", "cuda")
MODEL_KINDS = ("auto", "classifier", "causal-lm")
_ENCODER_DEFAULTS = {"batch_sizes": [128], "seq_len": 128}
_DECODER_DEFAULTS = {"batch_sizes": [1, 8, 32], "prompt_len": [128], "new_tokens": 128, "kv_cache": "static"}
_CPU_DEFAULTS = (2, 5, 0, 0.0)  # warmup, repeats, block passes, block seconds
# blocks of ~0.25 s: long enough for a GPU's clocks to settle at the level each model sustains (docs/bench.md)
_CUDA_DEFAULTS = (10, 30, 0, 0.25)


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) (the fraction removed), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apt-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model (choose one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="folder written by apt-export / export_pruned")
    src.add_argument("--checkpoint", help="Lightning checkpoint of apt-fit (merged and compacted here)")
    src.add_argument("--backbone", help="hub id, local folder or 'minilm-l6', pruned here to --sparsity")
    src.add_argument("--preset", choices=PRESETS, help="built-in config (random weights), pruned here")
    src.add_argument("--config-json", help="a transformers config.json (random weights), pruned here")
    prune = p.add_argument_group("pruning (with --backbone / --preset / --config-json)")
    prune.add_argument("--sparsity", type=_sparsity, nargs="+", help="fractions of the APT count to remove")
    prune.add_argument("--scorer", choices=SCORERS, default="magnitude", help="data-free block scorer")
    prune.add_argument("--multiple-of", type=positive_int, default=1, help="round kept widths to a multiple")
    prune.add_argument(
        "--even-kv-groups",
        action="store_true",
        help="grouped-query attention: keep as many query heads in every key/value group a layer keeps",
    )
    prune.add_argument(
        "--random-weights", action="store_true", help="--backbone: its architecture with random weights"
    )
    prune.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (the search's choices depend on them)"
    )
    p.add_argument(
        "--model-kind",
        choices=MODEL_KINDS,
        default="auto",
        help="causal-lm: time generation (prefill + greedy decode with a KV cache); auto: a causal LM when "
        "the model's class or its config's architectures say ...ForCausalLM (presets: classifier)",
    )
    m = p.add_argument_group("measurement")
    m.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=None,
        help=f"default {_ENCODER_DEFAULTS['batch_sizes']}; causal LMs {_DECODER_DEFAULTS['batch_sizes']}",
    )
    m.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help=f"default {_ENCODER_DEFAULTS['seq_len']} (encoders)",
    )
    g = p.add_argument_group("generation (causal LMs)")
    g.add_argument(
        "--prompt-len",
        type=positive_int,
        nargs="+",
        default=None,
        help=f"prompt lengths prefilled (default {_DECODER_DEFAULTS['prompt_len']})",
    )
    g.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help=f"greedy decode steps timed after the prefill (default {_DECODER_DEFAULTS['new_tokens']})",
    )
    g.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default=None,
        help="static: preallocated StaticCache (the default; needed by --cuda-graphs); dynamic: "
        "generate's default DynamicCache, grown by concatenation",
    )
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 need CUDA")
    m.add_argument("--device", choices=DEVICES, default="auto")
    m.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed passes (default {_CPU_DEFAULTS[0]} on CPU, {_CUDA_DEFAULTS[0]} on CUDA)",
    )
    m.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed passes (default {_CPU_DEFAULTS[1]} on CPU, {_CUDA_DEFAULTS[1]} on CUDA)",
    )
    sized = m.add_mutually_exclusive_group()
    sized.add_argument(
        "--block",
        type=int,
        default=None,
        help="passes per back-to-back block timed for throughput, one block per model and round; 0: "
        "throughput from the single passes (the CPU default)",
    )
    sized.add_argument(
        "--block-seconds",
        type=float,
        default=None,
        help="size each model's blocks to about this many seconds instead (the CUDA default: "
        f"{_CUDA_DEFAULTS[3]}, so the clocks settle at each model's own level; at least {_MIN_BLOCK} passes)",
    )
    m.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: models take turns pass by pass (fair under background load); "
        "sequential: each model's timed passes back to back",
    )
    m.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    m.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time replays of a captured CUDA graph per model (GPU work without Python dispatch)",
    )
    m.add_argument(
        "--compile",
        action="store_true",
        help="time each model's TorchInductor-compiled forward (fused per-token work; compiled in warm-up)",
    )
    m.add_argument(
        "--fuse",
        nargs="+",
        choices=FUSIONS,
        default=[],
        help="inference fusions applied to every model, dense included (BERT-like encoders): qkv = one "
        "Q/K/V matrix product per layer; gelu = GELU in the FFN product's cuBLASLt epilogue (tanh "
        "approximation on CUDA)",
    )
    m.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="write results as JSON here, and a Markdown table next to it (.md)")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Everything that can be wrong with the arguments, before any model is built. Returns the device."""
    prunes_here = args.backbone or args.preset or args.config_json
    if prunes_here and not args.sparsity:
        parser.error("--sparsity is required with --backbone, --preset or --config-json (e.g. 0.6)")
    if not prunes_here and (
        args.sparsity or args.random_weights or args.multiple_of != 1 or args.even_kv_groups
    ):
        parser.error(
            "--sparsity / --multiple-of / --even-kv-groups / --random-weights apply to --backbone, "
            "--preset or --config-json; a --model-dir or --checkpoint model is already pruned"
        )
    if args.random_weights and not args.backbone:
        parser.error("--random-weights goes with --backbone (--preset and --config-json are random already)")
    paths = (
        ("--model-dir", args.model_dir, "dir"),
        ("--checkpoint", args.checkpoint, "file"),
        ("--config-json", args.config_json, "any"),
    )
    for flag, path, want in paths:
        if path is None:
            continue
        p = Path(path)
        ok = p.is_dir() if want == "dir" else p.is_file() if want == "file" else p.exists()
        if not ok:
            parser.error(f"{flag} {path}: {'folder' if want == 'dir' else 'file'} not found")
    if args.out and Path(args.out).suffix == ".md":
        parser.error(f"--out {args.out}: give the JSON path; the Markdown table is written next to it as .md")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.block is not None and args.block < 0:
        parser.error(f"--block must be >= 0 (0: no blocks), got {args.block}")
    if args.block_seconds is not None and not args.block_seconds > 0:
        parser.error(f"--block-seconds must be > 0, got {args.block_seconds}")
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        parser.error(
            "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    device = args.device if args.device != "auto" else ("cuda" if has_cuda else "cpu")
    if args.cuda_graphs and device != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device; the chosen device is {device}")
    if args.cuda_graphs and args.attn == "eager":
        parser.error("--cuda-graphs needs --attn sdpa (eager attention builds its mask on the host)")
    if args.dtype != "fp32" and device == "cpu":
        why = "this machine has no CUDA device" if not has_cuda else "the chosen device is the CPU"
        parser.error(f"--dtype {args.dtype} needs a CUDA device ({why}); allowed on CPU: fp32")
    return device


def _declared_kind(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """causal-lm or classifier, from --model-kind or what the source says before anything is loaded: an
    export's model class, a config's `architectures`; presets are classifiers unless told. None: a
    checkpoint's kind is known once it is loaded."""
    if args.model_kind != "auto":
        return args.model_kind
    if args.model_dir:
        from apt_lightning.export import SIDECAR

        try:
            model_class = json.loads((Path(args.model_dir) / SIDECAR).read_text()).get("model_class", "")
        except (OSError, ValueError, AttributeError):
            return None  # load_pruned names what is wrong with the folder
        return "causal-lm" if str(model_class).endswith("ForCausalLM") else "classifier"
    if args.backbone or args.config_json:
        return "causal-lm" if is_causal_lm(source_config(parser, args)) else "classifier"
    return None if args.checkpoint else "classifier"


def _check_kind(parser: argparse.ArgumentParser, args: argparse.Namespace, kind: str) -> None:
    """The flags that belong to the other kind of model, and the generation defaults."""
    if kind == "causal-lm":
        wrong = [
            flag
            for flag, given in (
                ("--seq-len (use --prompt-len)", args.seq_len is not None),
                ("--block", args.block is not None),
                ("--block-seconds", args.block_seconds is not None),
                ("--compile", args.compile),
                ("--fuse", bool(args.fuse)),
            )
            if given
        ]
        if wrong:
            parser.error(f"{', '.join(wrong)}: not for a causal LM (timed generating, docs/bench.md)")
        for key, value in _DECODER_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.cuda_graphs and args.kv_cache != "static":
            parser.error("--cuda-graphs needs --kv-cache static (a dynamic cache changes shape every step)")
        return
    wrong = [
        flag
        for flag in ("--prompt-len", "--new-tokens", "--kv-cache")
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    if wrong:
        parser.error(
            f"{', '.join(wrong)}: for causal LMs; this model is a classifier (--model-kind causal-lm "
            "times a decoder generating)"
        )
    for key, value in _ENCODER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_cli(argv: list[str] | None = None) -> dict:
    """`apt-bench` as a function: parse `argv`, measure, print, write; returns the report (the JSON)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _check_args(parser, args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(parser, args, device, argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, the ablation report)


def _main(
    parser: argparse.ArgumentParser, args: argparse.Namespace, device: str, argv: list[str] | None
) -> dict:
    warmup_d, repeats_d, block_d, seconds_d = _CUDA_DEFAULTS if device == "cuda" else _CPU_DEFAULTS
    warmup = warmup_d if args.warmup is None else args.warmup
    repeats = repeats_d if args.repeats is None else args.repeats
    kind = _declared_kind(parser, args)
    if kind is not None:
        _check_kind(parser, args, kind)  # before any model is built
    models, records = load_models(parser, args, kind)
    if kind is None:
        kind = "causal-lm" if is_causal_lm(list(models.values())[-1]) else "classifier"
        _check_kind(parser, args, kind)
    if args.block is None and args.block_seconds is None:
        block, block_seconds = (block_d, seconds_d) if kind == "classifier" else (0, 0.0)
    else:
        block, block_seconds = args.block or 0, args.block_seconds or 0.0
    limit = min(max_positions(m.config) for m in models.values())
    if kind == "causal-lm" and max(args.prompt_len) + args.new_tokens > limit:
        parser.error(
            f"--prompt-len {max(args.prompt_len)} + --new-tokens {args.new_tokens} exceeds the model's "
            f"{limit} positions"
        )
    if kind == "classifier" and args.seq_len > limit:
        parser.error(f"--seq-len {args.seq_len} exceeds the model's {limit} position embeddings")
    infos = {name: {**describe(model), "pruning": records.get(name)} for name, model in models.items()}
    if device == "cuda":
        warn_unaligned(infos, sys.stderr)
    if args.fuse:  # after describe: the fused modules no longer have the layout the structure reads
        try:
            for model in models.values():
                fuse_for_inference(model, args.fuse)
        except ValueError as err:
            parser.error(f"--fuse {' '.join(args.fuse)}: {err}")
    if kind == "causal-lm":
        results = measure_decoders(
            models,
            args.batch_sizes,
            args.prompt_len,
            args.new_tokens,
            args.dtype,
            device,
            warmup,
            repeats,
            interleave=args.order == "interleaved",
            kv_cache=args.kv_cache,
            cuda_graphs=args.cuda_graphs,
        )
    else:
        results = measure_all(
            models,
            args.batch_sizes,
            args.seq_len,
            args.dtype,
            device,
            warmup,
            repeats,
            interleave=args.order == "interleaved",
            cuda_graphs=args.cuda_graphs,
            torch_compile=args.compile,
            block=block,
            block_seconds=block_seconds,
        )
    import transformers

    name = (
        torch.cuda.get_device_name(device)
        if device == "cuda"
        else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    report = {
        "tool": "apt-bench",
        "command": "apt-bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "env": {
            "device": device,
            "device_name": name,
            "dtype": args.dtype,
            "model_kind": kind,
            "seq_len": args.seq_len,
            "prompt_lens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "kv_cache": args.kv_cache,
            "warmup": warmup,
            "repeats": repeats,
            "block": block,
            "block_seconds": block_seconds,
            "order": args.order,
            "attn": args.attn,
            "cuda_graphs": args.cuda_graphs,
            "torch_compile": args.compile,
            "fusions": args.fuse,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "source": {
            k: getattr(args, k)
            for k in (
                "model_dir",
                "checkpoint",
                "backbone",
                "preset",
                "config_json",
                "scorer",
                "multiple_of",
                "even_kv_groups",
                "random_weights",
                "seed",
            )
        },
        "models": infos,
        "results": results,
    }
    table = markdown_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, json.dumps(report, indent=1))
        write_text_atomic(out.with_suffix(".md"), table)
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: a returned value would become the exit status)."""
    run_cli(argv)
