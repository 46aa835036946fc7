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

``--clients 1`` searches central DP-SGD: one client holds all the training images, and the logical batch grows to
cover them, so every step is a full-batch step as in the recipe. That is what secure aggregation with the noise
shared among the clients (distributed DP) could at best give: the sum of the clients' clipped gradients with one
Gaussian of the central scale. ``--test-top K`` then trains the K best settings at ``--select-epsilon`` on the whole
training part and reports them on the test split, next to their noise-free twins. Writes
``bench_classification_dp_search_clients1.json`` for ``--clients 1``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import time
from pathlib import Path

print = functools.partial(print, flush=True)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "mtd" / "magnetic_tile"
GRID = {"project": (128, 256, 512), "rounds": (10, 20, 40), "lr": (20.0, 80.0), "max_grad_norm": (0.25, 1.0)}


def mean_scores(scored: list[dict]) -> dict[str, float]:
    """Mean accuracy and macro-F1 of several runs (seeds), and the accuracy's standard deviation."""
    import numpy as np

    accuracy = [x["accuracy"] for x in scored]
    return {"accuracy": float(np.mean(accuracy)), "macro_f1": float(np.mean([x["macro_f1"] for x in scored])),
            "accuracy_std": float(np.std(accuracy))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification-dp-search"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--epsilons", default="8,3,1,none",
                        help="target epsilons, comma-separated; 'none': the same clipping without noise")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (validation split and noise), comma-separated")
    parser.add_argument("--select-epsilon", type=float, default=8.0, help="the epsilon the choice is made at")
    parser.add_argument("--clients", type=int, default=3,
                        help="IID clients (1: central DP-SGD on all images, the bound of distributed DP)")
    parser.add_argument("--test-top", type=int, default=0,
                        help="re-run this many of the best settings on the test split, with noise-free twins")
    args = parser.parse_args()
    if args.clients < 1 or args.test_top < 0:
        parser.error(f"--clients must be >= 1 and --test-top >= 0, got {args.clients} and {args.test_top}")

    import torch
    from tqdm.auto import tqdm

    from fedinspect.classification.runner import (
        DP_RECIPE,
        DP_TRAIN,
        InputCache,
        prepare_split,
        recipe,
        run_classification,
    )

    torch.set_num_threads(args.threads)
    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    cache = InputCache()
    cells = []
    started = time.perf_counter()
    # full-batch steps as in the recipe: the logical batch covers the largest client (of the whole training part)
    largest = max(len(c.items) for c in prepare_split(args.data, recipe(dp=True, clients=args.clients)).clients)
    accumulation = max(DP_TRAIN["accumulation_steps"], math.ceil(largest / DP_TRAIN["batch_size"]))

    def run(eps: float | None, setting: dict, seed: int, validation: bool) -> dict:
        train = {"lr": setting["lr"], "max_grad_norm": setting["max_grad_norm"], "accumulation_steps": accumulation}
        if eps is None:
            train["noise_multiplier"] = 0.0
        config = recipe(dp=True, dp_epsilon=eps, seed=seed, split_seed=0, obfuscation_key=0, validation=validation,
                        clients=args.clients, project=setting["project"], rounds=setting["rounds"], train=train)
        return run_classification(args.data, args.out / "run", config, progress=False, cache=cache, write_report=False)

    jobs = list(itertools.product(epsilons, settings, seeds))
    for eps, setting, seed in tqdm(jobs, desc="DP settings"):
        results = run(eps, setting, seed, validation=True)
        cells.append({"epsilon": eps, **setting, "seed": seed, "accuracy": results["accuracy"],
                      "macro_f1": results["macro_f1"], "epsilon_max": max(results["epsilon"].values()),
                      "validation_images": results["split"]["test"]})
    rows = []
    for eps, setting in itertools.product(epsilons, settings):
        mine = [c for c in cells if c["epsilon"] == eps and all(c[k] == v for k, v in setting.items())]
        rows.append({"epsilon": eps, **setting, **mean_scores(mine)})
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
    tested = []
    ranked = sorted(selected, key=lambda r: -r["accuracy"])[:args.test_top]
    for r in ranked:
        setting = {k: r[k] for k in GRID}
        found = {"setting": setting, "validation_accuracy": r["accuracy"]}
        for label, eps in (("private", args.select_epsilon), ("twin", None)):
            found[label] = mean_scores([run(eps, setting, seed, validation=False) for seed in seeds])
        tested.append(found)
        print(f"test split, {setting}: epsilon {args.select_epsilon:g} accuracy {found['private']['accuracy']:.3f} "
              f"(sd {found['private']['accuracy_std']:.3f}), macro-F1 {found['private']['macro_f1']:.3f}; no noise "
              f"{found['twin']['accuracy']:.3f} / {found['twin']['macro_f1']:.3f} (validation {r['accuracy']:.3f})")
    summary = {"dataset": str(args.data), "clients": args.clients, "logical_batch": accumulation
               * DP_TRAIN["batch_size"], "seeds": seeds, "threads": args.threads, "cpu_count": os.cpu_count(),
               "grid": GRID, "rows": rows, "cells": cells, "best": best, "shipped": shipped, "test": tested,
               "wall_s": time.perf_counter() - started}
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    suffix = "" if args.clients == 3 else f"_clients{args.clients}"
    path = results_dir / f"bench_classification_dp_search{suffix}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
