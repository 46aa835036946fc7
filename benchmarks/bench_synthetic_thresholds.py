"""How close T2/T3 chosen on synthetic defects come to those chosen on real ones (issue 18, item 5).

Usage::

    .venv/bin/python benchmarks/bench_synthetic_thresholds.py [--data DIR ...] [--methods perlin,cutpaste,...]
        [--seeds 0,1,2] [--copies 1] [--image-size 256] [--json-dir benchmarks/results]

Per dataset (default: ../shared/data/real/mpdd/metal_plate and ../shared/data/real/mtd/magnetic_tile), PatchCore
at its defaults is fitted once on the training images less the T1 share (``fit_category(hold_out_t1=True)``)
and scores the test images once. Then, as ``fedinspect evaluate --synthetic-validation METHOD`` does
(:func:`fedinspect.pipeline.synthetic_validation_thresholds`), each offline generator draws one defect (or
``--copies``) into each good image of the T1 share with each ``--seeds`` value, and T2/T3 are chosen on them.
The real-chosen T2/T3 come from the protocol's select share (15% of the test images). Both are measured on the
same report share: IoU, PRO and pixel F1 at T2, image F1 at T3, and the fraction of good report images flagged.
Prints one table per dataset and writes ``bench_synthetic_thresholds.json`` to ``--json-dir``. Skips, saying
so, when no data folder exists.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedinspect.data.dataset import CategoryDataset
from fedinspect.evaluation.thresholds import (
    best_f1_image_threshold,
    best_f1_pixel_threshold,
    threshold_metrics,
    threshold_split,
    train_shares,
)
from fedinspect.pipeline import fit_category, load_ground_truth, synthetic_validation_thresholds
from fedinspect.synthesis.generators import OFFLINE_METHODS

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_DATA = (REAL / "mpdd" / "metal_plate", REAL / "mtd" / "magnetic_tile")
SPLIT_SEED = 0


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _at(maps, regions, scores, labels, threshold: float) -> dict[str, float]:
    """The report-share figures the table shows at one threshold."""
    metrics = threshold_metrics(maps, regions, scores, labels, threshold)
    good = scores[labels == 0]
    return {"iou": metrics["iou"], "pro": metrics["pro"], "pixel_f1": metrics["pixel_f1"],
            "image_f1": metrics["image_f1"], "good_flagged": float(np.mean(good >= threshold)) if good.size else None}


def bench_dataset(data: Path, methods: list[str], seeds: list[int], copies: int, image_size: int) -> dict[str, Any]:
    dataset = CategoryDataset(data)
    start = time.perf_counter()
    model = fit_category(data, progress=False, hold_out_t1=True, split_seed=SPLIT_SEED, image_size=image_size)
    fit_s = time.perf_counter() - start
    _, regions = load_ground_truth(dataset, progress=False)
    start = time.perf_counter()
    scores, maps = model.predict((dataset.load_image(s) for s in dataset.test), total=len(dataset.test))
    test_s = time.perf_counter() - start
    labels = np.array([s.label for s in dataset.test])
    split = threshold_split(len(dataset.train), [s.defect for s in dataset.test], SPLIT_SEED)
    t1_samples = [dataset.train[i] for i in train_shares(len(dataset.train), SPLIT_SEED)[2]]
    t1_scores, t1_maps = model.predict((dataset.load_image(s) for s in t1_samples), total=len(t1_samples))

    report = split.report
    shared = ([maps[i] for i in report], [regions[i] for i in report], scores[report], labels[report])
    t2, _ = best_f1_pixel_threshold([maps[i] for i in split.select], [regions[i] for i in split.select])
    t3, _ = best_f1_image_threshold(scores[split.select], labels[split.select])
    real = {"T2": {"value": t2, **_at(*shared, t2)}, "T3": {"value": t3, **_at(*shared, t3)}}
    rows: list[dict[str, Any]] = []
    for method in methods:
        for seed in seeds:
            start = time.perf_counter()
            choice = synthetic_validation_thresholds(model, dataset, t1_samples, t1_maps, t1_scores, method, seed,
                                                     copies)
            rows.append({"method": method, "seed": seed, "seconds": time.perf_counter() - start,
                         "T2": {"value": choice.t2, "synthetic_f1": choice.t2_f1, **_at(*shared, choice.t2)},
                         "T3": {"value": choice.t3, "synthetic_f1": choice.t3_f1, **_at(*shared, choice.t3)}})
    return {"dataset": dataset.name, "path": str(data), "train": len(dataset.train), "t1_share": len(t1_samples),
            "synthetic_per_draw": len(t1_samples) * copies, "select": int(split.select.size),
            "report": int(report.size), "fit_s": fit_s, "test_inference_s": test_s, "real": real, "synthetic": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['dataset']}: PatchCore fitted on {result['train'] - result['t1_share']} images in "
          f"{result['fit_s']:.0f} s; synthetic defects in the {result['t1_share']} T1-share images; real T2/T3 "
          f"on {result['select']} select images; all figures on the {result['report']} report images")
    print(f"{'chosen on':<20} {'T2':>9} {'IoU@T2':>7} {'PRO@T2':>7} {'pxF1@T2':>8} {'good@T2':>8} | {'T3':>9} "
          f"{'imgF1@T3':>9} {'good@T3':>8} | {'T2/real':>7} {'T3/real':>7}")
    real = result["real"]

    def line(label: str, t2: dict[str, Any], t3: dict[str, Any]) -> str:
        return (f"{label:<20} {t2['value']:>9.4f} {_fmt(t2['iou']):>7} {_fmt(t2['pro']):>7} "
                f"{_fmt(t2['pixel_f1']):>8} {_fmt(t2['good_flagged']):>8} | {t3['value']:>9.4f} "
                f"{_fmt(t3['image_f1']):>9} {_fmt(t3['good_flagged']):>8} | "
                f"{t2['value'] / real['T2']['value']:>7.2f} {t3['value'] / real['T3']['value']:>7.2f}")

    print(line("real (select share)", real["T2"], real["T3"]))
    for row in result["synthetic"]:
        print(line(f"{row['method']} seed {row['seed']}", row["T2"], row["T3"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=[str(p) for p in DEFAULT_DATA], help="category folders")
    parser.add_argument("--methods", default=",".join(OFFLINE_METHODS), help="offline generators, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the synthetic defects, comma-separated")
    parser.add_argument("--copies", type=int, default=1, help="synthetic defects per good T1-share image")
    parser.add_argument("--image-size", type=int, default=256, help="PatchCore's short side after resizing")
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    data = [Path(p) for p in args.data if Path(p).is_dir()]
    if not data:
        print(f"skipped: none of {args.data} exists (real images are not shipped)")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    results = []
    for path in data:
        result = bench_dataset(path, methods, seeds, args.copies, args.image_size)
        print_table(result)
        results.append(result)
    out = {"benchmark": "bench_synthetic_thresholds", "detector": "patchcore (defaults)", "split_seed": SPLIT_SEED,
           "image_size": args.image_size, "copies": args.copies, "methods": methods, "seeds": seeds,
           "datasets": results, "wall_s": time.perf_counter() - started,
           "environment": {"python": sys.version.split()[0], "machine": platform.machine(),
                           "note": "2 shared cores, under load (other sessions and a long benchmark running)"}}
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_synthetic_thresholds.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {json_dir / 'bench_synthetic_thresholds.json'} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
