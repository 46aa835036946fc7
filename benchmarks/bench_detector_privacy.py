"""Benchmark differential privacy of federated PaDiM's statistics on the real magnetic tiles (issue 15).

Usage::

    .venv/bin/python benchmarks/bench_detector_privacy.py [--data DIR] [--public DIR] [--clients 5]
        [--epsilons 1,5,10,none] [--modes distributed,local] [--image-size 128] [--n-features 100]
        [--out runs/bench_detector_privacy] [--json-dir benchmarks/results]

Federates PaDiM on ``--clients`` IID clients at each budget, with each client adding its share of one
release's noise (``distributed``, whose guarantee needs secure aggregation) or all of it (``local``), and
reports image AUROC, AUC-sPRO@0.05 and the black-box membership attack (AUC of telling the training images
from unseen good test images by the released model's scores; 0.5 = chance). The unit protected is one
training image of one client. The clip norm follows a public rule on a public dataset (``--public``,
another product: the metal plates): sqrt(grid positions) x the median per-position feature norm there.
The project's goal (image-level epsilon <= 1 costing at most 3 points of image AUROC) is checked per row.
PatchCore's image-level DP on the same tiles (README 'Privacy') is printed beside it for reference.
Writes ``bench_detector_privacy.json``; every run folder is kept under ``--out`` and reused.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.padim import Padim
from fedinspect.detectors.registry import load_detector
from fedinspect.federation.detector_task import DetectorFederationConfig, run_detector_federation
from fedinspect.privacy.membership import score_membership_auc

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
# PatchCore with image-level DP on the same tiles, 5 IID clients, 128 px (README 'Privacy', privacy-study)
PATCHCORE = {"none": (0.907, 0.271, 1.000), "1": (0.576, 0.122, 0.529), "5": (0.639, 0.241, 0.434),
             "10": (0.645, 0.237, 0.470)}


def public_clip_norm(public: Path, image_size: int, n_features: int, images: int = 40) -> float:
    """sqrt(P) x the median per-position norm of the selected features on ``images`` public images."""
    dataset = CategoryDataset(public)
    model = Padim(image_size=image_size, n_features=n_features, keep_aspect_ratio=False)
    channels = torch.from_numpy(model.channels)
    norms = []
    for sample in dataset.train[:images]:
        features = model.features(model.letterbox(dataset.load_image(sample))[None])[:, channels].flatten(2)[0]
        norms.append(features.norm(dim=0).numpy())
    positions = norms[0].size
    return float(math.sqrt(positions) * np.median(np.concatenate(norms)))


def run_or_reuse(data: Path, out: Path, config: DetectorFederationConfig) -> dict[str, Any]:
    results_file = out / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        if results.get("config") == config.to_dict():
            print(f"reusing {out}")
            return results
    print(f"running {out.name}")
    return run_detector_federation(data, out, config, progress=False)


def membership(data: Path, run: Path) -> float:
    dataset = CategoryDataset(data)
    model = load_detector(run / "models" / dataset.name)
    members = model.score_samples([dataset.load_image(s) for s in dataset.train])
    non_members = model.score_samples([dataset.load_image(s) for s in dataset.test if s.label == 0])
    return score_membership_auc(members, non_members)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL / "mtd" / "magnetic_tile"))
    parser.add_argument("--public", default=str(REAL / "mpdd" / "metal_plate"),
                        help="a public dataset (another product) for the clip norm's rule")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epsilons", default="none,1,5,10")
    parser.add_argument("--modes", default="distributed,local")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_detector_privacy"))
    parser.add_argument("--json-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, public = Path(args.data), Path(args.public)
    if not (data / "train").is_dir() or not (public / "train").is_dir():
        print(f"skipped: no category folder at {data} or {public}")
        return 0
    clip = public_clip_norm(public, args.image_size, args.n_features)
    print(f"clip norm {clip:.1f} (public rule on {public.name})")
    params = {"image_size": args.image_size, "n_features": args.n_features, "keep_aspect_ratio": False}
    out = Path(args.out)
    rows = []
    baseline = None
    for epsilon in args.epsilons.split(","):
        modes = [""] if epsilon == "none" else args.modes.split(",")
        for mode in modes:
            privacy = {} if epsilon == "none" else {"epsilon": float(epsilon), "clip_norm": clip, "mode": mode}
            config = DetectorFederationConfig(detector="padim", params=params, clients=args.clients,
                                              centralized=False, privacy=privacy)
            name = f"padim_{args.image_size}px_k{args.n_features}_eps_{epsilon}{'_' + mode if mode else ''}"
            results = run_or_reuse(data, out / name, config)
            category = results["categories"][data.name]
            row = {"epsilon": epsilon, "mode": mode or "none", "image_auroc": category["image_auroc"],
                   "spro_0.05": category["auc_spro"]["0.05"], "membership_auc": membership(data, out / name),
                   "achieved_epsilon": (results.get("privacy") or {}).get("epsilon")}
            if epsilon == "none":
                baseline = row["image_auroc"]
            row["cost_points"] = None if baseline is None else 100 * (baseline - row["image_auroc"])
            row["goal_met"] = (epsilon != "none" and float(epsilon) <= 1 and row["cost_points"] is not None
                               and row["cost_points"] <= 3)
            rows.append(row)
    print(f"\n{data.name}, {args.clients} IID clients, PaDiM {args.image_size} px, k {args.n_features}, "
          f"clip {clip:.0f}")
    print("epsilon | noise | image AUROC | AUC-sPRO@0.05 | membership AUC | cost (pt) || PatchCore image-DP: "
          "AUROC / sPRO@0.05 / membership")
    for row in rows:
        reference = PATCHCORE.get(row["epsilon"])
        print(f"{row['epsilon']} | {row['mode']} | {row['image_auroc']:.3f} | {row['spro_0.05']:.3f} | "
              f"{row['membership_auc']:.3f} | {row['cost_points'] or 0:.1f} || "
              + (" / ".join(f"{v:.3f}" for v in reference) if reference else "n/a"))
    summary = {"data": str(data), "clip_norm": clip, "params": params, "clients": args.clients, "rows": rows,
               "patchcore_reference": PATCHCORE}
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "bench_detector_privacy.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {json_dir / 'bench_detector_privacy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
