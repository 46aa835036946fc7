"""The search that chose the DP recipe of ``fedinspect classify``, on a validation split (the test split unread).

Usage::

    nice .venv/bin/python benchmarks/bench_classification_dp_search.py [--data CATEGORY_DIR]
        [--epsilons 8,3,1,none] [--seeds 0,1,2] [--select-epsilon 8] [--threads 1]

Every cell is :func:`fedinspect.classification.runner.run_classification` of the DP recipe
(:func:`~fedinspect.classification.runner.recipe` with ``dp_epsilon``) with ``validation=True``: trained on
80 % of the training images of ``bench_classification.py``'s split (``split_seed`` 0), dealt to 3 IID clients,
and evaluated on the other 20 %: its test split is never read. The grid: projection (``project`` 128, 256, 512) x
training rounds (10, 20, 40; 5 full-batch steps each) x lr (20, 80) x clipping (0.25, 1). Epsilon ``none`` runs
each setting with the same clipping and no noise (noise multiplier 0): what the noise costs, setting by setting.
Each seed draws another validation split and other noise; the features of each image are computed once (8 views,
about 8 min on one thread) and shared by all cells. Prints the mean validation accuracy and macro-F1 of each
setting, the best at ``--select-epsilon``, and whether it is the shipped recipe; writes
``benchmarks/results/bench_classification_dp_search.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time
from pathlib import Path

print = functools.partial(print, flush=True)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "mtd" / "magnetic_tile"
GRID = {"project": (128, 256, 512), "rounds": (10, 20, 40), "lr": (20.0, 80.0), "max_grad_norm": (0.25, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification-dp-search"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--epsilons", default="8,3,1,none",
                        help="target epsilons, comma-separated; 'none': the same clipping without noise")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (validation split and noise), comma-separated")
    parser.add_argument("--select-epsilon", type=float, default=8.0, help="the epsilon the choice is made at")
    args = parser.parse_args()

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from fedinspect.classification.runner import DP_RECIPE, DP_TRAIN, InputCache, recipe, run_classification

    torch.set_num_threads(args.threads)
    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    cache = InputCache()
    cells = []
    started = time.perf_counter()
    jobs = list(itertools.product(epsilons, settings, seeds))
    for eps, setting, seed in tqdm(jobs, desc="DP settings"):
        train = {"lr": setting["lr"], "max_grad_norm": setting["max_grad_norm"]}
        if eps is None:
            train["noise_multiplier"] = 0.0
        config = recipe(dp=True, dp_epsilon=eps, seed=seed, split_seed=0, obfuscation_key=0, validation=True,
                        project=setting["project"], rounds=setting["rounds"], train=train)
        results = run_classification(args.data, args.out / "run", config, progress=False, cache=cache,
                                     write_report=False)
        cells.append({"epsilon": eps, **setting, "seed": seed, "accuracy": results["accuracy"],
                      "macro_f1": results["macro_f1"], "epsilon_max": max(results["epsilon"].values()),
                      "validation_images": results["split"]["test"]})
    rows = []
    for eps, setting in itertools.product(epsilons, settings):
        mine = [c for c in cells if c["epsilon"] == eps and all(c[k] == v for k, v in setting.items())]
        rows.append({"epsilon": eps, **setting, "accuracy": float(np.mean([c["accuracy"] for c in mine])),
                     "macro_f1": float(np.mean([c["macro_f1"] for c in mine])),
                     "accuracy_std": float(np.std([c["accuracy"] for c in mine]))})
    print(f"{'eps':>4} {'project':>7} {'rounds':>6} {'lr':>5} {'clip':>5} {'val acc':>8} {'val F1':>7}")
    for r in sorted(rows, key=lambda r: (-(r["epsilon"] or float("inf")), -r["accuracy"])):
        print(f"{r['epsilon'] or 'none':>4} {r['project']:>7} {r['rounds']:>6} {r['lr']:>5g} {r['max_grad_norm']:>5g} "
              f"{r['accuracy']:>8.3f} {r['macro_f1']:>7.3f}")
    selected = [r for r in rows if r["epsilon"] == args.select_epsilon]
    top = max(r["accuracy"] for r in selected)
    # ties are exact when only lr x clip differs: full-batch steps whose gradients are all clipped are the same
    best = [{k: r[k] for k in GRID} for r in selected if r["accuracy"] >= top - 1e-12]
    shipped = {"project": DP_RECIPE["project"], "rounds": DP_RECIPE["rounds"], "lr": DP_TRAIN["lr"],
               "max_grad_norm": DP_TRAIN["max_grad_norm"]}
    print(f"best at epsilon {args.select_epsilon:g} (validation accuracy {top:.3f}): {best}; shipped recipe "
          f"{shipped}: {'among the best' if shipped in best else 'NOT the best'}")
    summary = {"dataset": str(args.data), "seeds": seeds, "threads": args.threads, "cpu_count": os.cpu_count(),
               "grid": GRID, "rows": rows, "cells": cells, "best": best, "shipped": shipped,
               "wall_s": time.perf_counter() - started}
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / "bench_classification_dp_search.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
