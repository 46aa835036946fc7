"""Benchmark the trained detectors' frozen teacher run by torch eager and by OpenVINO, side by side.

Usage::

    .venv/bin/python benchmarks/bench_trained_runtime.py [--data CATEGORY_DIR] [--epochs 2] [--out benchmarks/results]

For STFPM, reverse distillation and CFLOW, each fitted ``--epochs`` epochs with ``runtime="torch"`` and with
``runtime="openvino"`` (same seed, one torch thread) on the category's good training images (default: MPDD
metal_plate from ``../shared/data/real``; skipped when it is absent and no ``--data`` is given):

- teacher ms/image: the frozen teacher alone on a batch of 8 letterboxed training images, median of
  interleaved repeats (every runtime timed in turn inside each repeat, so a shared machine's load hits them
  alike); the first call (export and compile, or a cache hit) is reported apart, before any fit;
- agreement: the largest |difference| and smallest cosine of the teacher's maps to torch's
  (``check_teacher_runtime`` on 8 training images);
- fit seconds, scoring ms/image (``predict`` over the test split) and image AUROC.

Two trainings never give the same weights to the bit (Adam's first steps turn float-rounding differences of
near-zero gradients into +-lr steps, as another thread count would), so the AUROCs differ by training noise;
the maps of one trained network scored both ways agree to 1e-5 (tests/test_trained_runtime.py).
Prints a table and writes ``bench_trained_runtime.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
DEFAULT_CATEGORY = REAL / "mpdd" / "metal_plate"
DETECTORS = ("stfpm", "reverse_distillation", "cflow")
RUNTIMES = ("torch", "openvino")


def teacher_speed(name: str, images: list[np.ndarray], image_size: int, repeats: int) -> dict:
    """Per runtime: first-call seconds, median ms/image of the teacher on a batch of 8, agreement to torch."""
    from fedinspect.detectors.registry import get_detector

    models = {rt: get_detector(name, image_size=image_size, runtime=rt) for rt in RUNTIMES}
    with torch.random.fork_rng():
        module = models["torch"]._new_module()
    batch = torch.stack([models["torch"].letterbox(image) for image in images[:8]])
    out: dict[str, dict] = {rt: {} for rt in RUNTIMES}
    for rt, model in models.items():
        start = time.perf_counter()
        model._teacher_maps(module, batch)  # export / compile / compare on the first call of the shape
        out[rt]["first_call_s"] = time.perf_counter() - start
    times: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    for _ in range(repeats):
        for rt, model in models.items():
            start = time.perf_counter()
            model._teacher_maps(module, batch)
            times[rt].append((time.perf_counter() - start) * 1000 / len(batch))
    for rt in RUNTIMES:
        out[rt]["teacher_ms_per_image"] = float(np.median(times[rt]))
    worst = models["openvino"].check_teacher_runtime(images[:8])
    out["openvino"]["max_abs_diff"] = max(d for d, _ in worst.values())
    out["openvino"]["min_cosine"] = min(c for _, c in worst.values())
    return out


def fit_and_score(name: str, train: list[np.ndarray], test: list[np.ndarray], labels: np.ndarray,
                  image_size: int, epochs: int) -> dict:
    """Per runtime: fit seconds, scoring ms/image and image AUROC (same seed and settings)."""
    from fedinspect.detectors.registry import get_detector
    from fedinspect.evaluation.metrics import image_auroc

    out = {}
    for rt in RUNTIMES:
        model = get_detector(name, image_size=image_size, epochs=epochs, runtime=rt, seed=0)
        start = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores, _ = model.predict(test)
        score_ms = (time.perf_counter() - start) * 1000 / len(test)
        out[rt] = {"fit_s": fit_s, "score_ms_per_image": score_ms, "image_auroc": image_auroc(labels, scores),
                   "epochs_run": len(model.history_)}
        print(f"  {name} {rt:8s} fit {fit_s:.1f} s, scoring {score_ms:.1f} ms/img, "
              f"image AUROC {out[rt]['image_auroc']:.4f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="category folder (default: real MPDD metal_plate)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--detectors", nargs="*", default=list(DETECTORS), choices=DETECTORS)
    args = parser.parse_args()
    category = args.data or DEFAULT_CATEGORY
    if not category.is_dir():
        print(f"skipped: {category} is absent (give --data CATEGORY_DIR)", file=sys.stderr)
        return 0

    from fedinspect.data.dataset import CategoryDataset

    torch.set_num_threads(1)
    dataset = CategoryDataset(category)
    train = [dataset.load_image(s) for s in dataset.train]
    test = [dataset.load_image(s) for s in dataset.test]
    labels = np.array([s.label for s in dataset.test], dtype=int)
    print(f"category {category}: {len(train)} train, {len(test)} test images, {args.image_size} px, "
          f"{args.epochs} epochs, 1 torch thread, load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict] = {}
    for name in args.detectors:
        speed = teacher_speed(name, train, args.image_size, args.repeats)
        accuracy = fit_and_score(name, train, test, labels, args.image_size, args.epochs)
        results[name] = {rt: {**speed[rt], **accuracy[rt]} for rt in RUNTIMES}

    print(f"{'detector':21s} {'runtime':8s} {'teacher ms':>10s} {'x':>5s} {'fit s':>7s} {'x':>5s} "
          f"{'score ms':>8s} {'x':>5s} {'img AUROC':>9s} {'dAUROC':>7s} {'max|diff|':>9s} {'min cos':>9s}")
    for name, by_runtime in results.items():
        base = by_runtime["torch"]
        for rt, r in by_runtime.items():
            print(f"{name:21s} {rt:8s} {r['teacher_ms_per_image']:10.2f} "
                  f"{base['teacher_ms_per_image'] / r['teacher_ms_per_image']:4.2f}x {r['fit_s']:7.1f} "
                  f"{base['fit_s'] / r['fit_s']:4.2f}x {r['score_ms_per_image']:8.1f} "
                  f"{base['score_ms_per_image'] / r['score_ms_per_image']:4.2f}x {r['image_auroc']:9.4f} "
                  f"{r['image_auroc'] - base['image_auroc']:+7.4f} {r.get('max_abs_diff', 0.0):9.2g} "
                  f"{r.get('min_cosine', 1.0):9.6f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"category": str(category), "image_size": args.image_size, "epochs": args.epochs,
              "torch_threads": 1, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "machine": platform.machine(), "torch": torch.__version__,
              "results": results}
    path = args.out / "bench_trained_runtime.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
