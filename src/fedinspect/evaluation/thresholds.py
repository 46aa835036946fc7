"""Operating thresholds T1-T3 and the metrics they give (IoU, PRO, F1, precision, recall).

The protocol of Soares, "Automatic defect detection in leather" (U. Minho), section 5.4-5.5:

- the training images split 70% fit / 15% validation / 15% to estimate T1; the test images split
  15% to choose T2 and T3 and 85% to report on (:func:`threshold_split`);
- T1: the p-th percentile (default 99) of the pixel scores of good images (:func:`percentile_threshold`);
- T2: the threshold of best pixel-level F1 (segmentation) on the 15% test share (:func:`best_f1_pixel_threshold`);
- T3: the threshold of best image-level F1 (detection) on the same share (:func:`best_f1_image_threshold`);
- each threshold is then reported on the 85% share (:func:`threshold_metrics`, :func:`threshold_report`).

Decision rule everywhere in this module: a pixel (an image) is predicted anomalous iff its score is
``>= threshold``. That is the rule of :func:`sklearn.metrics.precision_recall_curve`, whose thresholds
T2 and T3 are, so a best-F1 threshold reproduces its F1 exactly. (The AUC-sPRO curve of
:mod:`fedinspect.evaluation.metrics` uses ``>``; on continuous scores the two differ only at ties.)

Zero divisions (no predicted positive, no true positive) give 0.0, as scikit-learn's default does.
Everything here takes plain arrays; nothing knows about models or federation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve

from fedinspect.data.regions import Region, connected_component_regions
from fedinspect.evaluation.metrics import _as_map

__all__ = [
    "MAX_F1_PIXELS",
    "ThresholdSplit",
    "best_f1_image_threshold",
    "best_f1_pixel_threshold",
    "percentile_threshold",
    "threshold_metrics",
    "threshold_protocol",
    "threshold_report",
    "threshold_split",
    "train_shares",
]

MAX_F1_PIXELS = 20_000_000
"""Above this many pixels, :func:`best_f1_pixel_threshold` draws this many pixels (seeded, without
replacement) before searching; at or below it the search is exact over every pixel."""

TRAIN_FRACTIONS = (0.70, 0.15, 0.15)  # fit, validation, T1
SELECT_FRACTION = 0.15  # share of each test defect type that chooses T2 and T3


# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSplit:
    """Index arrays (sorted, int64) of the protocol's shares.

    ``fit``, ``validation`` and ``t1`` index the training images; ``select`` (chooses T2 and T3) and
    ``report`` (the metrics) index the test images. Within each set the shares are disjoint and cover it.
    """

    fit: np.ndarray
    validation: np.ndarray
    t1: np.ndarray
    select: np.ndarray
    report: np.ndarray


def _round_half_up(value: float) -> int:
    return int(np.floor(value + 0.5))


def _train_shares(rng: np.random.Generator, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = rng.permutation(n_train)
    n_small = max(1, _round_half_up(TRAIN_FRACTIONS[1] * n_train))
    return order[: n_train - 2 * n_small], order[n_train - 2 * n_small : n_train - n_small], order[n_train - n_small :]


def train_shares(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (fit, validation, T1) indices of :func:`threshold_split` alone (they do not depend on the test set)."""
    if int(n_train) != n_train or n_train < 3:
        raise ValueError(f"need at least 3 training images (fit, validation, T1), got {n_train!r}")
    return tuple(np.sort(a).astype(np.int64) for a in _train_shares(np.random.default_rng(seed), int(n_train)))


