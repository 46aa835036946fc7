"""Issue 18 item 4: the supervised detector per factory, local-only against federated against centralized.

Usage::

    .venv/bin/python benchmarks/bench_supervised_federation.py [--data ../shared/data/real/mtd/magnetic_tile]
        [--clients 3] [--method perlin] [--n-synthetic 40] [--rounds 5] [--local-epochs 2] [--image-size 160]
        [--real-defects] [--max-good N] [--threads 1] [--work /tmp/bench_supervised_federation]
        [--out benchmarks/results]

The good training images of the category are split among ``--clients`` factories (seeded, IID); each draws
``--n-synthetic`` defects with ``--method`` into its own share, inside the client
(:func:`fedinspect.federation.supervised_task.compare_local_federated_centralized`). Zero-shot by default
(no real defect in training); ``--real-defects`` also splits half of the real defects among the clients
(full-shot). Prints AP, precision, recall, F1, image AUROC and seconds of each client alone (and their mean),
the federation (FedAvg over the rounds) and one model on everything pooled, all scored on the same test split
(``test/good`` and the real defects not used in training). Writes ``bench_supervised_federation.json`` into
``--out``. Skips (exit 0) when the data folder is absent.
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
METRICS = ("ap", "precision", "recall", "f1", "auroc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real" / "mtd" / "magnetic_tile"))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--method", default="perlin", choices=("perlin", "cutpaste", "cutpaste_scar", "memseg"))
    parser.add_argument("--n-synthetic", type=int, default=40, help="synthetic defects per client")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--real-defects", action="store_true")
    parser.add_argument("--max-good", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/bench_supervised_federation")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: {args.data} not found (the real images are not in a user's clone)")
        return 0

    import torch

    from fedinspect.federation.supervised_task import (
        ComparisonSettings,
        SupervisedFederationSettings,
        compare_local_federated_centralized,
    )

    torch.set_num_threads(args.threads)
    federation = SupervisedFederationSettings(rounds=args.rounds, local_epochs=args.local_epochs, method=args.method,
                                              n_synthetic=args.n_synthetic, image_size=args.image_size,
                                              seed=args.seed)
    settings = ComparisonSettings(federation=federation, clients=args.clients, real_defects=args.real_defects,
                                  max_good=args.max_good)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = compare_local_federated_centralized(args.data, args.work, settings, progress=True)
    total_s = time.perf_counter() - started

    split = results["split"]
    print(f"\ndata: {args.data}; {args.clients} clients, good per client {split['good_per_client']}, "
          f"{args.method} defects per client {split['synthetic_per_client']}, real defects per client "
          f"{split['defective_per_client']}; test {split['test_good']} good + {split['test_defective']} defective")
    print(f"synthesis + frozen features (once, shared by all settings): {results['prepare_s']:.1f} s; "
          f"{results['epochs']} epochs per setting (federation: {args.rounds} rounds x {args.local_epochs})")
    print("\n| setting | AP | precision | recall | F1 | AUROC | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def row(name: str, entry: dict) -> None:
        values = " | ".join(f"{entry[key]:.3f}" for key in METRICS)
        print(f"| {name} | {values} | {entry['seconds']:.1f} |")

    for name, entry in results["local_only"]["clients"].items():
        row(f"local-only {name}", entry)
    row("local-only (mean)", results["local_only"]["mean"])
    row(f"federated (FedAvg, {args.rounds} rounds)", results["federated"])
    row("centralized (pooled)", results["centralized"])

    payload = {"benchmark": "bench_supervised_federation", "data": args.data, "results": results,
               "total_s": total_s, "threads": args.threads, "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
               "under_load": True}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_supervised_federation.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out / 'bench_supervised_federation.json'} (total {total_s:.0f} s, under load); "
          f"run folder {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
