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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, Sample
from fedinspect.data.images import image_size, read_image
from fedinspect.data.regions import Region
from fedinspect.detectors.padim import GridMismatchError
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.detectors.registry import Detector, detector_name, get_detector, load_detector, set_device
from fedinspect.detectors.trained_detector import TrainedDetector
from fedinspect.errors import DataError, SettingsError
from fedinspect.evaluation import anomaly_maps
from fedinspect.evaluation.category_report import write_category_report
from fedinspect.evaluation.plots import plot_thresholds
from fedinspect.evaluation.protocol import per_defect_image_auroc, score_predictions, union_mask
from fedinspect.evaluation.report import Example
from fedinspect.evaluation.synthetic_thresholds import (
    SyntheticThresholds,
    choose_synthetic_thresholds,
    compare_thresholds,
    draw_synthetic_defects,
)
from fedinspect.evaluation.thresholds import (
    best_f1_image_threshold,
    best_f1_pixel_threshold,
    percentile_threshold,
    threshold_metrics,
    threshold_protocol,
    threshold_split,
    train_shares,
)
from fedinspect.run_folder import staged_output

RESULTS_FILE = "results.json"
THRESHOLD_FIGURE = "thresholds.png"


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def _naming_the_image(dataset: CategoryDataset, samples: list[Sample], run: Callable[[Iterator[np.ndarray]], Any]):
    """``run(images)``, an image a detector refuses (PaDiM: another grid) becoming a DataError naming its file."""
    return _naming_the_images([(dataset, samples)], run)


def _naming_the_images(parts: list[tuple[CategoryDataset, list[Sample]]], run: Callable[[Iterator[np.ndarray]], Any]):
    """:func:`_naming_the_image` over the samples of several datasets, read one by one in order."""
    current: list[Path] = []

    def images() -> Iterator[np.ndarray]:
        for dataset, samples in parts:
            for sample in samples:
                current[:] = [sample.image_path]
                yield dataset.load_image(sample)

    try:
        return run(images())
    except GridMismatchError as error:  # raised as the image is read, so `current` is the image at fault
        raise DataError(current[0], str(error)) from error


def fit_category(
    data_dir: str | Path, model_dir: str | Path | None = None, progress: bool = True, detector: str = "patchcore",
    hold_out_t1: bool = False, split_seed: int = 0, device: str = "auto", **params: Any,
) -> Detector:
    """Fit a detector (by registry name) on a category's good training images; save it to ``model_dir`` if given.

    ``hold_out_t1``: leave out the T1 share of the training images (15%, drawn with ``split_seed``; see
    :func:`~fedinspect.evaluation.thresholds.train_shares`) so that T1 is later estimated on unseen good
    images, as seed 004's protocol does. ``device``: where a trained detector trains (:func:`set_device`).
    ``model_dir`` is locked for the whole fit and written all at
    once (:func:`staged_output`): a failed fit leaves a previous model there untouched, and a second fit
    into it at the same time fails.
    """
    model = get_detector(detector, progress=progress, **params)  # settings checked before the data are read
    set_device(model, device)
    dataset = CategoryDataset(data_dir)
    samples = dataset.train
    if hold_out_t1:
        fit, validation, _ = train_shares(len(samples), split_seed)
        samples = [samples[i] for i in sorted([*fit, *validation])]
    model.t1_held_out_ = hold_out_t1  # read by evaluate_category on this object (a saved model does not keep it)
    if model_dir is None:
        return _fit(model, dataset, samples)
    with staged_output(model_dir, inputs=[data_dir]) as staging:
        _fit(model, dataset, samples).save(staging)
    return model


def _fit(model: Detector, dataset: CategoryDataset, samples: list[Sample]) -> Detector:
    return fit_on_samples(model, [(dataset, samples)])


def fit_on_samples(model: Detector, parts: list[tuple[CategoryDataset, list[Sample]]]) -> Detector:
    """Fit ``model`` on the given samples of one or several datasets (read one by one, in order).

    A file a detector refuses becomes a DataError naming it (see :func:`_naming_the_image`).
    """
    start = time.perf_counter()
    total = sum(len(samples) for _, samples in parts)
    _naming_the_images(parts, lambda images: model.fit(images, total=total))
    model.fit_seconds_ = time.perf_counter() - start
    model.n_train_images_ = total
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


