"""How the cost of DP-SGD at a fixed epsilon shrinks as each client holds more images: a learning curve of the
private and non-private recipes of ``fedinspect classify``.

Usage::

    nice .venv/bin/python benchmarks/bench_classification_dp_scaling.py [--data CATEGORY_DIR]
        [--fractions 0.125,0.25,0.5,1] [--seeds 0,1,2] [--epsilon 8] [--clients 3] [--threads 1]

For each fraction of the training images (``train_fraction``: a stratified, seeded subsample; the test split,
``split_seed`` 0, never changes) and each seed, three runs of
:func:`fedinspect.classification.runner.run_classification`:

- ``plain``: the non-private recipe (:func:`~fedinspect.classification.runner.recipe`);
- ``dp``: the DP recipe at ``--epsilon`` (delta 1e-5, per image of each client), and ``dp twin``: the same
  settings, clipping and steps with noise multiplier 0;
- ``long``, ``long twin``: the same with the setting that trains longest (``--long``: 40 rounds of 5 full-batch
  steps, clipping at 1; the best without noise in ``bench_classification_dp_search.py``).

The gap to the non-private model splits into the model's cost (``plain`` - twin: the DP setting's short, clipped
training) and the noise's cost (twin - DP). Prints accuracy and macro-F1 per fraction (mean over seeds), and for each
DP setting a line fitted to its accuracy against log2(images per client), extrapolated to the images per client at
which it would come within ``--target-gap`` points of the non-private model at the largest fraction (an
extrapolation, stated as one; none where the noise-free twin itself stays below that). Writes
``benchmarks/results/bench_classification_dp_scaling.json`` and the figure ``..._scaling.png``.
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
KINDS = ("plain", "dp twin", "dp", "long twin", "long")
LONG = {"rounds": 40, "max_grad_norm": 1.0}


def log_linear_size(sizes: list[float], accuracies: list[float], target: float) -> dict[str, float] | None:
    """Least-squares fit of ``accuracy = a + b log2(size)`` (``b``: the gain per doubling of the images) and the size
    at which the fitted line reaches ``target`` (None with fewer than two sizes or no gain)."""
    import numpy as np

    if len(sizes) < 2:
        return None
    slope, intercept = np.polyfit(np.log2(sizes), accuracies, 1)
    if slope <= 0:
        return None
    return {"gain_per_doubling": float(slope), "intercept": float(intercept),
            "size_at_target": float(2 ** ((target - intercept) / slope))}


def plot(rows: list[dict], epsilon: float, target: float, path: Path) -> None:
    """Test accuracy of each run kind against the images per client, with the target as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"plain": "no DP (the recipe)", "dp twin": "DP recipe, noise 0", "dp": f"DP recipe, epsilon {epsilon:g}",
              "long twin": "40 rounds, clip 1, noise 0", "long": f"40 rounds, clip 1, epsilon {epsilon:g}"}
    kinds = [k for k in KINDS if k in rows[0]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in zip(kinds, ("ko-", "bs--", "bs-", "r^--", "r^-"), strict=False):
        ax.errorbar([r["images_per_client"] for r in rows], [r[kind]["accuracy"] for r in rows],
                    yerr=[r[kind]["accuracy_std"] for r in rows], fmt=style, capsize=3, label=labels[kind])
    sizes = [r["images_per_client"] for r in rows]
    ax.axhline(target, color="grey", linestyle=":", label=f"target at epsilon {epsilon:g}")
    ax.set(xlabel="training images per client", ylabel="test accuracy", xscale="log",
           title="accuracy against the images per client")
    ax.set_xticks(sizes, [f"{size:.0f}" for size in sizes])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification-dp-scaling"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1",
                        help="fractions of the training images, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (subsample, initialisation, noise), comma-separated")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the DP recipe's target epsilon")
    parser.add_argument("--clients", type=int, default=3, help="IID clients")
    parser.add_argument("--long", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the longest setting (40 rounds, clipping at 1) and its noise-free twin")
    parser.add_argument("--target-gap", type=float, default=5.0, help="points of accuracy the fit is solved for")
    args = parser.parse_args()

    import numpy as np
    import torch

    from fedinspect.classification.runner import InputCache, recipe, run_classification

    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    long_rounds, long_train = {"rounds": LONG["rounds"]}, {"max_grad_norm": LONG["max_grad_norm"]}
    configs = {
        "plain": lambda **kw: recipe(**kw),
        "dp": lambda **kw: recipe(dp_epsilon=args.epsilon, **kw),
        "dp twin": lambda **kw: recipe(train={"noise_multiplier": 0.0}, **kw),
        "long": lambda **kw: recipe(dp_epsilon=args.epsilon, train=long_train, **long_rounds, **kw),
        "long twin": lambda **kw: recipe(train={"noise_multiplier": 0.0, **long_train}, **long_rounds, **kw),
    }
    kinds = [k for k in KINDS if args.long or not k.startswith("long")]
    cache = InputCache()
    cells = []
    started = time.perf_counter()
    for fraction, seed, kind in itertools.product(fractions, seeds, kinds):
        config = configs[kind](seed=seed, split_seed=0, clients=args.clients, train_fraction=fraction)
        began = time.perf_counter()
        results = run_classification(args.data, args.out / f"{kind.replace(' ', '-')}-{fraction:g}-seed{seed}",
                                     config, progress=False, cache=cache, write_report=False)
        epsilon = results.get("epsilon") or {}
        cell = {"kind": kind, "fraction": fraction, "seed": seed,
                "images_per_client": float(np.mean([c["images"] for c in results["split"]["clients"]])),
                "accuracy": results["accuracy"], "macro_f1": results["macro_f1"],
                "recall": {name: c["recall"] for name, c in results["per_class"].items()},
                "epsilon_max": max((float(v) for v in epsilon.values()), default=None),
                "seconds": time.perf_counter() - began}
        cells.append(cell)
        print(f"{kind:>9} fraction {fraction:<5g} seed {seed}: {cell['images_per_client']:.0f} images per client, "
              f"accuracy {cell['accuracy']:.3f}, macro-F1 {cell['macro_f1']:.3f}, {cell['seconds']:.0f} s")
    rows = []
    for fraction in fractions:
        row: dict = {"fraction": fraction, "images_per_client": float(np.mean(
            [c["images_per_client"] for c in cells if c["fraction"] == fraction]))}
        for kind in kinds:
            mine = [c for c in cells if c["fraction"] == fraction and c["kind"] == kind]
            row[kind] = {"accuracy": float(np.mean([c["accuracy"] for c in mine])),
                         "accuracy_std": float(np.std([c["accuracy"] for c in mine])),
                         "macro_f1": float(np.mean([c["macro_f1"] for c in mine]))}
        row["gap_points"] = 100 * (row["plain"]["accuracy"] - row["dp"]["accuracy"])
        for arm in ("dp", "long"):
            if arm in row:
                row[f"{arm}_model_cost_points"] = 100 * (row["plain"]["accuracy"] - row[f"{arm} twin"]["accuracy"])
                row[f"{arm}_noise_cost_points"] = 100 * (row[f"{arm} twin"]["accuracy"] - row[arm]["accuracy"])
        rows.append(row)
    sizes = [r["images_per_client"] for r in rows]
    target = rows[-1]["plain"]["accuracy"] - args.target_gap / 100  # what the largest size's private model needs
    fits = {}
    for arm in ("dp", "long"):
        if arm in kinds:
            fit = log_linear_size(sizes, [r[arm]["accuracy"] for r in rows], target)
            cap = rows[-1][f"{arm} twin"]["accuracy"]
            fits[arm] = {"fit": fit, "target_accuracy": target, "twin_accuracy": cap, "capped_by_twin": cap < target}
    print(f"{'fraction':>8} {'img/client':>10} " + " ".join(f"{k + ' acc/F1':>15}" for k in kinds)
          + "  gap = model + noise cost (points)"
          + f"   (mean over seeds {seeds}, epsilon {args.epsilon:g})")
    for r in rows:
        split_costs = {arm: (r[f"{arm}_model_cost_points"], r[f"{arm}_noise_cost_points"]) for arm in fits}
        costs = "; ".join(f"{arm}: {model + noise:.1f} = {model:.1f} + {noise:.1f}"
                          for arm, (model, noise) in split_costs.items())
        print(f"{r['fraction']:>8g} {r['images_per_client']:>10.0f} "
              + " ".join(f"{r[k]['accuracy']:>9.3f}/{r[k]['macro_f1']:.3f}" for k in kinds) + "  " + costs)
    for arm, found in fits.items():
        fit = found["fit"]
        if found["capped_by_twin"]:
            print(f"{arm}: its noise-free twin reaches {found['twin_accuracy']:.3f} < {target:.3f} (the non-private "
                  f"model less {args.target_gap:g} points): more images cannot bring it to the target")
        elif fit:
            print(f"{arm}: +{100 * fit['gain_per_doubling']:.1f} points per doubling of the images per client; "
                  f"{target:.3f} at about {fit['size_at_target']:.0f} images per client (extrapolated, the "
                  f"non-private model's own gains ignored)")
        else:
            print(f"{arm}: no gain with more images per client")
    summary = {"dataset": str(args.data), "epsilon": args.epsilon, "clients": args.clients, "seeds": seeds,
               "threads": args.threads, "cpu_count": os.cpu_count(), "rows": rows, "fits": fits,
               "target_gap_points": args.target_gap, "cells": cells, "wall_s": time.perf_counter() - started}
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / "bench_classification_dp_scaling.json"
    path.write_text(json.dumps(summary, indent=2))
    plot(rows, args.epsilon, target, results_dir / "bench_classification_dp_scaling.png")
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
