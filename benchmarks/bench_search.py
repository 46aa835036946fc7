"""Benchmark exact and approximate nearest-neighbour search on real PatchCore memory banks.

Usage::

    .venv/bin/python benchmarks/bench_search.py [--data CATEGORY_DIR] [--model-dir DIR] [--out benchmarks/results]

Fits PatchCore (EfficientNet-Lite0, 256 px, 10% coreset) on the category's good training images (the
MTD magnetic tiles by default: 617k patches, a 61,709-row bank of 152-d embeddings), or loads it from
``--model-dir``. Bank sizes 2K and 10K are seeded random subsets of that bank; "60K" is the whole bank.
Queries are the patch embeddings of a fixed sample of test images.

1. Speed and recall, torch and faiss on one thread, every method side by side in the same run: build
   time, milliseconds for one image's queries (searched one image at a time, and eight images at once as
   PatchCore batches them), and recall@1 against exact search (a tie at the exact distance counts as a hit).
2. Accuracy: the whole test split scored by PatchCore through each index (the detector's own index
   replaced inside this script only): image AUROC and AUC-sPRO@0.05 against exact search.

Prints both tables and writes one JSON file to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
DEFAULT_DATA = REAL / "mtd" / "magnetic_tile"
SIZES = (2_000, 10_000, 20_000, 40_000, 60_000)  # 60_000: the whole 61,709-row bank
SPEED_CONFIGS = [("exact", {}), ("ivf", {"nprobe": 8}), ("ivf", {"nprobe": 16}), ("ivf", {"nprobe": 32}),
                 ("hnsw", {"ef_search": 16}), ("hnsw", {"ef_search": 32}), ("hnsw", {"ef_search": 64})]
# (method, knobs, refine): refine = the image score's maximum patch distance made exact (refine_maximum)
ACCURACY_CONFIGS = [("exact", {}, False), ("ivf", {"nprobe": 16}, False), ("ivf", {"nprobe": 32}, False),
                    ("ivf", {"nprobe": 16}, True), ("hnsw", {"ef_search": 32}, False),
                    ("hnsw", {"ef_search": 32}, True)]


def label(method: str, knobs: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in knobs.items())


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def fitted_model(data: Path, model_dir: Path | None):
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.pipeline import fit_category

    if model_dir is not None and (model_dir / "patchcore.json").is_file():
        return PatchCore.load(model_dir), None
    start = time.perf_counter()
    model = fit_category(data, model_dir, progress=False, coreset_ratio=0.1)
    return model, time.perf_counter() - start


def sample_queries(model, dataset, n_images: int, seed: int) -> list[np.ndarray]:
    """Valid-patch embeddings (n_patches_i, D) of ``n_images`` test images drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(dataset.test), size=min(n_images, len(dataset.test)), replace=False))
    return model.embed_per_image(dataset.load_image(dataset.test[i]) for i in picked)


def hits(exact_d: np.ndarray, exact_i: np.ndarray, approx_d: np.ndarray, approx_i: np.ndarray) -> np.ndarray:
    """Queries whose approximate nearest neighbour is the exact one, or ties with it."""
    return (approx_i[:, 0] == exact_i[:, 0]) | (approx_d[:, 0] <= exact_d[:, 0] * (1 + 1e-5) + 1e-6)


