"""The AutoVI metrics of a category accumulated one image at a time, in memory that does not grow with the maps.

:func:`metrics.pixel_auroc` and :func:`metrics.spro_curve` take every full-resolution anomaly map of a
category at once and copy them all (twice) to sort the defect-free scores. Here each image is reduced as it
arrives, and the map can be dropped:

- its defect-free scores (outside the union of its regions) are appended to an anonymous temporary file, in
  the work dtype (float32 for float32 maps: 4 bytes per defect-free pixel of the category, on disk);
- its in-region scores are kept (for pixel AUROC), and per region the top ``saturation_area`` scores (the only
  ones that can raise sPRO) with the region's saturation area;
- its label and image score are kept.

:meth:`StreamingEvaluation.result` then knows every threshold the exact curve needs (the region events, the
float just below each, the highest score; the thresholds of :func:`metrics.spro_curve`) and every in-region
score, and makes a second pass over the file in sorted batches, counting the defect-free scores at or below
each threshold and the Mann-Whitney pairs of pixel AUROC. The counts are exact integers and the curve is
finished by the same code as :func:`metrics.spro_curve`: the results are the same floats (bitwise on the
benchmark), not an approximation. :func:`streamed_pixel_metrics` runs the same computation over maps already
in memory (the second pass reads them again instead of a file); ``score_with_curves`` uses it.

Memory (float32 maps): one batch of defect-free scores (``batch_mib``, 64 MiB by default) and one map at a
time, plus about 4 bytes per in-region pixel and 12 per region event kept, and at the end about 40 bytes per
distinct in-region score and 16 per curve threshold (at most two per region event), transiently. It grows
with the defect area of the category, not with its number of images times their size. Disk: 4 bytes per
defect-free pixel, freed on :meth:`StreamingEvaluation.close`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from sklearn.metrics import roc_curve

from fedinspect.data.regions import Region
from fedinspect.evaluation import metrics
from fedinspect.evaluation.report import Curves

__all__ = ["StreamingEvaluation", "streamed_pixel_metrics"]


class _SpillFile:
    """Defect-free scores of each image, appended to an anonymous temporary file and read back in batches."""

    def __init__(self, directory: str | Path | None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(prefix="fedinspect-eval-", dir=directory)
        self._counts: list[int] = []
        self._dtype: np.dtype | None = None

    def keep(self, anomaly_map: np.ndarray, union: np.ndarray | None, negatives: np.ndarray, dtype: np.dtype) -> None:
        self._dtype = dtype
        self._file.seek(0, 2)
        np.ascontiguousarray(negatives, dtype=dtype).tofile(self._file)
        self._counts.append(negatives.size)

    def batches(self, max_scores: int) -> Iterator[np.ndarray]:
        """The stored scores of consecutive images, at most ``max_scores`` at a time (or one whole image)."""
        self._file.flush()
        self._file.seek(0)
        sizes = list(_batch_sizes(self._counts, max_scores))
        buffer = np.empty(max(sizes, default=0), dtype=self._dtype)  # one buffer, refilled for every batch
        for size in sizes:
            batch = buffer[:size]
            if self._file.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                raise RuntimeError("the temporary file of defect-free scores was truncated")
            yield batch

    def close(self) -> None:
        self._file.close()


def _batch_sizes(counts: Sequence[int], max_scores: int) -> Iterator[int]:
    """Sizes of runs of consecutive counts summing to at most ``max_scores`` (a larger count alone)."""
    size = 0
    for count in counts:
        if size and size + count > max_scores:
            yield size
            size = 0
        size += count
    if size:
        yield size


class _References:
    """The caller's maps themselves (already in memory), with each union mask packed to one bit per pixel."""

    def __init__(self) -> None:
        self._kept: list[tuple[np.ndarray, np.ndarray | None, int]] = []
        self._dtype: np.dtype | None = None

    def keep(self, anomaly_map: np.ndarray, union: np.ndarray | None, negatives: np.ndarray, dtype: np.dtype) -> None:
        self._dtype = dtype
        self._kept.append((anomaly_map, None if union is None else np.packbits(union, axis=None), negatives.size))

    def batches(self, max_scores: int) -> Iterator[np.ndarray]:
        """The defect-free scores of consecutive images, at most ``max_scores`` at a time (or one whole image)."""
        counts = [count for _, _, count in self._kept]
        buffer = np.empty(min(max([max_scores, *counts]), sum(counts)), dtype=self._dtype)
        kept = iter(self._kept)
        for size in _batch_sizes(counts, max_scores):
            filled = 0
            while filled < size:
                anomaly_map, packed, _ = next(kept)
                if packed is None:
                    buffer[filled : filled + anomaly_map.size] = anomaly_map.ravel()
                    filled += anomaly_map.size
                else:
                    negatives = anomaly_map.ravel()[~np.unpackbits(packed, count=anomaly_map.size).view(bool)]
                    buffer[filled : filled + negatives.size] = negatives
                    filled += negatives.size
            yield buffer[:size]

    def close(self) -> None:
        self._kept.clear()


