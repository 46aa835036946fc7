"""Issue 16's speed and memory targets, today's path (torch eager, exact search) beside the new one.

Usage::

    .venv/bin/python benchmarks/bench_speed.py [--real ../shared/data/real] [--skip-federation]
        [--workdir /tmp/fedinspect-bench] [--out benchmarks/results]

1. PatchCore inference per stage at 256 px, on 1 and 2 threads (``--threads``), on the real metal plates (a
   bank of about 10,000 patches) and magnetic tiles (the 10% coreset, about 60,000): PNG decoding, letterbox
   resize, backbone, nearest-neighbour search, each timed alone, then end to end (``predict`` fed the PNG
   files one by one, so decoding overlaps the backbone as in ``evaluate``); "maps" is what end to end spends
   beyond the four stages (score maps, their resizing and smoothing, the exact maxima) less the overlap; for
   each pair (runtime, search) with the image AUROC and AUC-sPRO@0.05 beside it.
2. The ``full`` synthetic federation (AutoVI's counts, 1,523 training and 2,399 test images), 5 clients,
   default settings (centralized baseline and shared bank included), end to end in a subprocess each:
   wall time and peak memory (max RSS), today's path against the new defaults.
Prints the tables and writes ``bench_speed-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

print = functools.partial(print, flush=True)
ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"inference_ms_10k": 15.0, "inference_ms_tiles": 60.0, "federation_s": 300.0, "federation_peak_mb": 3000.0}
PATHS = {"today": {"runtime": "torch", "search": "exact"}, "new": {"runtime": "openvino", "search": "auto"}}

WORKER = r"""
import json, sys, time
from fedinspect.federation.client import RoundSettings
from fedinspect.federation.runner import FederationConfig, run_federation
from fedinspect.pipeline import peak_memory_mb
data, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
results = run_federation(data, out, FederationConfig(clients=5, settings=RoundSettings(**options)), progress=False)
print(json.dumps({"wall_s": time.perf_counter() - start, "peak_mb": peak_memory_mb(), "timing": results["timing"],
                  "image_auroc": results["mean"]["image_auroc"], "spro@0.05": results["mean"]["auc_spro"]["0.05"],
                  "centralized_image_auroc": results["centralized"]["mean"]["image_auroc"]}))
"""


def _same_shape(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``batch`` cut where the tensor shape changes."""
    runs: list[list[torch.Tensor]] = []
    for tensor in batch:
        if runs and runs[-1][0].shape == tensor.shape:
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
    return runs


