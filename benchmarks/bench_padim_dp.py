"""Federated PaDiM in one round, without and with image-level differential privacy, on real images.

Usage::

    .venv/bin/python benchmarks/bench_padim_dp.py [--data ../shared/data/real/mpdd/metal_plate]
        [--public ../shared/data/real/mtd/magnetic_tile] [--clients 5] [--image-size 128] [--seeds 3]
        [--out runs/bench_padim_dp]

1. The training images are split IID over ``--clients`` clients (``partition``, seed 0). PaDiM is fitted
   centrally and from the sum of the clients' statistics: the max abs difference of test image scores.
2. Each client clips every image's (P, k) feature block to ``C`` and adds Gaussian noise
   (:mod:`fedinspect.privacy.statistics_dp`), distributed (the sum carries one release's noise) or
   local (each client the full noise); the server adds the releases and post-processes them into
   Gaussians. Image AUROC (good = 0, defective = 1) at epsilon 1, 5, 10 (delta 1e-5), over ``--seeds``
   noise draws; "clip only" is clipping without noise.

Clip norm: a public rule on a public set, never on the clients' images. ``C = sqrt(P) * median patch
norm``, where the median is over every feature-grid position of the selected channels of the
``--public`` images (a different dataset: the magnetic tiles for the metal plates) and P is the number
of grid positions of the private category (public: it follows from the image shape). An image whose
patches have the public median norm is then exactly at ``C``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.padim import Padim, PadimStatistics
from fedinspect.federation.partition import partition
from fedinspect.privacy.statistics_dp import StatisticsPrivacy, add_noise, set_noisy_statistics

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
EPSILONS = (1.0, 5.0, 10.0)
DELTA = 1e-5


def public_patch_norm(detector: Padim, images: list[np.ndarray]) -> float:
    """Median L2 norm of the selected channels at every grid position of ``images`` (each its own grid)."""
    channels = torch.from_numpy(detector.channels)
    norms = []
    with torch.no_grad():
        for image in images:
            features = detector.features(detector.letterbox(image)[None])[:, channels]  # (1, k, h, w)
            norms.append(features.double().norm(dim=1).flatten().numpy())
    return float(np.median(np.concatenate(norms)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL / "mpdd" / "metal_plate"))
    parser.add_argument("--public", default=str(REAL / "mtd" / "magnetic_tile"),
                        help="public images for the clip norm (a dataset the clients do not hold)")
    parser.add_argument("--public-images", type=int, default=40)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="noise draws per DP setting")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_padim_dp"))
    args = parser.parse_args()
    start = time.perf_counter()

    data = CategoryDataset(args.data)
    train = [data.load_image(s) for s in data.train]
    test = [data.load_image(s) for s in data.test]
    labels = np.array([s.label for s in data.test])
    split = partition([data.name] * len(train), args.clients, "iid", seed=0)
    clients = [[train[i] for i in indices] for indices in split.assignments]

    def detector() -> Padim:
        return Padim(image_size=args.image_size, n_features=args.n_features, seed=0)

    central = detector().fit(train)
    central_scores = central.score_samples(test)
    client_model = detector()
    summed = sum((client_model.statistics(images) for images in clients[1:]), client_model.statistics(clients[0]))
    federated = detector().set_statistics(summed.count, summed.sum, summed.sum_outer, summed.grid_shape)
    federated_scores = federated.score_samples(test)
    max_diff = float(np.abs(federated_scores - central_scores).max())
    cov_diff = float(np.abs(federated.covariance_ - central.covariance_).max())  # float64, before float32 scoring
    grid = summed.grid_shape
    positions = grid[0] * grid[1]

    public = CategoryDataset(args.public)
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(public.train), size=min(args.public_images, len(public.train)), replace=False)
    median_patch = public_patch_norm(client_model, [public.load_image(public.train[i]) for i in sorted(chosen)])
    clip = float(np.sqrt(positions) * median_patch)
    clipped = [client_model.statistics(images, clip_norm=clip) for images in clients]
    clipped_count = sum(s.clipped for s in clipped)

    rows = [{"setting": "central", "epsilon": None, "auroc": [float(roc_auc_score(labels, central_scores))]},
            {"setting": "federated (sum)", "epsilon": None,
             "auroc": [float(roc_auc_score(labels, federated_scores))]}]
    clip_sum = sum(clipped[1:], clipped[0])
    clip_model = detector().set_statistics(clip_sum.count, clip_sum.sum, clip_sum.sum_outer, grid, clip)
    rows.append({"setting": "clip only", "epsilon": None,
                 "auroc": [float(roc_auc_score(labels, clip_model.score_samples(test)))]})
    privacy_reports = {}
    for mode in ("distributed", "local"):
        for target in EPSILONS:
            privacy = StatisticsPrivacy(clip_norm=clip, epsilon=target, delta=DELTA, mode=mode)
            privacy_reports[f"{mode}/{target:g}"] = privacy.report(args.clients)
            aurocs = []
            for seed in range(args.seeds):
                shares = [add_noise(s, privacy, args.clients, seed=1000 * seed + c) for c, s in enumerate(clipped)]
                noisy: PadimStatistics = sum(shares[1:], shares[0])
                model = set_noisy_statistics(detector(), noisy)
                aurocs.append(float(roc_auc_score(labels, model.score_samples(test))))
            rows.append({"setting": f"DP {mode}", "epsilon": privacy.resolved_epsilon(), "target_epsilon": target,
                         "noise_multiplier": privacy.resolved_noise_multiplier(), "auroc": aurocs})

    wall = time.perf_counter() - start
    print(f"{data.name}: {len(train)} training images over {args.clients} clients "
          f"({[len(c) for c in clients]}), {len(test)} test ({int(labels.sum())} defective); "
          f"image size {args.image_size}, grid {grid[0]}x{grid[1]}, k = {args.n_features}")
    print(f"central vs summed client statistics: max |score difference| = {max_diff:.2e} "
          f"(max |covariance difference| in float64: {cov_diff:.2e})")
    print(f"clip norm C = sqrt({positions}) x {median_patch:.3f} (median patch norm of {len(chosen)} public "
          f"{public.name} images) = {clip:.1f}; {clipped_count} of {len(train)} training images clipped")
    print(f"{'setting':<18}{'epsilon':>9}{'z':>8}  AUROC (mean +- std over noise draws)")
    for row in rows:
        eps = "" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        z = f"{row['noise_multiplier']:.2f}" if "noise_multiplier" in row else ""
        values = np.array(row["auroc"])
        spread = f" +- {values.std():.3f}" if len(values) > 1 else ""
        print(f"{row['setting']:<18}{eps:>9}{z:>8}  {values.mean():.3f}{spread}")
    print(f"{wall:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"data": str(args.data), "public": str(args.public), "clients": args.clients,
               "client_sizes": [len(c) for c in clients], "image_size": args.image_size,
               "n_features": args.n_features, "grid_shape": list(grid), "test_images": len(test),
               "defective": int(labels.sum()), "max_abs_score_difference": max_diff,
               "max_abs_covariance_difference": cov_diff,
               "clip_norm": clip, "public_median_patch_norm": median_patch, "clipped_images": clipped_count,
               "delta": DELTA, "seeds": args.seeds, "rows": rows, "privacy": privacy_reports, "wall_s": wall}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"JSON in {out / 'results.json'}")


if __name__ == "__main__":
    main()
