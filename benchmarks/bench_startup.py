"""Benchmark how long the command line takes to start: ``fedinspect --help`` and every ``COMMAND --help``.

Usage::

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5] [--json-dir benchmarks/results]

Each command runs in a fresh interpreter (as a user types it), ``--repeats`` times; the table gives the
median and the slowest wall time, and which heavy libraries the parser imported (none is the goal: torch,
Flower, Opacus and matplotlib are imported by the command that needs them). Target: under 1.5 s each on an
idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "ray", "opacus", "matplotlib", "skimage", "scipy.stats", "faiss", "sklearn")
PROBE = ("import sys; from fedinspect.cli import build_parser; build_parser(); "
         f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")


def commands() -> list[str]:
    from fedinspect.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subparsers.choices)


def wall_times(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON goes")
    args = parser.parse_args()

    entry = [sys.executable, "-m", "fedinspect"]
    rows = []
    for name in ["", *commands()]:
        argv = [*entry, *([name] if name else []), "--help"]
        times = wall_times(argv, args.repeats)
        rows.append({"command": f"fedinspect {name} --help".replace("  ", " "), "median_s": statistics.median(times),
                     "max_s": max(times)})
    heavy = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout.strip()
    print("| command | median (s) | slowest (s) |\n|---|---:|---:|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['max_s']:.2f} |")
    print(f"\nheavy libraries imported by the parser: {heavy or 'none'}")
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / "bench_startup.json"
    summary = {"repeats": args.repeats, "rows": rows, "heavy_imports": heavy.split(",") if heavy else []}
    path.write_text(json.dumps(summary, indent=2))
    print(f"summary in {path}")


if __name__ == "__main__":
    main()
