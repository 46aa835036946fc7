"""Issue 18's targets for the supervised detector on synthetic defects, on the real magnetic tiles.

Usage::

    .venv/bin/python benchmarks/bench_synthesis.py [--data ../shared/data/real/mtd/magnetic_tile]
        [--methods offline] [--counts 80,100,120] [--epochs 30] [--image-size 224] [--threads 1]
        [--work /tmp/bench_synthesis_study] [--out benchmarks/results]

Runs ``fedinspect synthesis-study`` (the library call; resumable in ``--work``) and prints:

1. zero-shot: each offline generator's supervised detector against PatchCore by AP on the same test split
   (which wins, by how many points), at every N_aug;
2. full-shot: synthetic positives added to the real ones against the real ones alone, per N_aug;
3. the time to generate 120 defects with each method (in memory, no PNG writing; the target is under a
   minute for every offline method on 2 cores).

Writes ``bench_synthesis.json`` into ``--out``. Skips (exit 0) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

print = functools.partial(print, flush=True)
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real" / "mtd" / "magnetic_tile"))
    parser.add_argument("--methods", default="offline")
    parser.add_argument("--counts", default="80,100,120")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/bench_synthesis_study")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: {args.data} not found (the real images are not in a user's clone)")
        return 0

    import torch

    from fedinspect.data.images import read_image
    from fedinspect.study.synthesis import (
        SynthesisStudySettings,
        load_study_data,
        run_synthesis_study,
        synthesize_defects,
    )
    from fedinspect.study.synthesis_command import parse_study_methods

    settings = SynthesisStudySettings(methods=parse_study_methods(args.methods),
                                      counts=tuple(int(n) for n in args.counts.split(",")), seed=args.seed,
                                      epochs=args.epochs, image_size=args.image_size)
    start = time.perf_counter()
    results = run_synthesis_study(args.data, args.work, settings, progress=True, threads=args.threads)
    study_s = time.perf_counter() - start
    cells = {cell["cell"]: cell for cell in results["cells"]}
    patchcore = cells.get("patchcore", {}).get("ap")
    baseline = cells.get("baseline", {}).get("ap")

    print(f"\ndata: {results['data']}")
    print("\nZero-shot against PatchCore (AP; difference in points)")
    print("| method | N_aug | AP | precision | recall | PatchCore AP | difference | winner |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    zero_rows = []
    for row in results["tables"]["zero_shot"]:
        if row["cell"] == "patchcore":
            continue
        difference = row["ap"] - patchcore if patchcore is not None else None
        winner = "n/a" if difference is None else "supervised" if difference > 0 else "PatchCore"
        zero_rows.append({**row, "patchcore_ap": patchcore, "difference": difference, "winner": winner})
        print(f"| {row['model']} | {row['n_aug']} | {row['ap']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} "
              f"| {patchcore if patchcore is None else f'{patchcore:.3f}'} | "
              f"{'' if difference is None else f'{100 * difference:+.1f}'} | {winner} |")

    print("\nFull-shot against the no-synthesis baseline (AP; difference in points)")
    print("| method | N_aug | AP | baseline AP | difference |")
    print("|---|---:|---:|---:|---:|")
    full_rows = []
    for row in results["tables"]["full_shot"]:
        if row["cell"] == "baseline":
            continue
        difference = row["ap"] - baseline if baseline is not None else None
        full_rows.append({**row, "baseline_ap": baseline, "difference": difference})
        print(f"| {row['model']} | {row['n_aug']} | {row['ap']:.3f} | "
              f"{baseline if baseline is None else f'{baseline:.3f}'} | "
              f"{'' if difference is None else f'{100 * difference:+.1f}'} |")

    print("\nGenerating 120 defects per method (in memory, one thread of numpy; target < 60 s)")
    data = load_study_data(args.data, settings.seed, settings.real_fraction)
    goods = [read_image(sample.image_path) for sample in data.train_good]
    generation = {}
    for method in settings.methods:
        if method == "diffusion":
            continue
        _, seconds = synthesize_defects(goods, method, 120, settings, [], progress=False)
        generation[method] = seconds
        print(f"| {method} | {seconds:.1f} s |")

    payload = {"benchmark": "bench_synthesis", "data": args.data, "split": results["data"],
               "settings": results["settings"], "study_s": study_s, "threads": args.threads,
               "torch_threads_default": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "python": sys.version.split()[0], "under_load": True,
               "zero_shot_vs_patchcore": zero_rows, "full_shot_vs_baseline": full_rows,
               "baseline_ap": baseline, "patchcore": cells.get("patchcore"),
               "generation_120_s": generation, "cells": results["cells"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_synthesis.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out / 'bench_synthesis.json'}; study folder {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
