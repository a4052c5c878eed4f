"""`apt-eval`: zero-shot multiple-choice accuracy of an exported (pruned) or dense causal LM on the local sets
(ARC, PIQA, BoolQ, OpenBookQA, HellaSwag, WinoGrande, MMLU, TruthfulQA MC1); docs/zero_shot.md."""

from __future__ import annotations

import argparse

import torch

from apt_lightning.argtypes import positive_int
from apt_lightning.evaluation.evaluate import evaluate_zero_shot
from apt_lightning.evaluation.loading import load_causal_lm
from apt_lightning.evaluation.metrics import ZeroShotResults
from apt_lightning.evaluation.report import markdown_table, write_results
from apt_lightning.evaluation.tasks import TASK_NAMES, TASKS, default_data_root, resolve_task_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apt-eval",
        description=__doc__.split(";")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="folder written by apt-export (a pruned *ForCausalLM)")
    src.add_argument("--backbone", help="dense model: hub id, local folder or alias (e.g. smollm2-135m)")
    p.add_argument(
        "--tokenizer", help="take the tokenizer from this backbone / folder instead of the model's"
    )
    p.add_argument(
        "--tasks", default="all", help=f"'all' or a comma-separated list of: {', '.join(TASK_NAMES)}"
    )
    p.add_argument("--data-root", help="folder of the local sets; None: $APT_DATA_ROOT, else ../shared/data")
    p.add_argument("--limit", type=positive_int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=positive_int, default=32, help="(context, choice) pairs per forward")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--markdown", help="write the results table as Markdown here")
    return p


def run_cli(argv: list[str] | None = None) -> ZeroShotResults:
    """`apt-eval` as a function: parse `argv`, evaluate, print the table, write the files; returns the
    results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    data_root = args.data_root or default_data_root()
    try:  # bad task names and missing files fail before the model is loaded
        names = resolve_task_names(args.tasks)
        for name in names:
            TASKS[name].check_files(data_root)
        model, tokenizer = load_causal_lm(args.model_dir, args.backbone, args.tokenizer, args.dtype)
        results = evaluate_zero_shot(
            model,
            tokenizer,
            names,
            data_root,
            limit=args.limit,
            batch_size=args.batch_size,
            device=device,
            model_name=args.model_dir or args.backbone,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(markdown_table(results), end="")
    write_results(results, args.out, args.markdown)
    return results


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: a returned value would become the exit status)."""
    run_cli(argv)


if __name__ == "__main__":
    main()
