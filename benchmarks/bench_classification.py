"""Tables I and III of seed 000 (PIDS) on real images: federated defect classification, with timing.

Usage::

    nice .venv/bin/python benchmarks/bench_classification.py [--data CATEGORY_DIR] [--out runs/bench-classification]
        [--threads 1] [--rounds 5] [--clients 3] [--image-size 128] [--cnn-image-size 64]

Runs :func:`fedinspect.classification.experiment.run_experiment` (resumable: finished runs under
``--out/runs`` are read back) and copies its summary to ``benchmarks/results/classification-<name>-<time>.json``
with the settings and the machine's thread count. Defaults: the magnetic-tile images of the MTD
dataset, 3 IID clients, 5 rounds, 3 local epochs of Adam (lr 1e-3), logical batch 64 (16 x 4
accumulation steps), CNN at 64 px, transfer models (frozen backbone) at 128 px: the README's tables.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-classification"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16, help="physical batch (x 4 accumulation steps)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cnn-image-size", type=int, default=64)
    parser.add_argument("--models", default="cnn,mobile,large")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from fedinspect.classification.experiment import ExperimentPlan, run_experiment
    from fedinspect.classification.runner import ClassifyConfig
    from fedinspect.classification.training import TrainSettings

    torch.set_num_threads(args.threads)
    base = ClassifyConfig(clients=args.clients, rounds=args.rounds, image_size=args.image_size, seed=args.seed,
                          obfuscation_key=args.seed,
                          train=TrainSettings(local_epochs=args.local_epochs, optimizer=args.optimizer, lr=args.lr,
                                              batch_size=args.batch_size))
    plan = ExperimentPlan(base=base, models=tuple(args.models.split(",")),
                          image_sizes={"cnn": args.cnn_image_size})
    started = time.perf_counter()
    summary = run_experiment(args.data, args.out, plan, progress=True)
    summary.update({"threads": args.threads, "cpu_count": os.cpu_count(),
                    "wall_s": time.perf_counter() - started})
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"classification-{args.data.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print((args.out / "report.md").read_text())
    print(f"summary: {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