def timed_search(index, per_image: list[np.ndarray], group: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Milliseconds per image when searching ``group`` images' queries at a time; (distances, indices)."""
    distances, indices = [], []
    start = time.perf_counter()
    for g in range(0, len(per_image), group):
        d, i = index.search(np.concatenate(per_image[g:g + group]), k=1)
        distances.append(d)
        indices.append(i)
    elapsed = time.perf_counter() - start
    return 1000.0 * elapsed / len(per_image), np.concatenate(distances), np.concatenate(indices)


def speed_table(bank: np.ndarray, per_image: list[np.ndarray], seed: int) -> list[dict]:
    from fedinspect.detectors.nearest_neighbours import NearestNeighbours

    rows = []
    rng = np.random.default_rng(seed)
    for size in SIZES:
        sub = bank if size >= len(bank) else bank[np.sort(rng.choice(len(bank), size=size, replace=False))]
        built: dict[str, tuple[NearestNeighbours, float]] = {}
        exact_d = exact_i = None
        for method, knobs in SPEED_CONFIGS:
            if method not in built:
                start = time.perf_counter()
                built[method] = (NearestNeighbours(sub, method=method, seed=seed), time.perf_counter() - start)
            index, build_s = built[method]
            for name, value in knobs.items():
                setattr(index, name, value)
            ms_single, d, i = timed_search(index, per_image, 1)
            ms_batch, _, i8 = timed_search(index, per_image, 8)
            if not (np.array_equal(i, i8) or method == "exact"):
                print(f"  note: {label(method, knobs)} gave other neighbours batched than one image at a time")
            if method == "exact":
                exact_d, exact_i = d, i
            start, offset = time.perf_counter(), 0
            for queries in per_image:
                index.refine_maximum(queries, d[offset:offset + len(queries)], i[offset:offset + len(queries)])
                offset += len(queries)
            refine_ms = 1000.0 * (time.perf_counter() - start) / len(per_image)
            row = {"bank": len(sub), "method": label(method, knobs), "build_s": build_s,
                   "ms_per_image": ms_single, "ms_per_image_batch8": ms_batch, "refine_max_ms": refine_ms,
                   "recall@1": float(hits(exact_d, exact_i, d, i).mean()),
                   "mean_distance_excess": float(np.mean(d[:, 0] - exact_d[:, 0]))}
            rows.append(row)
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    return rows


def _refining_image_score(model, index):
    """PatchCore's image score with the maximum patch distance made exact first (this benchmark only)."""
    from fedinspect.detectors.patchcore import PatchCore

    def image_score(patch_scores: np.ndarray, nearest: np.ndarray, features: np.ndarray) -> float:
        d, i = index.refine_maximum(features.reshape(-1, features.shape[-1]), patch_scores.reshape(-1, 1),
                                    nearest.reshape(-1, 1))
        return PatchCore._image_score(model, d.reshape(patch_scores.shape), i.reshape(nearest.shape), features)

    return image_score


def accuracy_table(model, dataset, seed: int) -> list[dict]:
    """Image AUROC and AUC-sPRO@0.05 of the test split, scored through each index (one embedding pass)."""
    from fedinspect.detectors.nearest_neighbours import NearestNeighbours
    from fedinspect.detectors.patchcore import _as_grids
    from fedinspect.evaluation.protocol import score_predictions
    from fedinspect.pipeline import load_ground_truth

    _, regions = load_ground_truth(dataset, progress=False)
    labels = np.array([s.label for s in dataset.test])
    bank = model.memory_bank_
    indexes, refined = {}, set()
    for method, knobs, refine in ACCURACY_CONFIGS:
        name = label(method, knobs) + (" + exact max" if refine else "")
        indexes[name] = NearestNeighbours(bank, method=method, seed=seed, **knobs)
        if refine:
            refined.add(name)
    scores: dict[str, list[float]] = {name: [] for name in indexes}
    maps: dict[str, list[np.ndarray]] = {name: [] for name in indexes}
    seconds = dict.fromkeys(indexes, 0.0)
    original, original_score = model._index, model._image_score
    images = (dataset.load_image(s) for s in dataset.test)
    try:
        for batch, embeddings in model._embed_batches(images, len(dataset.test), "scoring"):
            grids = _as_grids(batch, embeddings)
            for name, index in indexes.items():
                model._index = index
                model._image_score = _refining_image_score(model, index) if name in refined else original_score
                start = time.perf_counter()
                batch_scores, batch_maps = model.predict_embedded(grids)
                seconds[name] += time.perf_counter() - start
                scores[name].extend(batch_scores)
                maps[name].extend(batch_maps)
            done = len(scores[next(iter(indexes))])
            if done // 100 > (done - len(batch)) // 100:
                print(f"  {done} images: " + ", ".join(f"{name} {1000 * s / done:.0f} ms"
                                                      for name, s in seconds.items()), flush=True)
    finally:
        model._index, model._image_score = original, original_score
    rows = []
    for name in indexes:
        result = score_predictions(labels, np.asarray(scores[name]), maps[name], regions)
        rows.append({"method": name, "bank": len(bank), "image_auroc": result["image_auroc"],
                     "auc_spro@0.05": result["auc_spro"]["0.05"], "pixel_auroc": result["pixel_auroc"],
                     "scoring_ms_per_image": 1000.0 * seconds[name] / len(dataset.test)})
    exact = rows[0]
    for row in rows:
        row["d_image_auroc"] = row["image_auroc"] - exact["image_auroc"]
        row["d_auc_spro@0.05"] = row["auc_spro@0.05"] - exact["auc_spro@0.05"]
        row["within_1e-3"] = abs(row["d_image_auroc"]) <= 1e-3 and abs(row["d_auc_spro@0.05"]) <= 1e-3
    return rows


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="category folder (default: MTD magnetic_tile)")
    parser.add_argument("--model-dir", type=Path, help="load the fitted PatchCore from here, or save it here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--query-images", type=int, default=8, help="test images whose patches are the queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy-threads", type=int, default=1,
                        help="threads for the accuracy pass (its results do not depend on them)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()

    from fedinspect.data.dataset import CategoryDataset

    set_threads(1)
    dataset = CategoryDataset(args.data)
    model, fit_s = fitted_model(args.data, args.model_dir)
    bank = model.memory_bank_
    print(f"{dataset.name}: bank {bank.shape} from {model.n_train_patches_} patches"
          + (f", fitted in {fit_s:.0f} s" if fit_s is not None else ", loaded"), flush=True)
    per_image = sample_queries(model, dataset, args.query_images, args.seed)
    n_queries = [len(q) for q in per_image]
    print(f"queries: {len(per_image)} test images, {np.mean(n_queries):.0f} patches per image on average", flush=True)

    print("speed and recall (1 thread):", flush=True)
    speed = [] if args.skip_speed else speed_table(bank, per_image, args.seed)
    accuracy = []
    if not args.skip_accuracy:
        set_threads(args.accuracy_threads)
        print(f"accuracy on the {len(dataset.test)} test images ({args.accuracy_threads} threads):", flush=True)
        accuracy = accuracy_table(model, dataset, args.seed)
        set_threads(1)

    if speed:
        print()
        print_table(speed)
    if accuracy:
        print()
        print_table(accuracy)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench_search-{dataset.name}-{stamp}.json"
    path.write_text(json.dumps({
        "data": str(args.data), "bank_shape": list(bank.shape), "n_train_patches": model.n_train_patches_,
        "fit_s": fit_s, "query_images": len(per_image), "patches_per_image": float(np.mean(n_queries)),
        "threads": 1, "speed": speed, "accuracy": accuracy,
    }, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