@dataclass(frozen=True)
class ThresholdOptions:
    """How ``evaluate`` chooses and reports the operating thresholds T1-T3 (seed 004's protocol).

    ``percentile``: T1 is this percentile of the good pixels of the T1 share of the training images.
    ``split_seed``: draws the shares (:func:`~fedinspect.evaluation.thresholds.threshold_split`).
    ``t1_held_out``: whether the model was fitted without the T1 share (``fit_category(hold_out_t1=True)``);
    only recorded, since ``fedinspect fit`` uses every training image and T1 then sits on seen images.
    ``given``: thresholds chosen elsewhere (the training dataset's, when testing on another one).
    ``figure_examples``: test images in the threshold figure (0: no figure).
    ``synthetic_validation``: an offline defect generator (``perlin``, ``cutpaste``, ``cutpaste_scar``,
    ``memseg``): T2 and T3 are then chosen on its defects drawn into the good images of the T1 share of the
    training images (seeded with ``split_seed``; ``synthetic_copies`` defects per image), and the real-chosen
    ones are reported beside them where the test images have defects.
    (:mod:`fedinspect.evaluation.synthetic_thresholds`). None: the seed's protocol on the real select share.
    """

    percentile: float = 99.0
    split_seed: int = 0
    t1_held_out: bool = False
    given: Mapping[str, float] | None = None
    figure_examples: int = 4
    synthetic_validation: str | None = None
    synthetic_copies: int = 1

    def __post_init__(self) -> None:
        from fedinspect.evaluation.synthetic_thresholds import check_synthetic_method

        if not 0 < self.percentile <= 100:
            raise SettingsError(f"T1 percentile must lie in (0, 100], got {self.percentile!r}")
        if self.synthetic_validation is not None:
            try:
                check_synthetic_method(self.synthetic_validation)
            except ValueError as error:
                raise SettingsError(str(error)) from None
        if isinstance(self.synthetic_copies, bool) or not isinstance(self.synthetic_copies, int) \
                or self.synthetic_copies < 1:
            raise SettingsError(f"synthetic_copies must be a positive integer, got {self.synthetic_copies!r}")


def evaluate_category(
    model: Detector | str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: bool = True,
    write_maps: bool = True,
    weights: str | Path | None = None,
    thresholds: ThresholdOptions | None = ThresholdOptions(),
    runtime: str | None = None,
) -> dict[str, Any]:
    """Score a category's test split with the AutoVI protocol and thresholds T1-T3; write results.json and maps.

    Returns the results dictionary (also written to ``out_dir/results.json`` when given, with
    ``thresholds.png``). ``out_dir`` is written all at once and replaces a previous evaluation there (no
    old maps stay beside new results); a failure leaves it untouched. ``weights``: the backbone's local
    weights file, for a model folder (which names none); it must be the file the model was fitted with.
    ``thresholds``: None skips T1-T3. ``runtime``: the backbone runtime of a model folder's PatchCore or PaDiM,
    or of a trained detector's frozen teacher (default: the one it was fitted with).
    """
    inputs = [data_dir, model] if isinstance(model, str | Path) else [data_dir]
    if isinstance(model, str | Path):
        model = load_detector(model, weights=weights, progress=progress, runtime=runtime)
    if out_dir is None:
        return _evaluate(model, data_dir, None, progress, write_maps, thresholds)
    with staged_output(out_dir, inputs=inputs) as staging:
        return _evaluate(model, data_dir, staging, progress, write_maps, thresholds)


def _evaluate(model: Detector, data_dir: str | Path, out_dir: Path | None, progress: bool, write_maps: bool,
              thresholds: ThresholdOptions | None) -> dict[str, Any]:
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

    if thresholds is not None:
        start = time.perf_counter()
        results["thresholds"] = _thresholds(model, dataset, labels, scores, maps, regions, shapes, thresholds,
                                            out_dir)
        timings["thresholds_s"] = time.perf_counter() - start

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
                "parameters": model_parameter_count(model),
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
        figure = THRESHOLD_FIGURE if (out_dir / THRESHOLD_FIGURE).is_file() else None
        write_category_report(out_dir, results, figure)
    return results


def _thresholds(model: Detector, dataset: CategoryDataset, labels: np.ndarray, scores: np.ndarray,
                maps: list[np.ndarray], regions: list[list[Region]], shapes: list[tuple[int, int]],
                options: ThresholdOptions, out_dir: Path | None) -> dict[str, Any]:
    """T1-T3 chosen on their shares and reported on the report share; the figure in ``out_dir``."""
    if options.synthetic_validation is not None and options.given is None:
        block, report = _synthetic_thresholds(model, dataset, labels, scores, maps, regions, options)
        _threshold_figure(dataset, labels, scores, maps, regions, shapes, options, out_dir, block, report)
        return block
    try:
        split = threshold_split(len(dataset.train), [s.defect for s in dataset.test], options.split_seed)
        if options.given is None and not any(regions[i] for i in split.select):
            raise ValueError("the select share (15% of each defect type) holds no annotated defect region")
        if not any(regions[i] for i in split.report):
            raise ValueError("the report share holds no annotated defect region")
    except ValueError as error:  # a category too small for the shares: the AutoVI metrics stand alone
        print(f"warning: {dataset.root}: no thresholds T1-T3 ({error})", file=sys.stderr)
        return {"skipped": str(error)}
    t1_maps: list[np.ndarray] = []
    if options.given is None:
        t1_samples = [dataset.train[i] for i in split.t1]
        t1_maps = _naming_the_image(dataset, t1_samples,
                                    lambda images: model.predict(images, total=len(t1_samples)))[1]
    block = threshold_protocol(t1_maps, maps, regions, scores, labels, split.select, split.report,
                               options.percentile, options.given)
    block["t1_held_out"] = options.t1_held_out or getattr(model, "t1_held_out_", False)
    block["split_seed"] = options.split_seed
    _threshold_figure(dataset, labels, scores, maps, regions, shapes, options, out_dir, block, split.report)
    return block


