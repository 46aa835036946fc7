"""Which model the non-private recipe of ``fedinspect classify`` should train: the seed's small CNN against frozen
EfficientNet-Lite0 features, on plain and obfuscated images, over several seeds.

Usage::

    nice .venv/bin/python benchmarks/bench_classification_models.py [--data CATEGORY_DIR]
        [--models cnn,mobile] [--obfuscations none,average+shuffle+switch_row] [--seeds 0,1,2] [--threads 1]

Every cell is :func:`fedinspect.classification.runner.run_classification` of
:func:`~fedinspect.classification.runner.recipe` without DP (the CNN at 64 px, Lite0 at 224 px; 3 IID clients),
with ``--model`` set; each seed draws another train/test split, obfuscation key and initialisation. Prints the
accuracy and macro-F1 of each cell and their mean per (model, obfuscation); writes
``benchmarks/results/bench_classification_models.json``.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification-models"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--models", default="cnn,mobile", help="models, comma-separated")
    parser.add_argument("--obfuscations", default="none,average+shuffle+switch_row",
                        help="'none' or methods joined by '+', comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (split, obfuscation key, init), comma-separated")
    args = parser.parse_args()

    import numpy as np
    import torch

    from fedinspect.classification.runner import InputCache, recipe, run_classification

    torch.set_num_threads(args.threads)
    models, obfuscations = args.models.split(","), args.obfuscations.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = InputCache()
    cells = []
    started = time.perf_counter()
    for seed, obfuscation, model in itertools.product(seeds, obfuscations, models):
        methods = () if obfuscation == "none" else tuple(obfuscation.split("+"))
        config = recipe(model=model, obfuscate=methods, seed=seed, obfuscation_key=seed)
        began = time.perf_counter()
        results = run_classification(args.data, args.out / f"{model}-{obfuscation}-seed{seed}", config,
                                     progress=False, cache=cache, write_report=False)
        cell = {"model": model, "obfuscation": obfuscation, "seed": seed, "image_size": config.image_size,
                "accuracy": results["accuracy"], "macro_f1": results["macro_f1"],
                "seconds": time.perf_counter() - began}
        cells.append(cell)
        print(f"{model:>6} {obfuscation:>26} seed {seed}: accuracy {cell['accuracy']:.3f}, macro-F1 "
              f"{cell['macro_f1']:.3f}, {cell['seconds']:.0f} s")
    rows = []
    for obfuscation, model in itertools.product(obfuscations, models):
        mine = [c for c in cells if c["model"] == model and c["obfuscation"] == obfuscation]
        rows.append({"model": model, "obfuscation": obfuscation,
                     "accuracy": float(np.mean([c["accuracy"] for c in mine])),
                     "accuracy_std": float(np.std([c["accuracy"] for c in mine])),
                     "macro_f1": float(np.mean([c["macro_f1"] for c in mine]))})
    print(f"{'model':>6} {'obfuscation':>26} {'accuracy':>14} {'macro-F1':>8}  (mean over seeds {seeds})")
    for r in rows:
        print(f"{r['model']:>6} {r['obfuscation']:>26} {r['accuracy']:>7.3f} ± {r['accuracy_std']:.3f} "
              f"{r['macro_f1']:>8.3f}")
    summary = {"dataset": str(args.data), "seeds": seeds, "threads": args.threads, "cpu_count": os.cpu_count(),
               "rows": rows, "cells": cells, "wall_s": time.perf_counter() - started}
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / "bench_classification_models.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
