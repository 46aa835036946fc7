"""The commands of fedinspect as Python functions: fit a category, evaluate it, run the demo.

Each function reads data through :mod:`fedinspect.data`, drives a detector from
:mod:`fedinspect.detectors` and scores it with :mod:`fedinspect.evaluation`.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, Sample
from fedinspect.data.images import image_size
from fedinspect.data.regions import Region
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.evaluation import anomaly_maps
from fedinspect.evaluation.protocol import per_defect_image_auroc, score_predictions

RESULTS_FILE = "results.json"


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def _images(dataset: CategoryDataset, samples: list[Sample]) -> Iterator[np.ndarray]:
    for sample in samples:
        yield dataset.load_image(sample)


def fit_category(
    data_dir: str | Path, model_dir: str | Path | None = None, progress: bool = True, **params: Any
) -> PatchCore:
    """Fit PatchCore on a category's good training images; save it to ``model_dir`` if given."""
    dataset = CategoryDataset(data_dir)
    model = PatchCore(progress=progress, **params)
    start = time.perf_counter()
    model.fit(_images(dataset, dataset.train), total=len(dataset.train))
    model.fit_seconds_ = time.perf_counter() - start
    model.n_train_images_ = len(dataset.train)
    if model_dir is not None:
        model.save(model_dir)
    return model


def load_ground_truth(
    dataset: CategoryDataset, progress: bool = True
) -> tuple[list[tuple[int, int]], list[list[Region]]]:
    """Image sizes and defect regions of every test sample, read (and validated) before inference."""
    shapes, regions = [], []
    for sample in tqdm(dataset.test, desc="ground truth", unit="img", disable=not progress):
        shape = image_size(sample.image_path)
        shapes.append(shape)
        regions.append(dataset.load_regions(sample, shape) if sample.label else [])
    return shapes, regions


def evaluate_category(
    model: PatchCore | str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    write_maps: bool = True,
) -> dict[str, Any]:
    """Score a category's test split with the AutoVI protocol; write results.json and 16-bit maps.

    Returns the results dictionary (also written to ``out_dir/results.json`` when given).
    """
    if not isinstance(model, PatchCore):
        model = PatchCore.load(model, progress=progress)
    model.progress = progress
    dataset = CategoryDataset(data_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    shapes, regions = load_ground_truth(dataset, progress)
    timings["ground_truth_s"] = time.perf_counter() - start

    start = time.perf_counter()
    scores, maps = model.predict(_images(dataset, dataset.test), total=len(dataset.test))
    timings["inference_s"] = time.perf_counter() - start
    timings["inference_ms_per_image"] = 1000.0 * timings["inference_s"] / len(dataset.test)
    for sample, shape, anomaly_map in zip(dataset.test, shapes, maps, strict=True):
        if anomaly_map.shape != shape:  # a broken invariant, not bad data
            raise RuntimeError(f"{sample.image_path}: map {anomaly_map.shape} != image {shape}")

    start = time.perf_counter()
    labels = np.array([s.label for s in dataset.test])
    results: dict[str, Any] = {"category": dataset.name, "layout": dataset.layout}
    results.update(score_predictions(labels, scores, maps, regions))
    timings["metrics_s"] = time.perf_counter() - start

    low, high = anomaly_maps.score_range(maps)
    if out_dir is not None and write_maps:
        start = time.perf_counter()
        out_dir = Path(out_dir)
        anomaly_maps.write_maps([(out_dir / "maps" / sample.defect / f"{sample.stem}.png", anomaly_map)
                                 for sample, anomaly_map in zip(dataset.test, maps, strict=True)], low, high)
        timings["write_maps_s"] = time.perf_counter() - start

    results.update(
        {
            "counts": {
                "train": getattr(model, "n_train_images_", None),
                "test": len(dataset.test),
                "test_good": int((labels == 0).sum()),
                "test_defective": int(labels.sum()),
                "regions": sum(len(r) for r in regions),
                "memory_bank": int(model.memory_bank_.shape[0]),
            },
            "per_defect_image_auroc": per_defect_image_auroc(labels, scores, [s.defect for s in dataset.test]),
            "map_score_range": [low, high],
            "image_scores": {str(s.image_path.relative_to(dataset.root)): float(v)
                             for s, v in zip(dataset.test, scores, strict=True)},
            "timings": timings,
            "peak_memory_mb": peak_memory_mb(),
            "model": model.get_params(),
            "environment": _environment(),
        }
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results


def _environment() -> dict[str, Any]:
    return {
        "fedinspect": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
