"""Benchmark the memory and time of a category's evaluation: all maps at once versus streamed.

Usage::

    .venv/bin/python benchmarks/bench_evaluation_memory.py [--images 200] [--height 750] [--width 1000]
        [--seed 0] [--real ../shared/data/real/mpdd/metal_plate] [--json-dir benchmarks/results]

A synthetic category: ``--images`` float32 anomaly maps (smooth background plus noise, every other image
defective with 1-3 elliptic regions of 100 to 60,000 pixels, saturated either at their full area or at an
absolute 2,000 pixels, as AutoVI's defect types are). Each way of evaluating runs in a fresh interpreter, so
that its peak resident memory (``ru_maxrss``) is its own:

- ``whole``: every map held in a list, then :func:`metrics.pixel_auroc` and :func:`metrics.spro_curve` on
  all of them (what ``score_with_curves`` did before it was streamed; the reference the others must equal);
- ``score_with_curves``: the same list, then :func:`score_with_curves`, which now runs the streamed computation
  over references to the maps (:func:`streamed_pixel_metrics`);
- ``streamed``: each map made, added to a :class:`StreamingEvaluation` and dropped (its defect-free scores go
  to a temporary file); what a caller that produces maps one at a time gets.

``--real CATEGORY`` (an MVTec-layout folder) evaluates real maps instead: PatchCore (default settings) is fitted
on the category's good training images and its full-resolution test maps are saved once (``np.save``, no
pickle) in a temporary folder that each way of evaluating then reads.

The table gives the evaluation's wall time (making the maps excluded), the peak of the memory numpy and
Python allocated during it (``tracemalloc``, the maps held by the caller excluded), the process's peak
resident memory (maps included) and whether the results equal the ``whole`` path's (to 1e-6; the table says
whether they are bitwise equal).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("whole", "score_with_curves", "streamed")


def synthetic_image(index: int, height: int, width: int, seed: int) -> tuple[int, float, np.ndarray, list]:
    """Label, image score, float32 map and regions of synthetic test image ``index`` (its own seed)."""
    from fedinspect.data.regions import Region

    rng = np.random.default_rng([seed, index])
    coarse = rng.normal(size=(height // 25 + 1, width // 25 + 1)).astype(np.float32)
    anomaly_map = np.kron(coarse, np.ones((25, 25), dtype=np.float32))[:height, :width]
    anomaly_map += rng.normal(scale=0.5, size=(height, width)).astype(np.float32)
    regions = []
    label = index % 2
    if label:
        yy, xx = np.ogrid[:height, :width]
        for _ in range(int(rng.integers(1, 4))):
            area = float(np.exp(rng.uniform(np.log(100), np.log(60_000))))
            ry = float(np.sqrt(area / np.pi) * rng.uniform(0.5, 2.0))
            rx = area / np.pi / ry
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            if not mask.any():
                continue
            anomaly_map[mask] += np.float32(rng.uniform(0.5, 3.0))
            size = int(mask.sum())
            regions.append(Region(mask, size if rng.random() < 0.5 else min(size, 2000)))
    return label, float(anomaly_map.max()), anomaly_map, regions


def whole_category(labels: list, scores: list, maps: list, regions: list) -> tuple[dict, Any]:
    """``score_with_curves`` as it was before streaming: the pixel metrics on all maps at once."""
    from sklearn.metrics import roc_curve

    from fedinspect.evaluation import metrics
    from fedinspect.evaluation.protocol import union_mask
    from fedinspect.evaluation.report import Curves

    curves = Curves()
    result = {"image_auroc": metrics.image_auroc(labels, scores)}
    curves.roc_fpr, curves.roc_tpr, _ = roc_curve(labels, scores)
    unions = [union_mask(r, m.shape) for r, m in zip(regions, maps, strict=True)]
    result["pixel_auroc"] = metrics.pixel_auroc(maps, unions)
    del unions
    curves.spro_fpr, curves.spro, _ = metrics.spro_curve(maps, regions)
    result["auc_spro"] = {str(limit): metrics.area_under_curve(curves.spro_fpr, curves.spro, limit)
                          for limit in metrics.FPR_LIMITS}
    return result, curves


def save_real_maps(category: Path, folder: Path) -> int:
    """Fit PatchCore on ``category`` and save its test labels, scores and maps in ``folder``; the image count."""
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.pipeline import _naming_the_image, fit_category

    model = fit_category(category, progress=False)
    dataset = CategoryDataset(category)
    scores, maps = _naming_the_image(dataset, dataset.test, lambda images: model.predict(images))
    np.save(folder / "labels.npy", np.array([s.label for s in dataset.test]))
    np.save(folder / "scores.npy", np.asarray(scores, dtype=np.float64))
    for i, anomaly_map in enumerate(maps):
        np.save(folder / f"map_{i:05d}.npy", np.asarray(anomaly_map, dtype=np.float32))
    (folder / "category.txt").write_text(str(category))
    return len(maps)


@functools.cache
def _category(folder: Path) -> Any:
    from fedinspect.data.dataset import CategoryDataset

    return CategoryDataset(Path((folder / "category.txt").read_text()))


def real_image(folder: Path, index: int) -> tuple[int, float, np.ndarray, list]:
    """Test image ``index`` saved by :func:`save_real_maps`, with its regions read from the category."""
    dataset = _category(folder)
    sample = dataset.test[index]
    anomaly_map = np.load(folder / f"map_{index:05d}.npy", allow_pickle=False)
    regions = dataset.load_regions(sample, anomaly_map.shape) if sample.label else []
    return (int(np.load(folder / "labels.npy")[index]), float(np.load(folder / "scores.npy")[index]), anomaly_map,
            regions)


def run_mode(mode: str, images: int, height: int, width: int, seed: int, real: Path | None = None) -> dict:
    """Evaluate the synthetic category (or the real maps in ``real``) one way; the figures of this interpreter."""
    from fedinspect.data.regions import Region
    from fedinspect.evaluation.protocol import score_with_curves
    from fedinspect.evaluation.streaming import StreamingEvaluation

    score_with_curves(np.array([0, 1]), np.array([0.0, 1.0]), [np.zeros((1, 2))] * 2,  # warm up: lazy imports
                      [[], [Region(np.array([[True, False]]), 1)]])
    made: Iterator = (real_image(real, i) for i in range(images)) if real else (
        synthetic_image(i, height, width, seed) for i in range(images))
    seconds = 0.0
    if mode == "streamed":
        tracemalloc.start()
        with StreamingEvaluation() as evaluation:
            for label, score, anomaly_map, regions in made:
                start = time.perf_counter()
                evaluation.add(label, score, anomaly_map, regions)
                seconds += time.perf_counter() - start
                del anomaly_map, regions
            start = time.perf_counter()
            result, curves = evaluation.result(), evaluation.curves()
            seconds += time.perf_counter() - start
        held = 0
    else:
        labels, scores, maps, regions = (list(column) for column in zip(*made, strict=True))
        held = sum(m.nbytes for m in maps) + sum(r.mask.nbytes for image in regions for r in image)
        tracemalloc.start()
        start = time.perf_counter()
        if mode == "score_with_curves":
            result, curves = score_with_curves(np.array(labels), np.array(scores), maps, regions)
        else:
            result, curves = whole_category(labels, scores, maps, regions)
        seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"mode": mode, "seconds": seconds, "tracemalloc_peak_mb": peak / 2**20, "maps_held_mb": held / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pixel_auroc": result["pixel_auroc"], "auc_spro": result["auc_spro"],
            "spro_points": None if curves is None else len(curves.spro)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="test images in the category (default 200)")
    parser.add_argument("--height", type=int, default=750, help="map height (default 750)")
    parser.add_argument("--width", type=int, default=1000, help="map width (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic maps (default 0)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON goes")
    parser.add_argument("--real", type=Path, help="an MVTec-layout category: evaluate PatchCore's real maps")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # run one mode here, print its JSON
    parser.add_argument("--maps", type=Path, help=argparse.SUPPRESS)  # the real maps' folder, for --one
    parser.add_argument("--save-real", action="store_true", help=argparse.SUPPRESS)  # fit and save, in a child
    args = parser.parse_args()
    if args.save_real:
        print(save_real_maps(args.real.resolve(), args.maps))
        return
    if args.one:
        print(json.dumps(run_mode(args.one, args.images, args.height, args.width, args.seed, args.maps)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as folder:
        maps = None
        if args.real is not None:
            maps = Path(folder)  # fitted in a child: on Linux a child starts from its parent's peak RSS
            argv = [sys.executable, __file__, "--save-real", "--real", str(args.real), "--maps", str(maps)]
            output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            args.images = int(output.strip().splitlines()[-1])
        compare(args, maps)


def compare(args: argparse.Namespace, maps: Path | None) -> None:
    """Run every mode in its own interpreter; print the table and write the JSON."""

    rows = []
    for mode in args.modes.split(","):
        argv = [sys.executable, __file__, "--one", mode, "--images", str(args.images), "--height", str(args.height),
                "--width", str(args.width), "--seed", str(args.seed), *(["--maps", str(maps)] if maps else [])]
        output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{mode}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    reference = next((row for row in rows if row["mode"] == "whole"), rows[0])
    for row in rows:
        values = [row["pixel_auroc"], *row["auc_spro"].values()]
        expected = [reference["pixel_auroc"], *reference["auc_spro"].values()]
        row["max_abs_difference"] = max(abs(a - b) for a, b in zip(values, expected, strict=True))
        row["bitwise_equal"] = values == expected

    if maps is None:
        print(f"{args.images} maps of {args.height}x{args.width} float32, "
              f"{sum(1 for i in range(args.images) if i % 2)} defective\n")
    else:
        print(f"{args.real}: PatchCore's {args.images} full-resolution test maps\n")
    print("| path | time (s) | traced peak during evaluation (MB) | maps held by caller (MB) | peak RSS (MB) "
          "| pixel AUROC | AUC-sPRO@0.3 | max abs diff vs whole |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        same = "bitwise equal" if row["bitwise_equal"] else f"{row['max_abs_difference']:.1e}"
        print(f"| {row['mode']} | {row['seconds']:.1f} | {row['tracemalloc_peak_mb']:.0f} | {row['maps_held_mb']:.0f} "
              f"| {row['max_rss_mb']:.0f} | {row['pixel_auroc']:.6f} | {row['auc_spro']['0.3']:.6f} | {same} |")
    out = Path(args.json_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("bench_evaluation_memory.json" if maps is None else f"bench_evaluation_memory_{args.real.name}.json")
    path.write_text(json.dumps({"images": args.images, "height": args.height, "width": args.width, "seed": args.seed,
                                "real": None if maps is None else str(args.real), "rows": rows}, indent=2))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
