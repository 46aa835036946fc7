"""Federated against centralized meta-learning (issue 17, item 5): two factories, a new one with 20 images.

Usage::

    .venv/bin/python benchmarks/bench_meta_federation.py [--target magnetic_tile] [--rounds 5] [--local-steps 4]
        [--image-size 64] [--engines in-process] [--threads 2] [--out runs/bench_meta_federation]
        [--json-dir benchmarks/results]

Factory A holds the real metal plates and three synthetic products (engine_wiring, pipe_clip, pipe_staple),
factory B the real glass chips and the other three (tank_screw, underbody_pipes, underbody_screw); the new
factory is the real magnetic tiles (the largest test share: 292 images), left out of both. Centralized MAML
on the eight tasks pooled and the federation of the two factories take the same number of meta-steps from
the same initial weights; each is then fine-tuned on 20 magnetic tiles and tested on the 30% share
(:func:`fedinspect.meta.federated.compare_federated_centralized`). Prints the table and writes
``bench_meta_federation.json``. The synthetic "small" dataset is generated under ``--out`` on first use.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from fedinspect.meta.federated import MetaFederationSettings, compare_federated_centralized
from fedinspect.meta.tasks import task_from_category

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
REAL_CATEGORIES = {"magnetic_tile": REAL / "mtd" / "magnetic_tile", "metal_plate": REAL / "mpdd" / "metal_plate",
                   "glass_chip": REAL / "glass" / "glass_chip"}
SYNTHETIC = (("engine_wiring", "pipe_clip", "pipe_staple"), ("tank_screw", "underbody_pipes", "underbody_screw"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="magnetic_tile", choices=sorted(REAL_CATEGORIES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--second-order", action="store_true")
    parser.add_argument("--no-synthetic", action="store_true", help="the real categories only (one per factory)")
    parser.add_argument("--engines", default="in-process", help="comma-separated: in-process, flower-sim")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_meta_federation"))
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not all((path / "train").is_dir() for path in REAL_CATEGORIES.values()):
        print(f"skipped: the real categories are not all at {REAL}")
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    factories = [name for name in REAL_CATEGORIES if name != args.target]
    clients = [[task_from_category(REAL_CATEGORIES[name])] for name in factories]
    if not args.no_synthetic:
        from fedinspect.data.synthetic import generate_dataset

        started = time.perf_counter()
        synthetic = generate_dataset(out / "synthetic-small", seed=0, size="small", progress=False)
        print(f"synthetic dataset: {time.perf_counter() - started:.1f} s")
        for client, names in zip(clients, SYNTHETIC, strict=True):
            client.extend(task_from_category(synthetic / name) for name in names)
    target = task_from_category(REAL_CATEGORIES[args.target])
    settings = MetaFederationSettings(rounds=args.rounds, local_steps=args.local_steps, image_size=args.image_size,
                                      first_order=not args.second_order, seed=args.seed,
                                      engines=tuple(args.engines.split(",")))
    for index, client in enumerate(clients):
        print(f"client_{index}: {', '.join(t.name for t in client)}")
    print(f"new factory: {target.name} ({len(target.good)} good, {len(target.defective)} defective)")
    started = time.perf_counter()
    results = compare_federated_centralized(clients, target, settings, out / "comparison", progress=True)
    results["wall_s"] = time.perf_counter() - started
    results["threads"] = args.threads
    print(f"\n{'init':<12} {'AUROC':>6} {'acc':>6} {'F1':>6} {'epochs':>6} {'meta-train s':>12}")
    federated = results["federated"]
    rows = [("centralized", results["centralized"], results["centralized"]["seconds"]),
            ("federated", federated, federated["engines"][federated["engine"]]["seconds"]),
            ("random", results["random_init"], 0.0)]
    for name, row, seconds in rows:
        print(f"{name:<12} {row['auroc']:6.3f} {row['accuracy']:6.3f} {row['f1']:6.3f} "
              f"{row['epochs_to_converge']:6d} {seconds:12.1f}")
    print(f"federated - centralized: {results['difference_points']:+.1f} AUROC points "
          f"(target: >= -{results['target_points']:g}; met: {results['within_target']})")
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_meta_federation.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
