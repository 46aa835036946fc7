"""Benchmark the full fairness study: partitions x strategies x seeds on the `small` synthetic data.

Usage::

    .venv/bin/python benchmarks/bench_study.py [--config studies/fairness_full.toml] [--out runs/study-full]
        [--json-dir benchmarks/results]

Runs (or resumes) the study of ``--config`` into ``--out``, prints its table, the recommendations and
the worst-client comparison against the baseline per partition, and writes a JSON summary (wall time,
cells, table rows, tests) to ``--json-dir``. Rerunning with the same ``--out`` reuses finished cells.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

from fedinspect.study.analysis import STRATEGY_AXIS
from fedinspect.study.config import load_study
from fedinspect.study.runner import run_study

print = functools.partial(print, flush=True)
ROOT = Path(__file__).resolve().parents[1]


def worst_client_lifts(summary: dict, baseline: str) -> list[str]:
    """Per situation, each strategy's worst-client image AUROC minus the baseline's (mean over seeds)."""
    situation = summary["situation"]
    lines = []
    by_level: dict[str, dict[str, float]] = {}
    for row in summary["rows"]:
        level = row["levels"].get(situation, "all") if situation else "all"
        value = row["worst_client_image_auroc"]["mean"]
        by_level.setdefault(level, {})[row["levels"].get(STRATEGY_AXIS, row["label"])] = (
            math.nan if value is None else value)
    for level, values in by_level.items():
        base = values.get(baseline, math.nan)
        lifts = ", ".join(f"{name} {100 * (v - base):+.1f}" for name, v in values.items() if name != baseline)
        lines.append(f"{level}: {baseline} {base:.3f}; lift in points: {lifts}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "studies" / "fairness_full.toml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "study-full"))
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    study = load_study(args.config)
    print(f"study {study.name}: {len(study.cells)} cells ({', '.join(f'{a}: {len(v)}' for a, v in study.axes.items())}"
          f", seeds {study.seeds}) into {args.out}")
    start = time.perf_counter()
    summary = run_study(study, args.out, progress=True)
    wall = time.perf_counter() - start
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print("\n".join(f"- {line}" for line in summary["recommendations"]))
    print("\nworst client image AUROC against the baseline (mean over seeds):")
    lifts = worst_client_lifts(summary, study.baseline)
    print("\n".join(lifts))
    cells = summary["cells"]
    print(f"\n{cells['total']} cells: {cells['ran']} run now, {cells['reused']} done before, {cells['failed']} failed; "
          f"{wall:.0f} s wall time this call")
    out = Path(args.json_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"study-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"config": str(args.config), "out": str(args.out), "wall_s_this_call": wall,
                                "cells": cells, "rows": summary["rows"], "tests": summary["tests"],
                                "lifts": lifts, "recommendations": summary["recommendations"]}, indent=1))
    print(f"JSON in {path}")


if __name__ == "__main__":
    main()
