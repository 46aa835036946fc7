"""Issue 18's speed target: 120 synthetic defects with every offline method in under a minute (2 cores).

Usage::

    .venv/bin/python benchmarks/bench_synthesis_speed.py [--data ../shared/data/real/mtd/magnetic_tile]
        [--count 120] [--seed 0] [--repeats 1] [--out benchmarks/results]

Runs ``fedinspect synthesize`` (the library call, no subprocess) on the real magnetic tiles, one method at a
time, into a temporary folder: everything the command does (reading the good images, generating, writing the
PNG images and masks; the manifest and the figure grid are written once per run and timed apart). Prints a
table of seconds per method (best of ``--repeats``) and writes ``bench_synthesis_speed-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

print = functools.partial(print, flush=True)
ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real" / "mtd" / "magnetic_tile"))
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from fedinspect.synthesis.commands import synthesize
    from fedinspect.synthesis.generators import OFFLINE_METHODS

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedinspect-synthesis-") as work:
        for method in OFFLINE_METHODS:
            runs = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                manifest = synthesize(args.data, Path(work) / f"{method}-{repeat}", [method], args.count,
                                      seed=args.seed, progress=False)
                total = time.perf_counter() - start
                runs.append({"total_s": total, "generate_and_write_s": manifest["seconds"][method],
                             "mean_defect_fraction": _mean_fraction(Path(work) / f"{method}-{repeat}", manifest)})
            best = min(runs, key=lambda run: run["generate_and_write_s"])
            rows.append({"method": method, **best, "runs": runs})
            print(f"{method:>14}: {best['generate_and_write_s']:6.1f} s for {args.count} (command total "
                  f"{best['total_s']:.1f} s with manifest and figure)")
    total = sum(row["generate_and_write_s"] for row in rows)
    print()
    print(f"| method | {args.count} defects (s) | per image (ms) | command total (s) | mean defect area |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['generate_and_write_s']:.1f} | "
              f"{1000 * row['generate_and_write_s'] / args.count:.0f} | {row['total_s']:.1f} | "
              f"{100 * row['mean_defect_fraction']:.1f} % |")
    verdict = "met" if total < TARGET_S else "missed"
    print(f"| every offline method | {total:.1f} | | | |\n\ntarget: under {TARGET_S:.0f} s for all four: {verdict}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"data": args.data, "count": args.count, "seed": args.seed, "rows": rows, "total_s": total,
              "target_s": TARGET_S, "met": total < TARGET_S, "cpu_count": os.cpu_count(), "load_average": load,
              "python": sys.version.split()[0], "machine": platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_synthesis_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load}; {path}")
    return 0


def _mean_fraction(folder: Path, manifest: dict) -> float:
    """Mean share of an image's pixels that a defect covers (from the manifest and the written masks' sizes)."""
    from fedinspect.data.images import image_size

    fractions = []
    for entry in manifest["images"]:
        height, width = image_size(folder / entry["mask"])
        fractions.append(entry["defect_pixels"] / (height * width))
    return sum(fractions) / len(fractions)


if __name__ == "__main__":
    raise SystemExit(main())
