"""Seed 002's meta-study on the three real categories (issue 17): MAML against random init, CA placement, ablations.

Usage::

    .venv/bin/python benchmarks/bench_meta.py [--data DIR ...] [--out runs/bench_meta] [--json-dir benchmarks/results]
        [--experiments init,placement,ablation] [--shots all] [--image-size 64] [--meta-steps 60] [--epochs 30]
        [--threads 2] [--skip-federated]

Runs ``fedinspect meta-study`` (:func:`fedinspect.meta.study.run_meta_study`; resumable: rerun the same command
after an interruption and finished cells are kept) on ``--data`` (default: the real glass chips, metal plates and
magnetic tiles under ../shared/data/real; skipped, saying so, when none exists) at the study's defaults unless
told otherwise, prints Tables 2-5 and checks issue 17's targets:

- MAML initialisation beats random initialisation in AUROC, and converges in fewer epochs, on a majority of the
  left-out tasks;
- one MAML meta-training over the other tasks finishes in under 30 minutes (the longest of the leave-one-out
  meta-trainings is reported, with the threads it ran on).

When :mod:`fedinspect.meta.federated` is present, also runs its ``compare_federated_centralized`` on the same
real categories (two factories, the magnetic tiles as the new factory adapting from 20 images; issue 17's third
target: within 2 AUROC points of centralized MAML). Writes ``bench_meta.json`` to ``--json-dir``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedinspect.meta.commands import parse_shots
from fedinspect.meta.study import EXPERIMENTS, MetaStudySettings, run_meta_study
from fedinspect.options import split_list

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_DATA = (REAL / "glass" / "glass_chip", REAL / "mpdd" / "metal_plate", REAL / "mtd" / "magnetic_tile")
META_TRAIN_LIMIT_S = 30 * 60


def print_tables(summary: dict[str, Any]) -> None:
    for table in summary["tables"].values():
        print(f"\n{table['title']}")
        widths = [max(len(str(row[i])) for row in [table["header"], *table["rows"]])
                  for i in range(len(table["header"]))]
        for row in [table["header"], *table["rows"]]:
            print("  " + "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                                   for i, (cell, width) in enumerate(zip(row, widths, strict=True))))


def check_targets(summary: dict[str, Any]) -> dict[str, Any]:
    targets = summary["targets"]
    checks: dict[str, Any] = {}
    for shots, block in targets["maml_vs_random"].items():
        print(f"\nMAML vs random ({shots}):")
        for row in block["tasks"]:
            print(f"  {row['task']:<16} AUROC {row['auroc_maml']:.3f} vs {row['auroc_random']:.3f} "
                  f"({'better' if row['auroc_better'] else 'not better'}), epochs {row['epochs_maml']} vs "
                  f"{row['epochs_random']} ({'fewer' if row['fewer_epochs'] else 'not fewer'})")
        checks[f"auroc_majority@{shots}"] = block["auroc_majority"]
        checks[f"epochs_majority@{shots}"] = block["epochs_majority"]
        print(f"  target: higher AUROC on a majority: {block['auroc_better']}/{block['n']} -> "
              f"{'met' if block['auroc_majority'] else 'MISSED'}; fewer epochs on a majority: "
              f"{block['fewer_epochs']}/{block['n']} -> {'met' if block['epochs_majority'] else 'MISSED'}")
    longest = targets["meta_train_s_max"]
    if longest is not None:
        checks["meta_train_under_30_min"] = longest < META_TRAIN_LIMIT_S
        print(f"\nlongest MAML meta-training: {longest:.0f} s on {torch.get_num_threads()} thread(s) -> "
              f"{'met' if longest < META_TRAIN_LIMIT_S else 'MISSED'} (limit {META_TRAIN_LIMIT_S} s); all "
              f"meta-trainings {summary['meta_train_total_s']:.0f} s, all fine-tunings "
              f"{summary['fine_tune_total_s']:.0f} s, study wall {summary['wall_s']:.0f} s")
    return checks


def federated(data: list[Path], out: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """compare_federated_centralized on the real categories, when the federated module exists."""
    if importlib.util.find_spec("fedinspect.meta.federated") is None:
        print("\nfederated meta-learning: skipped (fedinspect.meta.federated is not there)")
        return None
    module = importlib.import_module("fedinspect.meta.federated")
    compare = getattr(module, "compare_federated_centralized", None)
    if compare is None:
        print("\nfederated meta-learning: skipped (no compare_federated_centralized in fedinspect.meta.federated)")
        return None
    from fedinspect.meta.tasks import tasks_from_dirs

    tasks = tasks_from_dirs(data)
    if len(tasks) < 3:
        print(f"\nfederated meta-learning: skipped (needs 3 tasks: two factories and a new one; found {len(tasks)})")
        return None
    target = next((t for t in tasks if t.name == "magnetic_tile"), tasks[-1])
    factories = [[t] for t in tasks if t is not target]
    settings = module.MetaFederationSettings(image_size=args.image_size, seed=args.seed)
    print(f"\nfederated meta-learning: factories {[f[0].name for f in factories]}, new factory {target.name} "
          f"({settings.shots} images)")
    result = compare(factories, target, settings, out=out / "federated", progress=not args.quiet)
    print(f"  AUROC federated - centralized: {result.get('difference_points')} points -> "
          f"{'met' if result.get('within_target') else 'MISSED'} (target: at most 2 points below)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(p) for p in DEFAULT_DATA], help="task folders")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_meta"), help="study folder (resumable)")
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"), help="where bench_meta.json goes")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated experiments")
    parser.add_argument("--shots", default="all", help="all, a number, or both (all,20)")
    defaults = MetaStudySettings()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--meta-steps", type=int, default=defaults.meta_steps)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-federated", action="store_true", help="do not run the federated comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    data = [Path(p) for p in args.data if Path(p).exists()]
    if len(data) < 2:
        print(f"bench_meta: skipped (fewer than two of {args.data} exist)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = MetaStudySettings(experiments=split_list(args.experiments, "--experiments"),
                                 shots=parse_shots(args.shots), image_size=args.image_size,
                                 meta_steps=args.meta_steps, epochs=args.epochs, seed=args.seed)
    print(f"meta-study on {', '.join(p.name for p in data)}: {settings}")
    out = Path(args.out)
    started = time.perf_counter()
    summary = run_meta_study(data, out, settings, progress=not args.quiet)
    print_tables(summary)
    checks = check_targets(summary)
    federation = None if args.skip_federated else federated(data, out, args)
    result = {"settings": summary["settings"], "tasks": summary["tasks"], "tables": summary["tables"],
              "targets": summary["targets"], "checks": checks, "threads": torch.get_num_threads(),
              "meta_train_total_s": summary["meta_train_total_s"], "fine_tune_total_s": summary["fine_tune_total_s"],
              "study_wall_s": summary["wall_s"], "cells_run": summary["cells_run"],
              "cells_reused": summary["cells_reused"], "wall_s": time.perf_counter() - started,
              "federated": federation, "report": str(out / "report.md")}
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_meta.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nbench_meta.json in {json_dir}; report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
