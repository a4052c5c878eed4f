"""Execute notebooks headless (CI: .ci/run) and fail if any cell errors.

    python notebooks/run_notebooks.py [NOTEBOOK ...] [--output-dir DIR] [--timeout SECONDS]

Without arguments: every notebooks/*.ipynb. Each runs in a fresh kernel (the `python3` kernel of this
environment), from the notebooks folder, with `APT_NOTEBOOK_OUT` set to DIR (where the notebooks write their
PNGs and run folders); the executed copies, with outputs, are written to DIR too. `--timeout` bounds each
cell (nbclient) and each whole notebook (checked after it ends). Prints each notebook's wall time."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per notebook (and per cell)")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="apt-notebooks-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ["APT_NOTEBOOK_OUT"] = str(out)
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }.items():
        os.environ.setdefault(key, value)

    failed, total = [], time.perf_counter()
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name=args.kernel,
            resources={"metadata": {"path": str(path.resolve().parent)}},
        )
        t0 = time.perf_counter()
        error = None
        try:
            client.execute()
        except CellExecutionError as err:
            error = str(err)
        except Exception as err:  # a timeout, a dead kernel
            error = f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - t0
        if error is None and seconds > args.timeout:
            error = f"took {seconds:.0f} s, over the {args.timeout} s limit"
        nbformat.write(nb, out / path.name)
        print(f"{path.name}: {'FAILED' if error else 'ok'} in {seconds:.1f} s", flush=True)
        if error:
            failed.append(path.name)
            print(error[-4000:], file=sys.stderr, flush=True)
    print(
        f"{len(paths) - len(failed)} of {len(paths)} notebooks ran in {time.perf_counter() - total:.1f} s; "
        f"executed copies and PNGs in {out}"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