def threshold_split(n_train: int, test_types: Sequence[str], seed: int) -> ThresholdSplit:
    """Split training images 70/15/15 (fit/validation/T1) and test images 15/85 (select/report).

    ``test_types[i]`` is the defect type of test image ``i`` (``"good"`` for a good one). The test
    split is stratified: every type gives ``round(0.15 * count)`` images (half rounded up) to the
    select share, so a type with one or two images goes entirely to the report share. The training
    split gives ``round(0.15 * n_train)`` images, at least one, to validation and to T1, the rest to
    fit. The same seed always gives the same split (types are visited in sorted order).

    Raises:
        ValueError: fewer than 3 training images, no test image, or a select share that would be empty.
    """
    if int(n_train) != n_train or n_train < 3:
        raise ValueError(f"need at least 3 training images (fit, validation, T1), got {n_train!r}")
    types = [str(t) for t in test_types]
    if not types:
        raise ValueError("need at least one test image")
    rng = np.random.default_rng(seed)
    fit, validation, t1 = _train_shares(rng, int(n_train))

    labels = np.asarray(types)
    select_parts, report_parts = [], []
    for defect_type in sorted(set(types)):
        members = rng.permutation(np.flatnonzero(labels == defect_type))
        n_select = _round_half_up(SELECT_FRACTION * members.size) if members.size > 1 else 0
        select_parts.append(members[:n_select])
        report_parts.append(members[n_select:])
    select = np.concatenate(select_parts)
    if select.size == 0:
        raise ValueError(
            f"too few test images to choose T2 and T3: no defect type among {sorted(set(types))} "
            f"has enough images for a 15% share"
        )
    report = np.concatenate(report_parts)
    return ThresholdSplit(*(np.sort(a).astype(np.int64) for a in (fit, validation, t1, select, report)))


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _image_labels(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Boolean labels and float64 scores, 1-D of equal non-zero length, or a ValueError."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"image labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if y.size == 0:
        raise ValueError("no image in the share: image labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("image labels must be 0 (good) or 1 (defective)")
    if s.dtype.kind not in "biuf" or not np.isfinite(s).all():
        raise ValueError("image scores must be finite real numbers")
    return y.astype(bool), s.astype(np.float64)


def _ground_truth_regions(
    ground_truth: Sequence[np.ndarray | Sequence[Region]], maps: Sequence[np.ndarray]
) -> list[list[Region]]:
    """Regions per image: a 2-D mask is split into connected components; a Region list is used as is."""
    if len(ground_truth) != len(maps):
        raise ValueError(f"got {len(maps)} anomaly maps but ground truth for {len(ground_truth)} images")
    out: list[list[Region]] = []
    for i, (truth, m) in enumerate(zip(ground_truth, maps, strict=True)):
        if isinstance(truth, np.ndarray):
            if truth.shape != m.shape:
                raise ValueError(f"image {i}: anomaly map has shape {m.shape} but the mask has shape {truth.shape}")
            out.append(connected_component_regions(truth))
            continue
        regions = list(truth)
        for k, region in enumerate(regions):
            if not isinstance(region, Region):
                raise ValueError(f"image {i}: ground truth must be a 2-D mask or a list of Region, got {region!r}")
            if np.shape(region.mask) != m.shape:
                raise ValueError(
                    f"image {i}: anomaly map has shape {m.shape} but the mask of region {k} "
                    f"has shape {np.shape(region.mask)}"
                )
            if not np.any(region.mask):
                raise ValueError(f"image {i}, region {k}: the region mask is empty")
        out.append(regions)
    return out


def _maps(anomaly_maps: Sequence[ArrayLike]) -> list[np.ndarray]:
    if len(anomaly_maps) == 0:
        raise ValueError("no image in the share: the list of anomaly maps is empty")
    return [_as_map(m, i) for i, m in enumerate(anomaly_maps)]


def _union(regions: Sequence[Region], shape: tuple[int, ...]) -> np.ndarray:
    union = np.zeros(shape, dtype=bool)
    for region in regions:
        union |= np.asarray(region.mask, dtype=bool)
    return union


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else 0.0


# ----------------------------------------------------------------------------------------------
# The thresholds
# ----------------------------------------------------------------------------------------------


def percentile_threshold(good_maps: Sequence[ArrayLike], percentile: float = 99.0) -> float:
    """T1: the ``percentile``-th percentile of all pixel scores of the good images (T1 share).

    Pooled over every pixel of every map; :func:`numpy.percentile` with its default linear
    interpolation. ``percentile`` must lie in (0, 100] (100 gives the maximum score).
    """
    p = float(percentile)
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
    maps = _maps(good_maps)
    pooled = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    return float(np.percentile(pooled, p))


def _best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of best F1 over every candidate threshold; ties go to the highest threshold."""
    if not labels.any():
        raise ValueError("no defective sample (pixel or image) in the share: F1 is undefined")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = np.flatnonzero(f1 == f1.max())[-1]  # thresholds ascend: the last tie is the highest threshold
    return float(thresholds[best]), float(f1[best])


def best_f1_pixel_threshold(
    anomaly_maps: Sequence[ArrayLike],
    ground_truth: Sequence[np.ndarray | Sequence[Region]],
    max_pixels: int = MAX_F1_PIXELS,
    seed: int = 0,
) -> tuple[float, float]:
    """T2: the threshold of best pixel-level F1 over all pixels of the select share; returns (threshold, F1).

    Exact over every distinct score (the thresholds of :func:`sklearn.metrics.precision_recall_curve`,
    rule ``score >= threshold``) when the share has at most ``max_pixels`` pixels; above that, F1 is
    searched on ``max_pixels`` pixels drawn without replacement with ``seed``. Among thresholds of equal
    F1 the highest is taken (the fewest alarms). ``ground_truth[i]`` is image ``i``'s 2-D mask or its
    list of regions (their union is the mask).
    """
    maps = _maps(anomaly_maps)
    regions = _ground_truth_regions(ground_truth, maps)
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    labels = np.concatenate([_union(r, m.shape).ravel() for r, m in zip(regions, maps, strict=True)])
    if scores.size > max_pixels:
        keep = np.random.default_rng(seed).choice(scores.size, size=int(max_pixels), replace=False)
        scores, labels = scores[keep], labels[keep]
    return _best_f1(labels, scores)


def best_f1_image_threshold(image_scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """T3: the threshold of best image-level F1 (image score vs label); returns (threshold, F1).

    Exact over every distinct image score (rule ``score >= threshold``); ties go to the highest threshold.
    """
    y, s = _image_labels(labels, image_scores)
    return _best_f1(y, s)


# ----------------------------------------------------------------------------------------------
# Metrics at a threshold
# ----------------------------------------------------------------------------------------------


def threshold_metrics(
    anomaly_maps: Sequence[ArrayLike],
    ground_truth: Sequence[np.ndarray | Sequence[Region]],
    image_scores: ArrayLike,
    labels: ArrayLike,
    threshold: float,
) -> dict[str, float | int]:
    """Segmentation and detection metrics at one threshold over a share (normally the report share).

    Pixel metrics pool every pixel of every image: ``iou = TP / (TP + FP + FN)``, ``pixel_precision``,
    ``pixel_recall``, ``pixel_f1``. ``pro`` is the mean over all ground-truth regions of all images of
    the fraction of the region's pixels predicted anomalous (the seed's equation 5.2; a region's
    ``saturation_area`` is ignored, so an AutoVI region counts at its full area). A 2-D mask in
    ``ground_truth`` is split into 8-connected components, as :class:`~fedinspect.data.regions.Region`
    does for the MVTec layout. Image metrics (``image_precision``, ``image_recall``, ``image_f1``) compare
    ``image_scores >= threshold`` with ``labels`` (1 = defective). Pixel counts are included.

    Raises:
        ValueError: an empty share, mismatched lengths or shapes, a non-finite threshold or score, or no
            ground-truth region at all (PRO undefined).
    """
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    maps = _maps(anomaly_maps)
    regions = _ground_truth_regions(ground_truth, maps)
    y, s = _image_labels(labels, image_scores)
    if y.size != len(maps):
        raise ValueError(f"got {len(maps)} anomaly maps but {y.size} image labels and scores")

    tp = fp = fn = tn = 0
    overlaps: list[float] = []
    for m, image_regions in zip(maps, regions, strict=True):
        predicted = m >= t
        truth = _union(image_regions, m.shape)
        tp_i = int(np.count_nonzero(predicted & truth))
        fp_i = int(np.count_nonzero(predicted & ~truth))
        fn_i = int(np.count_nonzero(~predicted & truth))
        tp, fp, fn, tn = tp + tp_i, fp + fp_i, fn + fn_i, tn + m.size - tp_i - fp_i - fn_i
        for region in image_regions:
            mask = np.asarray(region.mask, dtype=bool)
            overlaps.append(np.count_nonzero(predicted & mask) / np.count_nonzero(mask))
    if not overlaps:
        raise ValueError("no ground-truth defect region in the share: PRO is undefined")

    predicted_images = s >= t
    itp = int(np.count_nonzero(predicted_images & y))
    ifp = int(np.count_nonzero(predicted_images & ~y))
    ifn = int(np.count_nonzero(~predicted_images & y))
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "pro": float(np.mean(overlaps)),
        "pixel_f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "pixel_precision": _ratio(tp, tp + fp),
        "pixel_recall": _ratio(tp, tp + fn),
        "image_f1": _ratio(2 * itp, 2 * itp + ifp + ifn),
        "image_precision": _ratio(itp, itp + ifp),
        "image_recall": _ratio(itp, itp + ifn),
        "pixels_tp": tp,
        "pixels_fp": fp,
        "pixels_fn": fn,
        "pixels_tn": tn,
        "regions": len(overlaps),
    }


def threshold_report(
    anomaly_maps: Sequence[ArrayLike],
    ground_truth: Sequence[np.ndarray | Sequence[Region]],
    image_scores: ArrayLike,
    labels: ArrayLike,
    t1: float,
    t2: float,
    t3: float,
    percentile: float = 99.0,
) -> dict[str, dict[str, float | int | str]]:
    """The metrics of :func:`threshold_metrics` at T1, T2 and T3 over the report share, JSON-ready.

    Returns ``{"T1": {...metrics, "value": t1, "chosen_by": "..."}, "T2": ..., "T3": ...}``;
    ``percentile`` only names how T1 was chosen.
    """
    chosen_by = {
        "T1": f"{float(percentile):g}th percentile of the pixel scores of good images (T1 share)",
        "T2": "best pixel-level F1 on the select share (segmentation)",
        "T3": "best image-level F1 on the select share (detection)",
    }
    report: dict[str, dict[str, float | int | str]] = {}
    for name, value in (("T1", t1), ("T2", t2), ("T3", t3)):
        metrics = threshold_metrics(anomaly_maps, ground_truth, image_scores, labels, value)
        entry: dict[str, float | int | str] = dict(metrics)
        entry["value"] = float(value)
        entry["chosen_by"] = chosen_by[name]
        report[name] = entry
    return report


# ----------------------------------------------------------------------------------------------
# The whole protocol on one model's predictions
# ----------------------------------------------------------------------------------------------


def threshold_protocol(
    t1_maps: Sequence[ArrayLike],
    anomaly_maps: Sequence[ArrayLike],
    ground_truth: Sequence[np.ndarray | Sequence[Region]],
    image_scores: ArrayLike,
    labels: ArrayLike,
    select: ArrayLike,
    report: ArrayLike,
    percentile: float = 99.0,
    chosen: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """T1-T3 chosen and reported as the seed does, with the threshold-free metrics of the report share.

    ``t1_maps``: maps of the good images of the T1 share; the other arrays cover the test images, of
    which ``select`` (indices) chooses T2 and T3 and ``report`` is scored. ``chosen``: thresholds taken
    from elsewhere (``{"T1": v, "T2": v, "T3": v}``, e.g. those of the training dataset when testing on
    another one); then nothing is chosen here and ``select`` is unused.

    Returns ``{"T1": {...}, "T2": {...}, "T3": {...}, "threshold_free": {image_auroc, pixel_auroc,
    auc_spro}, "shares": {"t1": n, "select": n, "report": n}, "percentile": p}``; each T entry holds the
    metrics of :func:`threshold_metrics` on the report share, its ``value`` and how it was chosen, and
    T2/T3 their F1 on the select share (``select_f1``).
    """
    from fedinspect.evaluation.protocol import score_predictions

    maps = _maps(anomaly_maps)
    regions = _ground_truth_regions(ground_truth, maps)
    y, s = _image_labels(labels, image_scores)
    select, report = np.asarray(select, dtype=np.int64), np.asarray(report, dtype=np.int64)
    if chosen is None:
        t1 = percentile_threshold(t1_maps, percentile)
        t2, f1_2 = best_f1_pixel_threshold([maps[i] for i in select], [regions[i] for i in select])
        t3, f1_3 = best_f1_image_threshold(s[select], y[select])
        select_f1: dict[str, float | None] = {"T1": None, "T2": f1_2, "T3": f1_3}
    else:
        t1, t2, t3 = (float(chosen[name]) for name in ("T1", "T2", "T3"))
        select_f1 = {"T1": None, "T2": None, "T3": None}
    out: dict[str, Any] = threshold_report([maps[i] for i in report], [regions[i] for i in report], s[report],
                                           y[report], t1, t2, t3, percentile)
    for name in ("T1", "T2", "T3"):
        out[name]["select_f1"] = select_f1[name]
        if chosen is not None:
            out[name]["chosen_by"] = "given (thresholds of another dataset)"
    out["threshold_free"] = score_predictions(y[report].astype(int), s[report], [maps[i] for i in report],
                                              [regions[i] for i in report])
    out["shares"] = {"t1": len(t1_maps), "select": int(select.size), "report": int(report.size)}
    out["percentile"] = float(percentile)
    return out