class StreamingEvaluation:
    """Image AUROC, pixel AUROC and AUC-sPRO of one category, fed one image at a time.

    ``add`` each test image (in any order), then ``result()`` and ``curves()`` give what
    :func:`~fedinspect.evaluation.protocol.score_with_curves` gives for the same images: the same keys,
    None where the split cannot define a metric, the same values. The defect-free scores wait in a temporary
    file (in ``spill_dir``, default the system's) that is deleted by :meth:`close` or on leaving a ``with``.

    ``dtype``: the dtype the scores are compared in. None takes the first map's (at least float32, as
    :mod:`~fedinspect.evaluation.metrics` does); a later map that would need a wider one is refused, since
    the stored scores cannot be widened exactly afterwards (pass ``dtype=np.float64`` for such maps).
    """

    def __init__(
        self, dtype: DTypeLike | None = None, spill_dir: str | Path | None = None, batch_mib: float = 64.0
    ) -> None:
        if not batch_mib > 0:
            raise ValueError(f"batch_mib must be positive, got {batch_mib!r}")
        self._batch_bytes = int(batch_mib * 2**20)
        self._dtype: np.dtype | None = None if dtype is None else np.dtype(dtype)
        if self._dtype is not None and self._dtype.kind != "f":
            raise ValueError(f"dtype must be a floating-point type, got {self._dtype}")
        self._store: _SpillFile | _References = _SpillFile(spill_dir)
        self._labels: list[int] = []
        self._scores: list[float] = []
        self._positives: list[np.ndarray] = []  # in-region scores of each defective image
        self._events: list[np.ndarray] = []  # top saturation_area scores of each region
        self._saturations: list[int] = []
        self._n_neg = 0
        self._max_neg: float = -math.inf
        self._cached: tuple[dict[str, Any], Curves] | None = None
        self._closed = False

    @classmethod
    def _over_references(cls, dtype: np.dtype) -> StreamingEvaluation:
        """An accumulator that keeps references to maps already in memory instead of writing them to disk."""
        evaluation = cls(dtype=dtype)
        evaluation._store.close()
        evaluation._store = _References()
        return evaluation

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        """The labels of the images added so far, in order."""
        return np.asarray(self._labels, dtype=int)

    def __enter__(self) -> StreamingEvaluation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Delete the temporary file; the results computed so far stay readable."""
        self._store.close()
        self._closed = True

    def add(self, label: int, score: float, anomaly_map: ArrayLike, regions: Sequence[Region]) -> None:
        """One test image: its label (1 defective, 0 good), image score, 2-D anomaly map and defect regions.

        A good image has no region; a defective one may have none (it then counts for the image metrics
        only, and its pixels as defect-free, as in :mod:`~fedinspect.evaluation.metrics`). Raises
        ValueError, naming the image's position, on a bad label or score, a map that is not 2-D or not
        finite, a region mask of another shape, an empty region or a bad saturation area, regions on a good
        image, or a map whose dtype needs a wider comparison dtype than the one in use.
        """
        index = len(self._labels)
        if self._closed:
            raise ValueError("this StreamingEvaluation is closed: its stored scores are gone")
        if not isinstance(label, int | np.integer | np.bool_) or int(label) not in (0, 1):
            raise ValueError(f"image {index}: label must be 0 (good) or 1 (defective), got {label!r}")
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"image {index}: the image score must be a real number, got {score!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"image {index}: the image score is not finite ({value})")
        if int(label) == 0 and len(regions) > 0:
            raise ValueError(f"image {index}: a good image (label 0) cannot have defect regions, got {len(regions)}")
        anomaly_map = metrics._as_map(anomaly_map, index)
        dtype = self._check_dtype(anomaly_map, index)
        checked = [metrics._region_mask(region, anomaly_map.shape, index, k) for k, region in enumerate(regions)]

        union = None
        if checked:
            union = np.zeros(anomaly_map.shape, dtype=bool)
            for mask, saturation in checked:
                values = anomaly_map[mask].astype(dtype, copy=False)
                if saturation < values.size:
                    values = np.partition(values, values.size - saturation)[values.size - saturation :]
                self._events.append(values)
                self._saturations.append(saturation)
                union |= mask
            self._positives.append(anomaly_map[union].astype(dtype, copy=False))
        negatives = anomaly_map.ravel() if union is None else anomaly_map[~union]
        if negatives.size:
            self._max_neg = max(self._max_neg, float(negatives.max()))
        self._dtype = dtype
        self._store.keep(anomaly_map, union, negatives, dtype)
        self._n_neg += negatives.size
        self._labels.append(int(label))
        self._scores.append(value)
        self._cached = None

    def _check_dtype(self, anomaly_map: np.ndarray, index: int) -> np.dtype:
        wanted = np.result_type(anomaly_map.dtype, np.float32)
        if self._dtype is None:
            return wanted  # becomes the dtype in use once the image is accepted
        if np.result_type(wanted, self._dtype) != self._dtype:
            raise ValueError(
                f"image {index}: anomaly map of dtype {anomaly_map.dtype} cannot be compared exactly in "
                f"{self._dtype} (the dtype of the first map); pass dtype={np.result_type(wanted, self._dtype)}"
            )
        return self._dtype

    def result(self) -> dict[str, Any]:
        """``{"image_auroc", "pixel_auroc", "auc_spro"}`` as :func:`score_with_curves` gives them."""
        return self._compute()[0]

    def curves(self) -> Curves:
        """The FPR-sPRO and image ROC curves behind :meth:`result`."""
        return self._compute()[1]

    def _compute(self) -> tuple[dict[str, Any], Curves]:
        if self._cached is not None:
            return self._cached
        if self._closed:
            raise ValueError("this StreamingEvaluation was closed before its result was computed")
        if not self._labels:
            raise ValueError("no image was added")
        labels = np.asarray(self._labels)
        scores = np.asarray(self._scores)
        result: dict[str, Any] = {"image_auroc": None, "pixel_auroc": None, "auc_spro": None}
        curves = Curves()
        if 0 < labels.sum() < len(labels):
            result["image_auroc"] = metrics.image_auroc(labels, scores)
            curves.roc_fpr, curves.roc_tpr, _ = roc_curve(labels, scores)
        if self._events:
            result["pixel_auroc"], (curves.spro_fpr, curves.spro, _) = self._pixel_metrics()
            result["auc_spro"] = {
                str(limit): metrics.area_under_curve(curves.spro_fpr, curves.spro, limit)
                for limit in metrics.FPR_LIMITS
            }
        self._cached = (result, curves)
        return self._cached

    def _pixel_metrics(self) -> tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Pixel AUROC and the exact sPRO curve, from one counting pass over the stored defect-free scores."""
        if self._n_neg == 0:
            raise ValueError("no defect-free pixel in any image: the false positive rate is undefined")
        dtype = self._dtype
        assert dtype is not None
        weights = np.repeat(1.0 / np.asarray(self._saturations, dtype=np.float64), self._saturations)
        events, suffix = metrics._sorted_events(np.concatenate(self._events), weights)
        del weights
        thresholds = metrics._corner_thresholds(events, max(dtype.type(self._max_neg), events[-1]), dtype)
        positive_values, positive_counts = np.unique(np.concatenate(self._positives), return_counts=True)
        ascending = np.ascontiguousarray(thresholds[::-1])
        batches = self._store.batches(max(1, self._batch_bytes // dtype.itemsize))
        at_or_below, below, tied = _counting_pass(batches, ascending, positive_values, positive_counts)
        if int(at_or_below[-1]) != self._n_neg:  # the top threshold is the highest score of all
            raise RuntimeError("the stored defect-free scores do not add up to the count seen by add()")

        false_positives = self._n_neg - at_or_below[::-1]
        curve = metrics._curve_points(thresholds, false_positives, self._n_neg, events, suffix,
                                      len(self._saturations), drop_intermediate=True)
        n_pos = int(positive_counts.sum())
        pixel_auroc = float((float(below) + 0.5 * float(tied)) / (n_pos * self._n_neg))
        return pixel_auroc, curve


def _counting_pass(
    batches: Iterator[np.ndarray], thresholds: np.ndarray, positives: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """One pass over the defect-free scores: what the curve and pixel AUROC need, counted exactly.

    ``thresholds`` and ``positives`` (the distinct in-region scores, ``counts`` times each) are ascending and
    distinct. Returns how many defect-free scores are <= each threshold, and over all (defect-free,
    in-region) pixel pairs how many have the in-region score above (``below``) and equal (``tied``): the
    Mann-Whitney counts of pixel AUROC, accumulated as two integers rather than one count per value.

    Each batch is sorted in place (fast), then the values are looked up in it when there are fewer values
    than scores, or its scores are looked up among the values when there are more (then binned); the cost is
    about (scores + values x batches) times a few nanoseconds, hence the large batches.
    """
    at_or_below = np.zeros(thresholds.size, dtype=np.int64)
    histogram: np.ndarray | None = None  # [j]: scores in (thresholds[j-1], thresholds[j]]
    cumulative = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # in-region pixels among the first j
    below = tied = 0
    for batch in batches:
        batch.sort()
        if thresholds.size <= batch.size:
            at_or_below += np.searchsorted(batch, thresholds, side="right")
        else:
            if histogram is None:
                histogram = np.zeros(thresholds.size + 1, dtype=np.int64)
            histogram += np.bincount(np.searchsorted(thresholds, batch, side="left"), minlength=thresholds.size + 1)
        if positives.size <= batch.size:  # per in-region value: defect-free scores below it, and equal
            left = np.searchsorted(batch, positives, side="left")
            right = np.searchsorted(batch, positives, side="right")
            below += int(np.dot(counts, left))
            tied += int(np.dot(counts, right - left))
        else:  # per defect-free score: in-region pixels above it, and equal
            left = cumulative[np.searchsorted(positives, batch, side="left")]
            right = cumulative[np.searchsorted(positives, batch, side="right")]
            below += int(cumulative[-1]) * batch.size - int(right.sum())
            tied += int((right - left).sum())
    if histogram is not None:
        at_or_below += np.cumsum(histogram[:-1])
    return at_or_below, below, tied


def streamed_pixel_metrics(
    maps: Sequence[np.ndarray], regions: Sequence[Sequence[Region]]
) -> tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pixel AUROC and the sPRO curve of maps already in memory, without copying them all.

    The streamed computation over references to the maps (the counting pass reads each map again): the
    same floats as :func:`metrics.pixel_auroc` and :func:`metrics.spro_curve`, with one image's defect-free
    scores as the largest temporary. Needs at least one region.
    """
    if len(maps) != len(regions):
        raise ValueError(f"got {len(maps)} anomaly maps but region lists for {len(regions)} images")
    checked = [metrics._as_map(m, i) for i, m in enumerate(maps)]
    evaluation = StreamingEvaluation._over_references(metrics._work_dtype(checked))
    for anomaly_map, image_regions in zip(checked, regions, strict=True):
        evaluation.add(1 if image_regions else 0, 0.0, anomaly_map, image_regions)
    if not evaluation._events:
        raise ValueError("no defect region in any image: sPRO and AUC-sPRO are undefined")
    return evaluation._pixel_metrics()
