"""Federated defect classification on real images: the default recipe x epsilon x obfuscation, with timing.

Usage::

    nice .venv/bin/python benchmarks/bench_classification.py [--data CATEGORY_DIR] [--out runs/bench-classification]
        [--epsilons none,8,3,1] [--obfuscations none,average+shuffle+switch_row] [--threads 1] [--tables]
        [--table-models cnn,mobile,large] [--json bench_classification.json]

Each cell is :func:`fedinspect.classification.runner.run_classification` of
:func:`fedinspect.classification.runner.recipe` (the default of ``fedinspect classify``: the non-private
recipe for ``none``, the DP-SGD recipe with ``dp_epsilon`` otherwise), 3 IID clients, on the magnetic-tile
classes of the MTD dataset by default. One input cache serves all cells (features are computed once per
pooling and obfuscation; the first cell of each pays for it: see ``prepare_s``). Writes
``benchmarks/results/bench_classification.json``: per cell accuracy, macro-F1, per-class recall, the epsilon
spent (max over clients), the noise multiplier and the seconds. ``--tables`` also runs the seed's Tables I and
III (:mod:`fedinspect.classification.experiment`) with the same recipes into ``--out/tables``, for
``--table-models``, reusing the cells' features.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

print = functools.partial(print, flush=True)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "mtd" / "magnetic_tile"
ALL_METHODS = "average+shuffle+switch_row"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--epsilons", default="none,8,3,1", help="'none' (no DP) or target epsilons")
    parser.add_argument("--obfuscations", default=f"none,{ALL_METHODS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables", action="store_true", help="also Tables I and III of the seed")
    parser.add_argument("--table-models", default="cnn,mobile,large", help="models of the tables")
    parser.add_argument("--json", default="bench_classification.json",
                        help="file name of the summary under benchmarks/results/ (keeps an earlier run's)")
    args = parser.parse_args()
    if not Path(args.json).name.endswith(".json"):  # checked before the run, not after an hour of it
        parser.error(f"--json must name a .json file, got {args.json!r}")

    import torch

    from fedinspect.classification.runner import InputCache, recipe, run_classification

    torch.set_num_threads(args.threads)
    cache = InputCache()
    cells = []
    started = time.perf_counter()
    for obfuscation in args.obfuscations.split(","):
        for eps in args.epsilons.split(","):
            target = None if eps == "none" else float(eps)
            config = recipe(clients=args.clients, seed=args.seed, obfuscation_key=args.seed, dp_epsilon=target,
                            obfuscate=() if obfuscation == "none" else tuple(obfuscation.split("+")))
            name = f"{obfuscation}-eps{eps}"
            results = run_classification(args.data, args.out / name, config, progress=False, cache=cache,
                                         write_report=False)
            spent = [float(v) for v in results.get("epsilon", {}).values()]
            cell = {
                "recipe": "dp" if target else "default", "obfuscation": obfuscation, "target_epsilon": target,
                "epsilon_max": max(spent) if spent else None, "noise_multiplier": config.train.noise_multiplier
                if target is None else results["privacy"]["noise_multiplier"],
                "accuracy": results["accuracy"], "macro_f1": results["macro_f1"],
                "per_class_recall": {k: v["recall"] for k, v in results["per_class"].items()},
                "prepare_s": results["timing"]["prepare_s"], "train_s": results["timing"]["train_s"],
                "config": results["config"],
            }
            cells.append(cell)
            print(f"{name}: accuracy {cell['accuracy']:.3f}, macro-F1 {cell['macro_f1']:.3f}, eps "
                  f"{cell['epsilon_max']}, prepare {cell['prepare_s']:.0f} s, train {cell['train_s']:.0f} s")
    summary = {"dataset": str(args.data), "clients": args.clients, "seed": args.seed, "threads": args.threads,
               "cpu_count": os.cpu_count(), "cells": cells, "wall_s": time.perf_counter() - started}
    if args.tables:
        from fedinspect.classification.experiment import ExperimentPlan, run_experiment

        plan = ExperimentPlan(models=tuple(args.table_models.split(",")),
                              base=recipe(clients=args.clients, seed=args.seed, obfuscation_key=args.seed),
                              dp_base=recipe(dp=True, clients=args.clients, seed=args.seed,
                                             obfuscation_key=args.seed),
                              noise_multipliers=(0.01, 0.05, 0.1, 0.5, 1.0), target_epsilons=(10.0, 8.0, 3.0, 1.0))
        summary["tables"] = run_experiment(args.data, args.out / "tables", plan, progress=True, cache=cache)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / Path(args.json).name
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
