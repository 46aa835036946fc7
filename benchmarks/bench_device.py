"""Trained detectors on the CPU against a CUDA GPU, side by side in one run (issue 16, `--device`).

Usage::

    .venv/bin/python benchmarks/bench_device.py [--data CATEGORY_DIR] [--detectors ae_mse,stfpm]
        [--epochs 5] [--image-size 256] [--weights LITE0_FILE] [--json-dir benchmarks/results]

For each detector and each device torch sees (``cpu``, and ``cuda`` when there is a GPU): fit for a fixed
number of epochs (no early stopping, no validation share) on the category's good training images, then
score its test split; prints seconds per epoch, ms per test image and image AUROC (which should agree
across devices up to float rounding), and writes ``bench_device.json``. Without ``--data`` it generates the
synthetic set's ``pipe_clip`` category at ``--synthetic-size`` (no real image needed). ``--weights``: the
EfficientNet-Lite0 file for the detectors with a pretrained teacher (default: the packaged one).
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

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.registry import detector_parameters, get_detector, set_device

print = functools.partial(print, flush=True)
ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, device: str, dataset: CategoryDataset, args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"image_size": args.image_size, "epochs": args.epochs, "patience": 0, "seed": 0}
    if "validation_fraction" in detector_parameters(name):
        params["validation_fraction"] = 0.0
    if args.weights and "weights" in detector_parameters(name):
        params["weights"] = args.weights
    model = set_device(get_detector(name, **params), device)
    train = [dataset.load_image(s) for s in dataset.train]
    test = [dataset.load_image(s) for s in dataset.test]
    labels = np.array([s.label for s in dataset.test])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.fit(train)
    if device == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    model.predict(test[:2])  # warm-up (kernels, allocator)
    start = time.perf_counter()
    scores, _ = model.predict(test)
    predict_s = time.perf_counter() - start
    return {"detector": name, "device": device, "epochs": len(model.history_), "train_images": len(train),
            "s_per_epoch": fit_s / max(1, len(model.history_)), "fit_s": fit_s,
            "ms_per_test_image": 1000 * predict_s / len(test), "image_auroc": float(roc_auc_score(labels, scores)),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="category folder (default: synthetic pipe_clip)")
    parser.add_argument("--detectors", default="ae_mse,stfpm", help="comma-separated trained detectors")
    parser.add_argument("--synthetic-size", default="small", help="size of the generated set without --data")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--weights", default=None, help="EfficientNet-Lite0 weights file (default: packaged)")
    parser.add_argument("--json-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    print(f"torch {torch.__version__}, devices {devices}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    with tempfile.TemporaryDirectory() as work:
        if args.data is None:
            from fedinspect.data.synthetic import generate_dataset

            root = generate_dataset(Path(work) / "synthetic", seed=0, size=args.synthetic_size,
                                    categories=["pipe_clip"], progress=False)
            args.data = root / "pipe_clip"
        dataset = CategoryDataset(args.data)
        rows = [measure(name.strip(), device, dataset, args) for name in args.detectors.split(",") if name.strip()
                for device in devices]
    print(f"\n{'detector':<22}{'device':<7}{'s/epoch':>9}{'ms/img':>9}{'img AUROC':>11}")
    for row in rows:
        print(f"{row['detector']:<22}{row['device']:<7}{row['s_per_epoch']:>9.2f}{row['ms_per_test_image']:>9.1f}"
              f"{row['image_auroc']:>11.4f}")
    args.json_dir.mkdir(parents=True, exist_ok=True)
    path = args.json_dir / "bench_device.json"
    path.write_text(json.dumps({"category": str(args.data), "rows": rows}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