def _threshold_figure(dataset: CategoryDataset, labels: np.ndarray, scores: np.ndarray, maps: list[np.ndarray],
                      regions: list[list[Region]], shapes: list[tuple[int, int]], options: ThresholdOptions,
                      out_dir: Path | None, block: dict[str, Any], report: np.ndarray) -> None:
    """``thresholds.png``: report-share examples with the pixels at or above T1, T2 and T3."""
    if out_dir is not None and options.figure_examples:
        chosen = _figure_examples(labels, scores, [sample.defect for sample in dataset.test], report,
                                  options.figure_examples)
        examples = [Example(category=dataset.name, defect=dataset.test[i].defect, name=dataset.test[i].stem,
                            image=read_image(dataset.test[i].image_path), anomaly_map=maps[i],
                            ground_truth=union_mask(regions[i], shapes[i]), score=float(scores[i])) for i in chosen]
        plot_thresholds(examples, {name: block[name]["value"] for name in ("T1", "T2", "T3")},
                        out_dir / THRESHOLD_FIGURE)


def _synthetic_thresholds(model: Detector, dataset: CategoryDataset, labels: np.ndarray, scores: np.ndarray,
                          maps: list[np.ndarray], regions: list[list[Region]],
                          options: ThresholdOptions) -> tuple[dict[str, Any], np.ndarray]:
    """T1 as usual, T2/T3 chosen on synthetic defects in the T1 share of the training images; (block, report).

    The report share is the protocol's (:func:`threshold_split`) where the test images allow one, else every
    test image. Where the select share has real defects, the real-chosen T2/T3 and their metrics stand beside
    the synthetic ones (``real_chosen``, ``comparison``); where the report share has none, only the values and
    the fraction of good report images flagged are given.
    """
    method, seed = options.synthetic_validation, options.split_seed
    held_out = options.t1_held_out or getattr(model, "t1_held_out_", False)
    if not held_out:
        print(f"warning: {dataset.root}: synthetic validation draws its defects into the T1 share of the training "
              "images, which this model may have been fitted on ('fedinspect fit' uses every training image): the "
              "untouched images then score low and T2/T3 may sit low; zoo-study and fit_category(hold_out_t1=True) "
              "hold the share out", file=sys.stderr)
    t1_index = train_shares(len(dataset.train), seed)[2]  # the same T1 share as threshold_split(..., seed)
    try:
        split = threshold_split(len(dataset.train), [s.defect for s in dataset.test], seed)
        select, report = split.select, split.report
    except ValueError:  # too few test images for a select share: none is needed here
        select, report = np.zeros(0, dtype=np.int64), np.arange(len(dataset.test), dtype=np.int64)
    t1_samples = [dataset.train[i] for i in t1_index]
    t1_scores, t1_maps = _naming_the_image(dataset, t1_samples,
                                           lambda images: model.predict(images, total=len(t1_samples)))
    choice = synthetic_validation_thresholds(model, dataset, t1_samples, t1_maps, t1_scores, method, seed,
                                             options.synthetic_copies)
    t1 = percentile_threshold(t1_maps, options.percentile)
    values = {"T1": t1, "T2": choice.t2, "T3": choice.t3}
    source = (f"{choice.n_good} good training images (T1 share) and their {choice.n_defective} synthetic "
              f"{method} copies")
    chosen_by = {"T1": f"{options.percentile:g}th percentile of the pixel scores of good images (T1 share)",
                 "T2": f"best pixel-level F1 on synthetic defects: {source}",
                 "T3": f"best image-level F1 on synthetic defects: {source}"}
    synthetic_f1 = {"T1": None, "T2": choice.t2_f1, "T3": choice.t3_f1}
    has_select = any(regions[i] for i in select)
    has_report = any(regions[i] for i in report)
    report_maps, report_regions = [maps[i] for i in report], [regions[i] for i in report]
    block: dict[str, Any] = {}
    for name, value in values.items():
        entry: dict[str, Any] = {"value": float(value), "chosen_by": chosen_by[name]}
        if has_report:
            entry.update(threshold_metrics(report_maps, report_regions, scores[report], labels[report], value))
        entry["select_f1"] = synthetic_f1[name]
        entry["good_images_flagged"] = _flagged(scores[report], labels[report], value)
        block[name] = entry
    real: dict[str, Any] | None = None
    if has_select:
        t2, f1_2 = best_f1_pixel_threshold([maps[i] for i in select], [regions[i] for i in select])
        t3, f1_3 = best_f1_image_threshold(scores[select], labels[select])
        real = {}
        for name, value, f1 in (("T2", t2, f1_2), ("T3", t3, f1_3)):
            entry = {"value": value, "chosen_by": f"best {'pixel' if name == 'T2' else 'image'}-level F1 on the "
                                                  "real select share (15% of the test images)", "select_f1": f1}
            if has_report:
                entry.update(threshold_metrics(report_maps, report_regions, scores[report], labels[report], value))
            entry["good_images_flagged"] = _flagged(scores[report], labels[report], value)
            real[name] = entry
        block["real_chosen"] = real
    if has_report:
        block["threshold_free"] = score_predictions(labels[report].astype(int), scores[report], report_maps,
                                                    report_regions)
        block["comparison"] = compare_thresholds(block, real)
    else:
        block["note"] = "no annotated defect in the report share: metrics at the thresholds are not computed"
    block["synthetic_validation"] = choice.record()
    block["shares"] = {"t1": len(t1_samples), "select": int(select.size) if real is not None else 0,
                       "report": int(report.size), "synthetic": choice.n_defective}
    block["percentile"] = float(options.percentile)
    block["t1_held_out"] = held_out
    block["split_seed"] = seed
    return block, report


