"""T2 and T3 chosen on synthetic defects, for a user who has no defective image to choose them on.

The seed's T2 (best pixel F1) and T3 (best image F1) need defective images with masks: the 15% select share
of the test images (:mod:`fedinspect.evaluation.thresholds`). A factory that has none can draw defects instead
(anomalib's F1 threshold has the same gap: without anomalous validation images it picks a meaningless value).
Here the good images of the T1 share of the *training* images (held out of fitting by
:func:`~fedinspect.evaluation.thresholds.train_shares`; never a test image) get a seeded synthetic defect each
(:func:`draw_synthetic_defects`, a generator of :mod:`fedinspect.synthesis`). The fitted detector scores them,
and :func:`choose_synthetic_thresholds` takes

- T2: best pixel F1 over every pixel of the untouched good images (no defect pixel) and of their defective
  copies (the generator's masks), the seed's select-share rule with synthetic masks;
- T3: best image F1 with good = the untouched images, defective = their synthetic copies.

:func:`compare_thresholds` then scores the synthetic T2/T3 and, where the category has real defects, the
real-chosen ones on the same report share, so a user sees how close they come. Plain arrays throughout:
reading images and running the detector are the caller's (:func:`fedinspect.pipeline.evaluate_category`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedinspect.evaluation.thresholds import best_f1_image_threshold, best_f1_pixel_threshold

__all__ = ["SyntheticThresholds", "check_synthetic_method", "choose_synthetic_thresholds", "compare_thresholds",
           "draw_synthetic_defects"]


def check_synthetic_method(method: str) -> str:
    """``method`` if it names an offline generator, else a ValueError listing them (diffusion needs weights)."""
    from fedinspect.synthesis.generators import OFFLINE_METHODS

    if method not in OFFLINE_METHODS:
        raise ValueError(f"synthetic validation: unknown or unsupported method {method!r}; choose from "
                         f"{', '.join(OFFLINE_METHODS)} (the generators that need no model weights)")
    return method


def draw_synthetic_defects(images: Sequence[np.ndarray], method: str, seed: int,
                           copies: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``copies`` defective copies of each good image, drawn by the generator ``method`` with ``seed``.

    Returns (defective uint8 images, boolean masks), image by image in order (copy ``k`` of image ``i`` at
    ``i * copies + k``). The inputs are not modified. One :class:`numpy.random.Generator` seeded with ``seed``
    draws every defect in turn, so the same images, method and seed give the same defects.
    """
    from fedinspect.synthesis.generators import make_generator

    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    if len(images) == 0:
        raise ValueError("synthetic validation: no good image to draw defects into")
    generator = make_generator(check_synthetic_method(method))
    rng = np.random.default_rng(seed)
    defective, masks = [], []
    for image in images:
        source = np.array(image, dtype=np.uint8, copy=True)
        for _ in range(copies):
            result, mask = generator.generate(source, rng)
            defective.append(result)
            masks.append(mask)
    return defective, masks


@dataclass(frozen=True)
class SyntheticThresholds:
    """T2 and T3 chosen on synthetic defects, with their F1 on those defects and what they were chosen on."""

    t2: float
    t3: float
    t2_f1: float
    t3_f1: float
    n_good: int
    n_defective: int
    method: str
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the image names, the generator's settings

    def record(self) -> dict[str, Any]:
        """JSON-ready description for results.json (``synthetic`` is always True)."""
        return {"synthetic": True, "method": self.method, "seed": self.seed, "good_images": self.n_good,
                "defective_images": self.n_defective, "T2": self.t2, "T3": self.t3,
                "T2_synthetic_f1": self.t2_f1, "T3_synthetic_f1": self.t3_f1, **self.extra}


def choose_synthetic_thresholds(good_maps: Sequence[ArrayLike], good_scores: ArrayLike,
                                defect_maps: Sequence[ArrayLike], defect_scores: ArrayLike,
                                defect_masks: Sequence[np.ndarray], method: str, seed: int,
                                extra: dict[str, Any] | None = None) -> SyntheticThresholds:
    """T2 and T3 of the seed's rules on good images and their synthetic defective copies.

    T2 = :func:`~fedinspect.evaluation.thresholds.best_f1_pixel_threshold` over the good maps (empty masks)
    followed by the defective maps (the generator's masks); T3 =
    :func:`~fedinspect.evaluation.thresholds.best_f1_image_threshold` with label 0 for the good scores and 1
    for the defective ones. ``method``, ``seed`` and ``extra`` are only recorded.
    """
    good_maps = [np.asarray(m) for m in good_maps]
    defect_maps = [np.asarray(m) for m in defect_maps]
    good_scores, defect_scores = np.asarray(good_scores, dtype=np.float64), np.asarray(defect_scores, np.float64)
    if len(good_maps) != good_scores.size or len(defect_maps) != defect_scores.size:
        raise ValueError(f"synthetic validation: {len(good_maps)} good and {len(defect_maps)} defective maps but "
                         f"{good_scores.size} and {defect_scores.size} scores")
    if len(defect_masks) != len(defect_maps):
        raise ValueError(f"synthetic validation: {len(defect_maps)} defective maps but {len(defect_masks)} masks")
    if not good_maps or not defect_maps:
        raise ValueError("synthetic validation needs at least one good image and one synthetic defect")
    masks = [np.zeros(m.shape, dtype=bool) for m in good_maps] + [np.asarray(m, dtype=bool) for m in defect_masks]
    t2, t2_f1 = best_f1_pixel_threshold([*good_maps, *defect_maps], masks)
    labels = np.concatenate([np.zeros(good_scores.size, dtype=int), np.ones(defect_scores.size, dtype=int)])
    t3, t3_f1 = best_f1_image_threshold(np.concatenate([good_scores, defect_scores]), labels)
    return SyntheticThresholds(t2=t2, t3=t3, t2_f1=t2_f1, t3_f1=t3_f1, n_good=len(good_maps),
                               n_defective=len(defect_maps), method=method, seed=int(seed), extra=dict(extra or {}))


def compare_thresholds(block: dict[str, Any], real: dict[str, Any] | None) -> dict[str, Any]:
    """Per threshold (T2, T3): the synthetic and the real-chosen value and their report-share metrics side by side.

    ``block``: the thresholds block whose T2/T3 were chosen on synthetic defects; ``real``: the real-chosen
    entries ``{"T2": {...}, "T3": {...}}`` (None when the category has no real defective image to choose on).
    """
    keys = ("iou", "pro", "pixel_f1", "image_f1")
    out: dict[str, Any] = {}
    for name in ("T2", "T3"):
        synthetic = block[name]
        row: dict[str, Any] = {"synthetic": synthetic["value"], "real": None}
        row.update({f"{key}_synthetic": synthetic.get(key) for key in keys})
        if real is not None:
            row["real"] = real[name]["value"]
            row["ratio"] = synthetic["value"] / real[name]["value"] if real[name]["value"] else None
            for key in keys:
                row[f"{key}_real"] = real[name].get(key)
                if synthetic.get(key) is not None and real[name].get(key) is not None:
                    row[f"{key}_difference"] = synthetic[key] - real[name][key]
        out[name] = row
    return out

