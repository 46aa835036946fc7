"""Benchmark robust aggregation against poisoned clients on the real magnetic tiles.

Usage::

    .venv/bin/python benchmarks/bench_poisoning.py [--data ../shared/data/real/mtd] [--image-size 128]
        [--clients 5] [--global-size 10000] [--seed 0] [--json-dir benchmarks/results]

Grid, on 5 IID clients: the clean round, then each attack (``noise``, ``scale``, ``defects``, at
their default strengths; federation/poisoning.py) by the last 1 and the last 2 clients, each
aggregated by ``federated_coreset`` and ``robust_coreset``. Prints image AUROC and AUC-sPRO@0.05 per
run with the change from the clean ``federated_coreset`` run (in points), and what the screening of
``robust_coreset`` dropped (clients, rows of the poisoned and of the honest clients). Embeddings are
computed once and shared by every run; no report, no maps, no centralized or shared-bank baseline.
Image size 128 by default: one run at 256 took 12 minutes on the shared 2-core machine (11.5 of them
scoring the 573 test images), so the 14-run grid would take hours; at 128 it takes about 7 minutes.
``--global-size`` below the clients' total coreset makes the server's global coreset choose (and
far-away poisoned rows are what a greedy coreset chooses first). Writes a JSON summary
(``bench_poisoning.json``, or ``bench_poisoning_<size>.json`` for another global size) to
``--json-dir``. Skips, saying so, when the data folder is absent.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedinspect.federation.client import RoundSettings
from fedinspect.federation.poisoning import ATTACKS
from fedinspect.federation.rounds import run_rounds
from fedinspect.federation.runner import FederationConfig, PatchCoreTask
from fedinspect.federation.strategies import screen_updates
from fedinspect.federation.update import ClientUpdate
from fedinspect.pipeline import peak_memory_mb

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
MTD = ROOT.parent / "shared" / "data" / "real" / "mtd"
STRATEGIES = ("federated_coreset", "robust_coreset")
TARGET_POINTS = 1.0  # robust_coreset under attack: image AUROC within 1 point of the clean run


def screening_summary(updates: list[ClientUpdate], config: FederationConfig) -> dict[str, Any]:
    """What robust_coreset's screening drops from these updates, split into poisoned and honest clients."""
    poisoned = {f"client_{i}" for i in config.poisoning().poisoned(config.clients)}
    summary = {"dropped_clients": [], "dropped_rows_poisoned": 0, "rows_poisoned": 0,
               "dropped_rows_honest": 0, "rows_honest": 0}
    for category in sorted({name for update in updates for name in update.categories}):
        senders = [update for update in updates if category in update.categories]
        screening = screen_updates([update.categories[category] for update in senders])
        for update, mask in zip(senders, screening.kept, strict=True):
            side = "poisoned" if update.client_id in poisoned else "honest"
            summary[f"dropped_rows_{side}"] += int((~mask).sum())
            summary[f"rows_{side}"] += len(mask)
        summary["dropped_clients"] += [f"{category}:{senders[i].client_id}" for i in screening.dropped_clients]
    return summary


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["attack", "poisoned", "strategy", "image_auroc", "d_auroc_pts", "spro@0.05", "d_spro_pts",
               "dropped_clients", "dropped_rows_poisoned", "dropped_rows_honest", "run_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if column.startswith("dropped_rows"):
                side = column.removeprefix("dropped_rows_")
                value = f"{row[column]}/{row[f'rows_{side}']}" if f"rows_{side}" in row else ""
            elif column == "dropped_clients":
                value = ", ".join(value) if value else ("none" if "rows_honest" in row else "")
            elif isinstance(value, float):
                value = f"{value:+.2f}" if column.startswith("d_") else f"{value:.4f}" if "auroc" in column \
                    or "spro" in column else f"{value:.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=MTD, help="dataset folder (MVTec layout)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--global-size", type=int, default=FederationConfig.global_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: no data at {args.data} (the real magnetic-tile images; see --data)")
        return 0

    settings = RoundSettings(image_size=args.image_size, seed=args.seed)
    grid = [("", 0)] + [(attack, f) for attack in ATTACKS for f in (1, 2)]
    cache: dict = {}
    test_cache: dict = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for attack, f in grid:
            for strategy in STRATEGIES:
                config = FederationConfig(clients=args.clients, strategy=strategy, poison=attack, poisoned_clients=f,
                                          global_size=args.global_size, centralized=False, compare_shared=False,
                                          write_maps=False, settings=settings)
                start = time.perf_counter()
                out = Path(work) / f"{attack or 'clean'}-{f}-{strategy}"
                task = PatchCoreTask(args.data, config, cache=cache, test_cache=test_cache, report=False)
                outcome = run_rounds(task, progress=False)
                results = task.conclude(outcome, out, "in-process")
                row: dict[str, Any] = {
                    "attack": attack or "none", "poisoned": f, "strategy": strategy,
                    "strength": config.poisoning().level, "image_auroc": results["mean"]["image_auroc"],
                    "spro@0.05": results["mean"]["auc_spro"]["0.05"], "global_bank": results["stages"]["global_bank"],
                    "missing_clients": results["missing_clients"], "run_s": time.perf_counter() - start,
                }
                if strategy == "robust_coreset":
                    row.update(screening_summary(task.updates(outcome.final_results), config))
                rows.append(row)
                print(f"[{len(rows)}/{2 * len(grid)}] {row['attack']} x{f} {strategy}: image AUROC "
                      f"{row['image_auroc']:.4f}, sPRO@0.05 {row['spro@0.05']:.4f} ({row['run_s']:.0f} s)",
                      file=sys.stderr)
    wall = time.perf_counter() - started
    clean = rows[0]
    for row in rows:
        row["d_auroc_pts"] = 100 * (row["image_auroc"] - clean["image_auroc"])
        row["d_spro_pts"] = 100 * (row["spro@0.05"] - clean["spro@0.05"])
    robust = [row for row in rows if row["strategy"] == "robust_coreset" and row["poisoned"]]
    misses = [f"{row['attack']} x{row['poisoned']}" for row in robust if row["d_auroc_pts"] < -TARGET_POINTS]
    print(f"data: {args.data}; image size {args.image_size}; {args.clients} IID clients; global size "
          f"{args.global_size}; seed {args.seed}; "
          f"{len(rows)} runs in {wall:.0f} s (first run includes the embedding pass); "
          f"peak {peak_memory_mb():.0f} MB\n")
    print(table(rows))
    print(f"\nd_*_pts: change from the clean federated_coreset run, in points. Target: robust_coreset within "
          f"{TARGET_POINTS:g} point of image AUROC under every attack: "
          + ("met" if not misses else f"missed for {', '.join(misses)}"))
    args.json_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.global_size == FederationConfig.global_size else f"_{args.global_size}"
    path = args.json_dir / f"bench_poisoning{suffix}.json"
    path.write_text(json.dumps({
        "data": str(args.data), "image_size": args.image_size, "clients": args.clients, "seed": args.seed,
        "global_size": args.global_size,
        "wall_s": wall, "peak_memory_mb": peak_memory_mb(), "target_points": TARGET_POINTS, "missed": misses,
        "rows": rows,
    }, indent=2))
    print(f"summary in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
