"""Benchmark the privacy-utility study on the real magnetic tiles (or the synthetic data without them).

Usage::

    .venv/bin/python benchmarks/bench_privacy.py [--out runs/privacy-mtd] [--image-size 128] [--clients 5]
        [--json-dir benchmarks/results]

Runs ``fedinspect privacy-study`` (epsilon {1, 5, 10, none} x obfuscation {none, average+shuffle, all
three}, plus per-embedding DP at epsilon 1) on ``../shared/data/real/mtd`` when it exists, otherwise on
the ``small`` synthetic data; the attacker trains on generated ``tiny`` images. Prints the table and
writes a JSON summary (wall time, peak memory, rows) to ``--json-dir``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedinspect.data.synthetic import generate_dataset
from fedinspect.evaluation.privacy_report import privacy_table
from fedinspect.federation.client import RoundSettings
from fedinspect.federation.privacy_study import PrivacyStudy, run_privacy_study
from fedinspect.federation.runner import FederationConfig

ROOT = Path(__file__).resolve().parents[1]
MTD = ROOT.parent / "shared" / "data" / "real" / "mtd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "privacy-mtd"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    out = Path(args.out)
    data = MTD if MTD.is_dir() else generate_dataset(out / "data", seed=args.seed, size="small")
    attacker = generate_dataset(out / "attacker_data", seed=args.seed + 1, size="tiny")
    config = FederationConfig(clients=args.clients, centralized=False, compare_shared=False, write_maps=False,
                              settings=RoundSettings(image_size=args.image_size, seed=args.seed))
    start = time.perf_counter()
    results = run_privacy_study(data, out / "study", attacker, config, PrivacyStudy())
    wall = time.perf_counter() - start
    print(f"data: {data}; {len(results['rows'])} runs in {wall:.0f} s; peak {results['peak_memory_mb']:.0f} MB")
    print(privacy_table(results["rows"]))
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    summary = {"data": str(data), "wall_s": wall, "peak_memory_mb": results["peak_memory_mb"],
               "rows": [{k: v for k, v in row.items() if k != "categories"} for row in results["rows"]]}
    path = json_dir / "bench_privacy.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary in {path}")


if __name__ == "__main__":
    main()