def stages(category: Path, runtime: str, search: str, coreset_ratio: float) -> dict[str, Any]:
    """Per-stage ms/image of PatchCore on ``category``'s test split, and its accuracy."""
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.data.images import read_image
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.evaluation.protocol import score_predictions
    from fedinspect.pipeline import load_ground_truth

    dataset = CategoryDataset(category)
    model = PatchCore(runtime=runtime, search=search, coreset_ratio=coreset_ratio)
    model.fit(dataset.load_image(s) for s in dataset.train)
    paths = [s.image_path for s in dataset.test]
    n = len(paths)
    start = time.perf_counter()
    images = [read_image(p) for p in paths]
    decode = time.perf_counter() - start
    letterbox = model.letterbox
    start = time.perf_counter()
    tensors = [letterbox(image) for image in images]
    resize = time.perf_counter() - start
    batches = [[t for t in tensors[i:i + model.batch_size]] for i in range(0, n, model.batch_size)]
    batches = [b for batch in batches for b in _same_shape(batch)]  # as predict batches them
    for batch in batches:  # warm-up: an exported runtime compiles once per shape
        model.features(torch.stack(batch[:1]))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model.features(torch.stack(batch))
    backbone = time.perf_counter() - start
    grids = model.embed_grids(images, total=n)
    index = model._check_fitted()
    queries = np.concatenate([g.grid.reshape(-1, g.grid.shape[-1]) for g in grids])
    start = time.perf_counter()
    index.search(queries, k=1)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = model.predict((read_image(p) for p in paths), total=n)
    end_to_end = time.perf_counter() - start
    _, regions = load_ground_truth(dataset, progress=False)
    metrics = score_predictions(np.array([s.label for s in dataset.test]), scores, maps, regions)
    ms = 1000 / n
    return {"category": dataset.name, "threads": torch.get_num_threads(), "runtime": runtime, "search": search,
            "index": index.method,
            "bank": int(model.memory_bank_.shape[0]), "decode_ms": decode * ms, "resize_ms": resize * ms,
            "backbone_ms": backbone * ms, "search_ms": search_s * ms,
            "maps_ms": max(0.0, end_to_end - decode - resize - backbone - search_s) * ms,
            "end_to_end_ms": end_to_end * ms, "image_auroc": metrics["image_auroc"],
            "spro@0.05": metrics["auc_spro"]["0.05"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--threads", default="1,2", help="torch (and faiss, OpenVINO) threads for inference, "
                        "comma-separated")
    parser.add_argument("--paths", default="today,new", help="which paths to run, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fedinspect-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    unknown = sorted(set(args.paths.split(",")) - set(PATHS))
    if unknown:
        parser.error(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    paths = {name: PATHS[name] for name in args.paths.split(",")}
    report: dict[str, Any] = {"targets": TARGETS, "inference": [], "federation": {}}
    cases = [(args.real / "mpdd" / "metal_plate", 0.18), (args.real / "mtd" / "magnetic_tile", 0.1)]
    if not args.skip_inference:
        for category, ratio in cases:
            if not category.is_dir():
                print(f"skipped {category}: not found")
                continue
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for name, path in paths.items():
                    row = stages(category, path["runtime"], path["search"], ratio)
                    report["inference"].append({"path": name, **row})
                    print(json.dumps(report["inference"][-1]))
        print(f"\n{'category':<15}{'threads':>7} {'path':<7}{'bank':>7}{'index':>6}{'decode':>8}{'resize':>8}"
              f"{'backbone':>9}{'search':>8}{'maps':>7}{'total':>8}{'img AUROC':>10}{'sPRO.05':>9}   (ms/image)")
        for r in report["inference"]:
            print(f"{r['category']:<15}{r['threads']:>7} {r['path']:<7}{r['bank']:>7}{r['index']:>6}"
                  f"{r['decode_ms']:>8.1f}{r['resize_ms']:>8.1f}{r['backbone_ms']:>9.1f}{r['search_ms']:>8.1f}"
                  f"{r['maps_ms']:>7.1f}"
                  f"{r['end_to_end_ms']:>8.1f}{r['image_auroc']:>10.4f}{r['spro@0.05']:>9.4f}")
    if not args.skip_federation:
        from fedinspect.data.synthetic import generate_dataset

        data = generate_dataset(args.workdir / "synthetic-full", seed=0, size="full", progress=True)
        torch.set_num_threads(1)
        for name, path in paths.items():
            with tempfile.TemporaryDirectory() as out:
                done = subprocess.run([sys.executable, "-c", WORKER, str(data), out, json.dumps(path)],
                                      capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the {name} federation failed:\n{done.stderr[-3000:]}")
            report["federation"][name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, json.dumps(report["federation"][name]))
        print(f"\n{'path':<7}{'wall s':>8}{'peak MB':>9}{'features s':>11}{'evaluation s':>13}{'baseline s':>11}"
              f"{'img AUROC':>10}{'sPRO.05':>9}")
        for name, r in report["federation"].items():
            t = r["timing"]
            print(f"{name:<7}{r['wall_s']:>8.0f}{r['peak_mb']:>9.0f}{t['feature_extraction_s']:>11.0f}"
                  f"{t['evaluation_s']:>13.0f}{t['centralized_fit_s']:>11.0f}{r['image_auroc']:>10.4f}"
                  f"{r['spro@0.05']:>9.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}; targets: {TARGETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
