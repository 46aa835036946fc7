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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, Sample
from fedinspect.data.images import image_size
from fedinspect.data.regions import Region
from fedinspect.detectors.padim import GridMismatchError
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.detectors.registry import Detector, detector_name, get_detector, load_detector
from fedinspect.errors import DataError
from fedinspect.evaluation import anomaly_maps
from fedinspect.evaluation.protocol import per_defect_image_auroc, score_predictions
from fedinspect.run_folder import staged_output

RESULTS_FILE = "results.json"


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def _naming_the_image(dataset: CategoryDataset, samples: list[Sample], run: Callable[[Iterator[np.ndarray]], Any]):
    """``run(images)``, an image a detector refuses (PaDiM: another grid) becoming a DataError naming its file."""
    current: list[Path] = []

    def images() -> Iterator[np.ndarray]:
        for sample in samples:
            current[:] = [sample.image_path]
            yield dataset.load_image(sample)

    try:
        return run(images())
    except GridMismatchError as error:  # raised as the image is read, so `current` is the image at fault
        raise DataError(current[0], str(error)) from error


def fit_category(
    data_dir: str | Path, model_dir: str | Path | None = None, progress: bool = True, detector: str = "patchcore",
    **params: Any,
) -> Detector:
    """Fit a detector (by registry name) on a category's good training images; save it to ``model_dir`` if given.

    ``model_dir`` is locked for the whole fit and written all at once (:func:`staged_output`): a
    failed fit leaves a previous model there untouched, and a second fit into it at the same time fails.
    """
    model = get_detector(detector, progress=progress, **params)  # settings checked before the data are read
    dataset = CategoryDataset(data_dir)
    if model_dir is None:
        return _fit(model, dataset)
    with staged_output(model_dir, inputs=[data_dir]) as staging:
        _fit(model, dataset).save(staging)
    return model


def _fit(model: Detector, dataset: CategoryDataset) -> Detector:
    start = time.perf_counter()
    _naming_the_image(dataset, dataset.train, lambda images: model.fit(images, total=len(dataset.train)))
    model.fit_seconds_ = time.perf_counter() - start
    model.n_train_images_ = len(dataset.train)
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
    model: Detector | str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    write_maps: bool = True,
    weights: str | Path | None = None,
) -> dict[str, Any]:
    """Score a category's test split with the AutoVI protocol; write results.json and 16-bit maps.

    Returns the results dictionary (also written to ``out_dir/results.json`` when given). ``out_dir``
    is written all at once and replaces a previous evaluation there (no old maps stay beside new
    results); a failure leaves it untouched. ``weights``: the backbone's weights file, for a model
    folder (which names none); it must be the file the model was fitted with.
    """
    if out_dir is None:
        return _evaluate(model, data_dir, None, progress, write_maps, weights)
    inputs = [data_dir, model] if isinstance(model, str | Path) else [data_dir]
    with staged_output(out_dir, inputs=inputs) as staging:
        return _evaluate(model, data_dir, staging, progress, write_maps, weights)


def _evaluate(model: Detector | str | Path, data_dir: str | Path, out_dir: Path | None, progress: bool,
              write_maps: bool, weights: str | Path | None) -> dict[str, Any]:
    if isinstance(model, str | Path):
        model = load_detector(model, weights=weights, progress=progress)
    model.progress = progress
    dataset = CategoryDataset(data_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    shapes, regions = load_ground_truth(dataset, progress)
    timings["ground_truth_s"] = time.perf_counter() - start

    start = time.perf_counter()
    scores, maps = _naming_the_image(dataset, dataset.test,
                                     lambda images: model.predict(images, total=len(dataset.test)))
    timings["inference_s"] = time.perf_counter() - start
    timings["inference_ms_per_image"] = 1000.0 * timings["inference_s"] / len(dataset.test)
    for sample, shape, anomaly_map in zip(dataset.test, shapes, maps, strict=True):
        if anomaly_map.shape != shape:  # a broken invariant, not bad data
            raise RuntimeError(f"{sample.image_path}: map {anomaly_map.shape} != image {shape}")

    start = time.perf_counter()
    labels = np.array([s.label for s in dataset.test])
    results: dict[str, Any] = {"category": dataset.name, "layout": dataset.layout, "detector": detector_name(model)}
    results.update(score_predictions(labels, scores, maps, regions))
    timings["metrics_s"] = time.perf_counter() - start

    low, high = anomaly_maps.score_range(maps)
    if out_dir is not None and write_maps:
        start = time.perf_counter()
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
                "memory_bank": int(model.memory_bank_.shape[0]) if isinstance(model, PatchCore) else None,
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
