"""Benchmark the backbone runtimes (torch eager, onnxruntime, OpenVINO f32 / bf16) side by side.

Usage::

    .venv/bin/python benchmarks/bench_runtime.py [--data CATEGORY_DIR] [--out benchmarks/results]

Per runtime: ms/image of the BatchNorm-fused backbone alone at 256 px, batch 1 and 8, one torch thread
(every runtime timed in turn inside each repeat, in one process, so a shared machine's load hits them
alike; the median of the repeats is reported); the largest absolute difference and the smallest
per-layer cosine of its maps against torch's on the category's own images; and image AUROC and
AUC-sPRO@0.05 of PatchCore fitted and evaluated end to end with that runtime (default: MPDD metal_plate
from ``../shared/data/real``, else a synthetic category). The accuracy gate: both within 1e-3 of torch.
Prints a table and writes ``bench_runtime.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
DEFAULT_CATEGORY = REAL / "mpdd" / "metal_plate"
GATE = 1e-3


def synthetic_category(seed: int) -> Path:
    from fedinspect.data.synthetic import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="fedinspect-bench-")) / "small"
    generate_dataset(root, seed=seed, size="small", categories=["pipe_clip"], progress=False)
    return root / "pipe_clip"


def speed_and_agreement(dataset, runtimes: list[str], image_size: int, repeats: int, cache: Path) -> dict:
    """ms/image at batch 1 and 8 (median over interleaved repeats), max |diff| and min cosine vs torch."""
    from fedinspect.backbones import get_backbone, with_runtime
    from fedinspect.backbones.runtime import map_agreement
    from fedinspect.detectors.preprocessing import Letterbox

    extractor = get_backbone("efficientnet_lite0").fuse_batchnorm()
    letterbox = Letterbox(short_side=image_size, multiple=max(extractor.strides.values()))
    images = [dataset.load_image(s) for s in dataset.train[:8]]
    batch8 = torch.stack([letterbox(im) for im in images])
    batch1 = batch8[:1]
    models = {rt: with_runtime(extractor, rt, cache=cache) for rt in runtimes}
    out: dict[str, dict] = {rt: {} for rt in runtimes}
    with torch.no_grad():
        reference = extractor(batch8)
        for rt, model in models.items():
            start = time.perf_counter()
            maps = model(batch8)  # exports / loads the graph
            out[rt]["first_call_s"] = time.perf_counter() - start
            model(batch1)
            agreement = [map_agreement(reference[k].numpy(), maps[k].numpy()) for k in extractor.layers]
            out[rt]["max_abs_diff"] = max(d for d, _ in agreement)
            out[rt]["min_cosine"] = min(c for _, c in agreement)
            out[rt]["max_abs_value"] = max(float(reference[k].abs().max()) for k in extractor.layers)
        for name, batch in (("batch1", batch1), ("batch8", batch8)):
            times: dict[str, list[float]] = {rt: [] for rt in runtimes}
            for _ in range(repeats):
                for rt, model in models.items():
                    start = time.perf_counter()
                    model(batch)
                    times[rt].append((time.perf_counter() - start) * 1000 / len(batch))
            for rt in runtimes:
                out[rt][f"ms_per_image_{name}"] = float(np.median(times[rt]))
    return out


def accuracy(category: Path, runtimes: list[str], image_size: int, coreset_ratio: float) -> dict:
    """Image AUROC and AUC-sPRO@0.05 of PatchCore fitted and evaluated with each runtime."""
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.evaluation.metrics import auc_spro, image_auroc
    from fedinspect.pipeline import load_ground_truth

    dataset = CategoryDataset(category)
    _, regions = load_ground_truth(dataset, progress=False)
    labels = np.array([s.label for s in dataset.test], dtype=int)
    train = [dataset.load_image(s) for s in dataset.train]
    test = [dataset.load_image(s) for s in dataset.test]
    out = {}
    for rt in runtimes:
        start = time.perf_counter()
        model = PatchCore(image_size=image_size, coreset_ratio=coreset_ratio, runtime=rt).fit(train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores, maps = model.predict(test)
        predict_ms = (time.perf_counter() - start) * 1000 / len(test)
        out[rt] = {"image_auroc": image_auroc(labels, scores),
                   "auc_spro_0.05": auc_spro(maps, regions, limits=[0.05])["0.05"],
                   "fit_s": fit_s, "predict_ms_per_image": predict_ms}
        print(f"  {rt:14s} fitted and scored: {out[rt]}", flush=True)
    for rt in runtimes:
        d_auroc = abs(out[rt]["image_auroc"] - out["torch"]["image_auroc"])
        d_spro = abs(out[rt]["auc_spro_0.05"] - out["torch"]["auc_spro_0.05"])
        out[rt]["delta_image_auroc"] = d_auroc
        out[rt]["delta_auc_spro_0.05"] = d_spro
        out[rt]["gate_passed"] = bool(d_auroc <= GATE and d_spro <= GATE)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="category folder (default: real MPDD metal_plate)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--runtimes", nargs="*", default=["torch", "onnx", "openvino", "openvino-bf16"])
    parser.add_argument("--skip-accuracy", action="store_true", help="speed and map agreement only")
    args = parser.parse_args()
    if "torch" not in args.runtimes:
        args.runtimes.insert(0, "torch")

    from fedinspect.data.dataset import CategoryDataset

    torch.set_num_threads(1)
    category = args.data or (DEFAULT_CATEGORY if DEFAULT_CATEGORY.is_dir() else synthetic_category(0))
    cache = Path(tempfile.mkdtemp(prefix="fedinspect-runtime-cache-"))  # every export measured, none reused
    print(f"category {category}, {args.image_size} px, 1 torch thread, {args.repeats} repeats", flush=True)
    speed = speed_and_agreement(CategoryDataset(category), args.runtimes, args.image_size, args.repeats, cache)
    acc = {} if args.skip_accuracy else accuracy(category, args.runtimes, args.image_size, args.coreset_ratio)

    header = (f"{'runtime':14s} {'ms/img b1':>9s} {'ms/img b8':>9s} {'speed-up b8':>11s} {'max|diff|':>9s} "
              f"{'min cos':>9s} {'img AUROC':>9s} {'sPRO@.05':>9s} {'gate':>5s}")
    print(header)
    base = speed["torch"]["ms_per_image_batch8"]
    for rt in args.runtimes:
        s, a = speed[rt], acc.get(rt, {})
        gate = "" if not a else ("pass" if a["gate_passed"] else "FAIL")
        print(f"{rt:14s} {s['ms_per_image_batch1']:9.2f} {s['ms_per_image_batch8']:9.2f} "
              f"{base / s['ms_per_image_batch8']:10.2f}x {s['max_abs_diff']:9.2g} {s['min_cosine']:9.6f} "
              f"{a.get('image_auroc', float('nan')):9.4f} {a.get('auc_spro_0.05', float('nan')):9.4f} {gate:>5s}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"category": str(category), "image_size": args.image_size, "coreset_ratio": args.coreset_ratio,
              "torch_threads": 1, "repeats": args.repeats, "gate": GATE, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "machine": platform.machine(), "torch": torch.__version__,
              "speed": speed, "accuracy": acc}
    path = args.out / "bench_runtime.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
