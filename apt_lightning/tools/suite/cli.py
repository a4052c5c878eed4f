"""`apt-ablate`: run an ablation suite (variants x seeds x tasks of `apt-fit` runs), benchmark, report.

Usage::

    apt-ablate run configs/suites/smoke_cpu.yaml [--data-root DIR] [--output DIR] [--parallel N]
               [--variants apt ft] [--tasks sst2] [--seeds 0 1] [--set trainer.max_steps=50]
               [--force] [--strict] [--no-bench] [--no-eval] [--dry-run]
    apt-ablate bench SUITE [...]     # inference benchmarks of finished runs only
    apt-ablate bench SUITE --from-structure   # ... of random weights at the widths in logs/pruning.json
                                              # (no checkpoints or exports needed; no accuracy)
    apt-ablate eval SUITE [...]      # zero-shot accuracy of finished causal-LM runs only (`evaluation:`)
    apt-ablate plan SUITE [...]      # list the runs and their status, run nothing
    apt-ablate report SUITE_DIR      # results.csv, runs.csv, RESULTS.md and plots (tools.report)
    apt-ablate relabel SUITE OLD:NEW [...]   # finished runs to the variant whose config they have
                                             # (after a recipe change; tools.suite.relabel)

The parts: the overlay language (`overlay`), the suite file (`load`, into `spec`), each run's config
(`compose`), the run folder's files (`layout`), GPU selection (`gpus`), the training processes
(`train`), the inference measurements (`inference`), the exported causal LMs (`exports`) and their
zero-shot accuracy (`evaluation`), ``suite.json`` (`meta`), renaming finished runs
(`relabel`); the report lives in `apt_lightning.tools.report`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import yaml

from apt_lightning.files import write_text_atomic
from apt_lightning.tools.suite.compose import plan
from apt_lightning.tools.suite.evaluation import evaluate_runs
from apt_lightning.tools.suite.inference import bench_runs
from apt_lightning.tools.suite.layout import CONFIG, run_status
from apt_lightning.tools.suite.load import load_suite, parse_sets
from apt_lightning.tools.suite.meta import write_suite_meta
from apt_lightning.tools.suite.spec import Suite, SuiteError
from apt_lightning.tools.suite.train import train_runs, train_worker


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite YAML (see configs/suites/)")
    p.add_argument("--data-root", help="replaces the suite's data_root (e.g. .device/data/glue)")
    p.add_argument("--output", help="replaces the suite's output_dir")
    p.add_argument("--parallel", type=int, help="concurrent training processes")
    p.add_argument("--gpus", help="spread the training processes over these GPUs: auto or indices, e.g. 0,1")
    p.add_argument("--variants", nargs="+", help="only these variants")
    p.add_argument("--tasks", nargs="+", help="only these tasks (suite task keys)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds (of each variant's seeds)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key in every run (VALUE is YAML; repeatable)",
    )
    p.add_argument("--force", action="store_true", help="rerun / re-measure finished runs")


def _suite_from_args(args: argparse.Namespace) -> Suite:
    return load_suite(
        args.suite,
        data_root=args.data_root,
        output_dir=args.output,
        parallel=args.parallel,
        gpus=args.gpus,
        variants=args.variants,
        tasks=args.tasks,
        seeds=args.seeds,
        cli_set=parse_sets(args.set),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `apt-ablate` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_train":  # internal: one training process
        return train_worker(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(prog="apt-ablate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train, benchmark and report a suite")
    _add_suite_args(p_run)
    p_run.add_argument("--strict", action="store_true", help="exit 1 if any run failed")
    p_run.add_argument("--no-bench", action="store_true", help="skip the inference benchmarks")
    p_run.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation")
    p_run.add_argument("--no-report", action="store_true", help="skip writing the report")
    p_run.add_argument("--dry-run", action="store_true", help="write the configs and list the runs only")
    p_bench = sub.add_parser("bench", help="inference benchmarks of finished runs")
    _add_suite_args(p_bench)
    p_bench.add_argument(
        "--from-structure",
        action="store_true",
        help="time each run's architecture with random weights pruned to the final structure in its "
        "logs/pruning.json (the dense architecture for runs without pruning) instead of its export: for "
        "runs whose checkpoints and exports are gone. Timing depends only on the shapes; the parameter "
        "count is checked against the log's params_kept. inference.json records the source; no accuracy. "
        "Runs with an inference.json are skipped unless --force",
    )
    p_eval = sub.add_parser("eval", help="zero-shot accuracy of finished causal-LM runs (apt-eval)")
    _add_suite_args(p_eval)
    p_plan = sub.add_parser("plan", help="list the runs and their status")
    _add_suite_args(p_plan)
    p_report = sub.add_parser("report", help="results.csv, RESULTS.md and plots from a suite's output folder")
    p_report.add_argument("suite_dir")
    p_relabel = sub.add_parser(
        "relabel", help="move finished runs to the name of a variant whose config they already have"
    )
    p_relabel.add_argument("suite", help="suite YAML (as it is now)")
    p_relabel.add_argument("renames", nargs="+", metavar="OLD:NEW", help="variant renames, applied together")
    p_relabel.add_argument("--data-root", help="the data_root the runs trained with")
    p_relabel.add_argument("--output", help="replaces the suite's output_dir")
    p_relabel.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="the --set overrides the runs were made with"
    )
    args = parser.parse_args(argv)

    if args.command == "relabel":
        from apt_lightning.tools.suite.relabel import relabel

        pairs = [r.split(":", 1) for r in args.renames]
        if any(len(p) != 2 or not all(p) for p in pairs):
            parser.exit(2, f"apt-ablate: error: renames are OLD:NEW pairs, got {args.renames}\n")
        renames = dict(pairs)
        if len(renames) != len(pairs):
            parser.exit(2, f"apt-ablate: error: a variant is renamed twice: {args.renames}\n")
        try:
            suite = load_suite(
                args.suite, data_root=args.data_root, output_dir=args.output, cli_set=parse_sets(args.set)
            )
            moved = relabel(suite, renames)
        except SuiteError as err:
            parser.exit(2, f"apt-ablate: error: {err}\n")
        write_suite_meta(suite, plan(suite), None)  # keeps the command the runs were made with
        print(f"relabelled {len(moved)} run(s); the report: apt-ablate report {suite.output_dir}")
        return 0

    if args.command == "report":
        from apt_lightning.tools.report import write_report

        if not Path(args.suite_dir).is_dir():
            parser.exit(2, f"apt-ablate: error: suite folder {args.suite_dir} not found\n")
        out = write_report(args.suite_dir)
        print(f"report: {out}")
        return 0
    try:
        suite = _suite_from_args(args)
        runs = plan(suite)
    except SuiteError as err:
        parser.exit(2, f"apt-ablate: error: {err}\n")
    if args.command == "plan" or getattr(args, "dry_run", False):
        for run in runs:
            print(f"{run_status(run.run_dir):8s} {run.run_id:40s} {run.run_dir}")
            if getattr(args, "dry_run", False) and run_status(run.run_dir) not in ("done", "running"):
                # a finished or running run's config.yaml is the record of what it trained with
                run.run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(run.run_dir / CONFIG, yaml.safe_dump(run.config, sort_keys=False))
        print(f"{len(runs)} runs; {sum(run_status(r.run_dir) == 'done' for r in runs)} done")
        return 0
    # `timeout` / a job scheduler stops us with SIGTERM: end the training processes too (the except
    # clause in train_runs), since they run in their own process groups
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    write_suite_meta(suite, runs, ["run" if args.command == "run" else args.command, *argv[1:]])
    failed: list[str] = []
    if args.command == "run":
        t0 = time.time()
        trained = train_runs(suite, runs, force=args.force)
        failed += trained["failed"]
        print(
            f"training: {len(trained['done'])} done, {len(trained['skipped'])} skipped, "
            f"{len(trained['failed'])} failed ({time.time() - t0:.0f} s)"
        )
    if args.command == "bench" or (args.command == "run" and not args.no_bench):
        benched = bench_runs(
            suite, runs, force=args.force, from_structure=getattr(args, "from_structure", False)
        )
        failed += benched["failed"]
        if benched["busy"]:
            print(
                f"{len(benched['busy'])} run(s) not benchmarked while training processes of this suite "
                f"share the device: {', '.join(benched['busy'])}; run `apt-ablate bench` once they finish",
                file=sys.stderr,
            )
    if args.command == "eval" or (args.command == "run" and not args.no_eval):
        if args.command == "eval" and suite.evaluation is None:
            print(
                f"apt-ablate: suite {suite.path} has no `evaluation:` block; nothing to do", file=sys.stderr
            )
        failed += evaluate_runs(suite, runs, force=args.force)["failed"]
    if args.command == "run" and not args.no_report:
        from apt_lightning.tools.report import write_report

        print(f"report: {write_report(suite.output_dir)}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        if getattr(args, "strict", False) or suite.strict:
            return 1
    return 0