def _flagged(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float | None:
    """Fraction of the good images scored at or above ``threshold`` (their false-alarm rate); None: no good one."""
    good = scores[labels == 0]
    return float(np.mean(good >= threshold)) if good.size else None


def synthetic_validation_thresholds(model: Detector, dataset: CategoryDataset, samples: list[Sample],
                                    good_maps: list[np.ndarray], good_scores: np.ndarray, method: str, seed: int,
                                    copies: int = 1) -> SyntheticThresholds:
    """T2/T3 chosen on synthetic defects drawn into ``samples`` (good images) and scored by ``model``.

    ``good_maps``/``good_scores``: the model's predictions on ``samples`` as they are. Only ``samples`` are
    read; the choice records their paths (relative to the dataset), the method, seed and generator settings.
    """
    from fedinspect.synthesis.generators import make_generator

    images = [dataset.load_image(sample) for sample in samples]
    defective, masks = draw_synthetic_defects(images, method, seed, copies)
    defect_scores, defect_maps = model.predict(iter(defective), total=len(defective))
    extra = {"images": [str(sample.image_path.relative_to(dataset.root)) for sample in samples],
             "copies": copies, "generator": make_generator(method).parameters(),
             "share": "T1 share of the training images (train_shares)"}
    return choose_synthetic_thresholds(good_maps, good_scores, defect_maps, defect_scores, masks, method, seed,
                                       extra)


def _figure_examples(labels: np.ndarray, scores: np.ndarray, defects: list[str], report: np.ndarray,
                     count: int) -> list[int]:
    """From the report share: the median-scoring image of each defect type, then the top-scoring good one."""
    chosen: list[int] = []
    for defect in sorted({defects[i] for i in report if labels[i] == 1}):
        members = sorted((int(i) for i in report if defects[i] == defect), key=lambda i: (scores[i], i))
        chosen.append(members[len(members) // 2])
    chosen = chosen[: max(count - 1, 1)]
    good = [int(i) for i in report if labels[i] == 0]
    if good:
        chosen.append(max(good, key=lambda i: (scores[i], -i)))
    return chosen


def model_parameter_count(model: Detector) -> int | None:
    """Numbers in the model's networks (frozen backbone included) plus what it stores (bank, Gaussians)."""
    if isinstance(model, TrainedDetector):
        return model.n_parameters_
    features = getattr(model, "_features", None)
    count = sum(p.numel() for p in features.parameters()) if features is not None else 0
    if isinstance(model, PatchCore) and getattr(model, "memory_bank_", None) is not None:
        count += int(model.memory_bank_.size)
    scorer = getattr(model, "_scorer", None)
    if scorer is not None:
        count += sum(b.numel() for b in scorer.buffers())
    return count


def _environment() -> dict[str, Any]:
    return {
        "fedinspect": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
