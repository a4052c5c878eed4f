"""`suite.json`: the record of a suite that its report reads (descriptions, overlays, the FT reference)."""

from __future__ import annotations

import shlex

from apt_lightning.files import write_json_atomic
from apt_lightning.tools.suite.layout import SUITE_META, read_json
from apt_lightning.tools.suite.spec import RunSpec, Suite


def write_suite_meta(suite: Suite, runs: list[RunSpec], argv: list[str] | None) -> None:
    """`suite.json`: what the report needs to describe the suite without the suite file. `argv` None
    keeps the recorded command (a relabel changes names, not how the runs were made)."""
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": suite.name,
        "description": suite.description,
        "suite_file": str(suite.path),
        "suite_text": suite.path.read_text(),
        "reference": suite.reference,
        "data_root": suite.data_root,
        "command": "apt-ablate " + shlex.join(argv or []),
        "benchmark": suite.benchmark,
        "evaluation": suite.evaluation,
        "variants": [
            {
                "name": v.name,
                "description": v.description,
                "overlay": str(v.overlay_path or ""),
                "overlay_text": v.overlay_path.read_text() if v.overlay_path else "",
                "base": str(v.base_path),
                "seeds": v.seeds,
                "tasks": v.tasks,
                "set": v.set,
            }
            for v in suite.variants
        ],
        "tasks": {
            k: {"task": t.task, "label": t.label, "data_dir": t.data_dir, "set": t.set}
            for k, t in suite.tasks.items()
        },
        "set": suite.set,
        "cli_set": suite.cli_set,
        "args": suite.args,
        "runs": [r.run_id for r in runs],
    }
    old = read_json(suite.output_dir / SUITE_META) or {}
    if argv is None:
        meta["command"] = old.get("command", "")
    names = {s.name for s in suite.variants}
    # variants of earlier invocations (`--variants` subsets) stay described while their runs exist
    kept = [v for v in old.get("variants", []) if v["name"] not in names]
    meta["variants"] += [v for v in kept if (suite.output_dir / v["name"]).is_dir()]
    meta["tasks"] = {**old.get("tasks", {}), **meta["tasks"]}
    write_json_atomic(suite.output_dir / SUITE_META, meta)
