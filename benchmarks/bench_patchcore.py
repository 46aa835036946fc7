"""Benchmark PatchCore fit and inference against the targets of the foundation issue.

Usage::

    .venv/bin/python benchmarks/bench_patchcore.py [--data CATEGORY_DIR ...] [--out benchmarks/results]

Without --data it runs on the real MPDD metal plate and MTD magnetic tile from
``../shared/data/real`` when present, otherwise on a synthetic category. Prints a table and
writes one JSON file per run. Each category runs in a fresh subprocess so that peak memory
(max resident set size) is measured per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
DEFAULT_CATEGORIES = [REAL / "mpdd" / "metal_plate", REAL / "mtd" / "magnetic_tile"]

# anomalib 2.7 PatchCore on MPDD metal_plate, same backbone and weights, 256 px, 10% coreset, 2 cores
REFERENCE = {"image_auroc": 0.995, "pixel_auroc": 0.989, "aupro": 0.925, "fit_s": 117.0,
             "inference_ms": 57.0, "peak_mb": 1800.0}
TARGET = {"fit_s": REFERENCE["fit_s"] / 10, "inference_ms": 30.0}

WORKER = r"""
import json, sys, time
from fedinspect.pipeline import fit_category, evaluate_category, peak_memory_mb
data, out, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
model = fit_category(data, None, progress=False, **params)
fit_s = time.perf_counter() - start
results = evaluate_category(model, data, out, progress=False, write_maps=False)
results["timings"]["fit_s"] = fit_s
results["peak_memory_mb"] = peak_memory_mb()
results["n_train_patches"] = model.n_train_patches_
print(json.dumps(results))
"""


def run_one(category: Path, params: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(category), out, json.dumps(params)],
            capture_output=True, text=True, check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {category} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_category(seed: int) -> Path:
    from fedinspect.data.synthetic import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="fedinspect-bench-")) / "small"
    generate_dataset(root, seed=seed, size="small", categories=["pipe_clip"], progress=False)
    return root / "pipe_clip"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", type=Path, help="category folders (default: real MPDD and MTD)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    categories = args.data or [c for c in DEFAULT_CATEGORIES if c.is_dir()] or [synthetic_category(0)]
    params = {"backbone": args.backbone, "image_size": args.image_size, "coreset_ratio": args.coreset_ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in categories:
        start = time.perf_counter()
        results = run_one(category, params)
        wall = time.perf_counter() - start
        spro = results["auc_spro"] or {}
        row = {
            "category": f"{category.parent.name}/{category.name}",
            "train": results["counts"]["train"], "test": results["counts"]["test"],
            "patches": results["n_train_patches"], "bank": results["counts"]["memory_bank"],
            "image_auroc": results["image_auroc"], "pixel_auroc": results["pixel_auroc"],
            "spro@0.05": spro.get("0.05"), "spro@0.3 (AUPRO)": spro.get("0.3"),
            "fit_s": results["timings"]["fit_s"],
            "inference_ms": results["timings"]["inference_ms_per_image"],
            "metrics_s": results["timings"]["metrics_s"],
            "peak_mb": results["peak_memory_mb"], "wall_s": wall,
        }
        rows.append(row)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"patchcore-{category.name}-{stamp}.json").write_text(
            json.dumps({"row": row, "params": params, "reference_anomalib_mpdd": REFERENCE, "targets": TARGET,
                        "results": results}, indent=2)
        )

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    print(
        f"\nreference (anomalib 2.7 PatchCore, MPDD metal_plate): image AUROC {REFERENCE['image_auroc']}, "
        f"pixel AUROC {REFERENCE['pixel_auroc']}, AUPRO {REFERENCE['aupro']}, fit {REFERENCE['fit_s']} s, "
        f"{REFERENCE['inference_ms']} ms/image, ~{REFERENCE['peak_mb']:.0f} MB"
    )
    print(f"targets: fit <= {TARGET['fit_s']:.1f} s, inference <= {TARGET['inference_ms']:.0f} ms/image, "
          "accuracy >= reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
