"""Benchmark the detector zoo (seed 004's study) on the real metal plates and magnetic tiles.

Usage::

    .venv/bin/python benchmarks/bench_zoo.py [--data DIR ...] [--detectors patchcore,padim,...]
        [--image-size 256] [--epochs N] [--out runs/bench_zoo] [--json-dir benchmarks/results]

Runs ``fedinspect zoo-study`` (resumable: rerun the same command after an interruption and finished
models and tests are kept) on ``--data`` (default: ../shared/data/real/mpdd/metal_plate and
../shared/data/real/mtd/magnetic_tile), then prints, per detector and dataset, image AUROC, pixel AUROC,
AUC-sPRO@0.3, IoU/PRO at T1 and T2 and image F1 at T1 and T3, each detector's distance to PatchCore in
image AUROC, and the cost table (fit time, inference ms/image against PatchCore's, parameters, model
size, peak memory), with the targets of issue 13 checked: training under 15 minutes per category and
inference at most 2x PatchCore's per image. Writes ``bench_zoo.json`` (the zoo study's summary plus the
checks) to ``--json-dir``. Skips, saying so, when no data folder exists.

Time: every detector at its defaults on both categories and their union is hours on a 2-core machine
(each trained detector is sized to train within 15 minutes on the 400 magnetic tiles). Run it over
night, or choose ``--detectors``/``--data``; ``--epochs`` caps every trained detector.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from fedinspect.detectors.registry import DESCRIPTIONS
from fedinspect.study.zoo import ZooSettings, run_zoo_study

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_DATA = (REAL / "mpdd" / "metal_plate", REAL / "mtd" / "magnetic_tile")
TRAIN_LIMIT_S = 15 * 60
INFERENCE_FACTOR = 2.0  # at most this many times PatchCore's time per image


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def checks(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 13's targets per detector: training time per category, inference against PatchCore's."""
    cost = summary["cost"]
    reference = (cost.get("patchcore") or {}).get("inference_ms_per_image")
    out: dict[str, Any] = {}
    for name, entry in cost.items():
        fits = {train: seconds for train, seconds in entry["fit_s"].items() if train != "union"}
        ms = entry["inference_ms_per_image"]
        out[name] = {
            "longest_fit_s": max(fits.values()) if fits else None,
            "fit_within_15_min": all(seconds <= TRAIN_LIMIT_S for seconds in fits.values()) if fits else None,
            "inference_vs_patchcore": ms / reference if ms and reference else None,
            "inference_within_2x": ms <= INFERENCE_FACTOR * reference if ms and reference else None,
        }
    return out


def print_tables(summary: dict[str, Any], verdicts: dict[str, Any]) -> None:
    same = [row for row in summary["rows"] if row["experiment"] == "same"]
    patchcore = {row["test"]: row for row in same if row["detector"] == "patchcore"}
    print(f"\n{'detector':<21}{'dataset':<15}{'img AUROC':>10}{'vs PC':>8}{'px AUROC':>9}{'sPRO@.3':>8}"
          f"{'IoU T1':>8}{'IoU T2':>8}{'PRO T1':>8}{'PRO T2':>8}{'F1 T1':>7}{'F1 T3':>7}")
    for row in same:
        reference = patchcore.get(row["test"], {}).get("image_auroc")
        delta = (row["image_auroc"] - reference) * 100 if row["image_auroc"] is not None and reference else None
        print(f"{row['detector']:<21}{row['test']:<15}{_fmt(row['image_auroc']):>10}{_fmt(delta, 1):>8}"
              f"{_fmt(row['pixel_auroc']):>9}{_fmt(row['auc_spro_0.3']):>8}{_fmt(row['iou_t1']):>8}"
              f"{_fmt(row['iou_t2']):>8}{_fmt(row['pro_t1']):>8}{_fmt(row['pro_t2']):>8}{_fmt(row['f1_t1']):>7}"
              f"{_fmt(row['f1_t3']):>7}")
    print(f"\n{'detector':<21}{'longest fit s':>14}{'ms/img':>8}{'x PC':>6}{'params':>12}{'MB':>7}{'peak MB':>9}"
          "  targets")
    for name, entry in summary["cost"].items():
        verdict = verdicts[name]
        ok = "ok" if verdict["fit_within_15_min"] and verdict["inference_within_2x"] in (True, None) else "MISSED"
        print(f"{name:<21}{_fmt(verdict['longest_fit_s'], 0):>14}{_fmt(entry['inference_ms_per_image'], 1):>8}"
              f"{_fmt(verdict['inference_vs_patchcore'], 2):>6}{entry['parameters'] or 0:>12,}"
              f"{_fmt(entry['model_mb'], 1):>7}{_fmt(entry['peak_memory_mb'], 0):>9}  {ok}")
    for failure in summary["failed"]:
        print(f"failed: {failure['detector']} trained on {failure['train']}"
              f"{', tested on ' + failure['test'] if failure.get('test') else ''}: "
              f"{failure['error'].splitlines()[-1][:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, default=list(DEFAULT_DATA), help="category folders")
    parser.add_argument("--detectors", default=",".join(DESCRIPTIONS), help="comma-separated")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=None, help="cap of every trained detector (default: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_zoo", help="zoo-study folder (resumable)")
    parser.add_argument("--json-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    data = [path for path in args.data if path.is_dir()]
    if not data:
        print(f"skipped: none of {', '.join(map(str, args.data))} exists")
        return 0
    settings = ZooSettings(detectors=tuple(d.strip() for d in args.detectors.split(",") if d.strip()),
                           image_size=args.image_size, epochs=args.epochs)
    summary = run_zoo_study(data, args.out, settings, progress=True)
    verdicts = checks(summary)
    print_tables(summary, verdicts)
    args.json_dir.mkdir(parents=True, exist_ok=True)
    path = args.json_dir / "bench_zoo.json"
    path.write_text(json.dumps({**summary, "checks": verdicts}, indent=1, default=str))
    print(f"\nwrote {path}; report in {args.out / 'report.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
