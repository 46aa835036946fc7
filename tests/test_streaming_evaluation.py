"""The streamed evaluation against the whole-category metrics, a brute-force sPRO, sklearn and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedinspect.data.regions import Region
from fedinspect.evaluation import metrics
from fedinspect.evaluation.protocol import score_with_curves
from fedinspect.evaluation.streaming import StreamingEvaluation, streamed_pixel_metrics


def random_category(seed: int, images: int = 24, decimals: int | None = 1):
    """Labels, scores, maps and regions: sizes differ, ties (rounded scores), defective images without region."""
    rng = np.random.default_rng(seed)
    labels, scores, maps, regions = [], [], [], []
    for i in range(images):
        h, w = (int(v) for v in rng.integers(8, 30, 2))
        anomaly_map = rng.normal(size=(h, w)).astype(np.float32)
        image_regions = []
        label = i % 2
        if label and i % 6 != 1:  # every third defective image has no region
            for _ in range(int(rng.integers(1, 4))):
                mask = np.zeros((h, w), dtype=bool)
                y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
                mask[y : y + int(rng.integers(1, 8)), x : x + int(rng.integers(1, 8))] = True
                anomaly_map[mask] += np.float32(rng.uniform(0, 2))
                image_regions.append(Region(mask, int(rng.integers(1, mask.sum() + 1))))
        if decimals is not None:
            anomaly_map = np.round(anomaly_map, decimals)
        labels.append(label)
        scores.append(round(float(anomaly_map.max()), 1))
        maps.append(anomaly_map)
        regions.append(image_regions)
    return labels, scores, maps, regions


def flat(result: dict) -> dict:
    """A result with its AUC-sPRO values as top-level keys (pytest.approx takes no nested dicts)."""
    return {**{k: v for k, v in result.items() if k != "auc_spro"}, **(result["auc_spro"] or {})}


def streamed(labels, scores, maps, regions, order=None, **options):
    with StreamingEvaluation(**options) as evaluation:
        for i in range(len(labels)) if order is None else order:
            evaluation.add(labels[i], scores[i], maps[i], regions[i])
        return evaluation.result(), evaluation.curves()


def brute_force_auc_spro(maps, regions, limit: float) -> float:
    """Official semantics by masks at every distinct threshold (score > t), trapezoids, interpolated at ``limit``."""
    flat = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    negatives = np.concatenate([m[~np.any([r.mask for r in rs], axis=0)] if rs else m.ravel()
                                for m, rs in zip(maps, regions, strict=True)]).astype(np.float64)
    every = [(m.astype(np.float64), r) for m, rs in zip(maps, regions, strict=True) for r in rs]
    points = []
    for t in [*np.unique(flat)[::-1], -np.inf]:
        spro = np.mean([min((m[r.mask] > t).sum() / r.saturation_area, 1.0) for m, r in every])
        points.append(((negatives > t).mean(), spro))
    x, y = np.array(points).T
    inside = x <= limit
    xs, ys = list(x[inside]), list(y[inside])
    if xs[-1] < limit:
        j = int(np.argmax(x > limit))
        xs.append(limit)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]))
    return float(np.trapezoid(ys, xs) / limit)


@pytest.mark.parametrize("batch_mib", [64.0, 0.0005])  # one batch (values looked up), many (scores binned)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_the_whole_category_metrics(seed: int, batch_mib: float) -> None:
    labels, scores, maps, regions = random_category(seed)
    result, curves = streamed(labels, scores, maps, regions, batch_mib=batch_mib)
    fpr, spro, _ = metrics.spro_curve(maps, regions)
    unions = [np.any([r.mask for r in rs], axis=0) if rs else np.zeros(m.shape, bool)
              for m, rs in zip(maps, regions, strict=True)]
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(maps, unions), abs=1e-12)
    pooled = np.concatenate([m.ravel() for m in maps])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(np.concatenate([u.ravel() for u in unions]), pooled))
    assert result["auc_spro"] == pytest.approx(metrics.auc_spro(maps, regions), abs=1e-12)
    np.testing.assert_allclose(curves.spro_fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(curves.spro, spro, atol=1e-12)
    for limit in (0.05, 0.3, 1.0):
        assert result["auc_spro"][str(limit)] == pytest.approx(brute_force_auc_spro(maps, regions, limit), abs=1e-9)
    # score_with_curves (streamed over references to the maps) gives the same.
    expected, expected_curves = score_with_curves(np.array(labels), np.array(scores), maps, regions)
    assert flat(result) == pytest.approx(flat(expected), abs=1e-12)
    np.testing.assert_allclose(expected_curves.spro, spro, atol=1e-12)
    np.testing.assert_allclose(expected_curves.roc_tpr, curves.roc_tpr)


def test_distinct_scores_and_several_region_sizes() -> None:
    labels, scores, maps, regions = random_category(5, images=16, decimals=None)
    result, _ = streamed(labels, scores, maps, regions)
    assert result["auc_spro"] == pytest.approx(metrics.auc_spro(maps, regions), abs=1e-12)
    assert result["auc_spro"]["0.1"] == pytest.approx(brute_force_auc_spro(maps, regions, 0.1), abs=1e-9)


def test_order_of_add_does_not_matter() -> None:
    labels, scores, maps, regions = random_category(3)
    result, curves = streamed(labels, scores, maps, regions)
    order = np.random.default_rng(7).permutation(len(labels))
    shuffled, shuffled_curves = streamed(labels, scores, maps, regions, order=order)
    assert shuffled == result  # bitwise: events are summed in (score, weight) order
    np.testing.assert_array_equal(shuffled_curves.spro, curves.spro)
    np.testing.assert_array_equal(shuffled_curves.spro_fpr, curves.spro_fpr)


def test_all_good_category_has_no_pixel_metrics() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(5, 6)) for _ in range(4)]
    result, curves = streamed([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], maps, [[], [], [], []])
    assert result == {"image_auroc": None, "pixel_auroc": None, "auc_spro": None}
    assert curves.spro is None and curves.roc_fpr is None
    assert score_with_curves(np.zeros(4, int), np.arange(4.0), maps, [[]] * 4)[0] == result


def test_hand_computed_case() -> None:
    # Good image: scores 0.1, 0.4. Defective: 0.3 outside its region, 0.8 and 0.4 inside, saturated at 2 pixels.
    good = np.array([[0.1, 0.4]], dtype=np.float32)
    defective = np.array([[0.3, 0.8, 0.4]], dtype=np.float32)
    region = Region(np.array([[False, True, True]]), 2)
    result, curves = streamed([0, 1], [0.4, 0.8], [good, defective], [[], [region]])
    # Pixel AUROC: 0.8 beats the 3 defect-free scores, 0.4 beats 0.1 and 0.3 and ties 0.4: (3 + 2.5) / 6.
    assert result["pixel_auroc"] == pytest.approx(5.5 / 6, abs=1e-12)
    assert result["image_auroc"] == 1.0
    # Curve: (0, 0) -> (0, 0.5) below 0.8 -> (1/3, 1) below 0.4 (the defect-free 0.4 goes over) -> (1, 1).
    np.testing.assert_allclose(curves.spro_fpr, [0, 0, 1 / 3, 1])
    np.testing.assert_allclose(curves.spro, [0, 0.5, 1, 1])
    expected = {"0.01": 0.5075, "0.05": 0.5375, "0.1": 0.575, "0.3": 0.725, "1.0": 0.25 + 2 / 3}
    assert result["auc_spro"] == pytest.approx(expected, abs=1e-9)


def test_float64_maps_need_a_float64_dtype() -> None:
    labels, scores, maps, regions = random_category(4, images=8, decimals=None)
    wide = [m.astype(np.float64) + 1e-9 for m in maps]
    evaluation = StreamingEvaluation()
    evaluation.add(labels[0], scores[0], maps[0], regions[0])
    with pytest.raises(ValueError, match="float64"):
        evaluation.add(labels[1], scores[1], wide[1], regions[1])
    evaluation.close()
    result, _ = streamed(labels, scores, wide, regions, dtype=np.float64)
    assert result["auc_spro"] == pytest.approx(metrics.auc_spro(wide, regions), abs=1e-12)


def test_spill_file_is_anonymous(tmp_path) -> None:
    labels, scores, maps, regions = random_category(0, images=6)
    with StreamingEvaluation(spill_dir=tmp_path) as evaluation:
        for item in zip(labels, scores, maps, regions, strict=True):
            evaluation.add(*item)
        assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing left behind even after a crash
        result = evaluation.result()
    assert evaluation.result() == result  # still readable after close
    with pytest.raises(ValueError, match="closed"):
        evaluation.add(labels[0], scores[0], maps[0], regions[0])
    evaluation = StreamingEvaluation()
    evaluation.add(labels[0], scores[0], maps[0], regions[0])
    evaluation.close()
    with pytest.raises(ValueError, match="closed before its result"):
        evaluation.result()


def test_adding_after_a_result_counts_the_new_images() -> None:
    labels, scores, maps, regions = random_category(6, images=10)
    with StreamingEvaluation() as evaluation:
        for item in list(zip(labels, scores, maps, regions, strict=True))[:5]:
            evaluation.add(*item)
        evaluation.result()
        for item in list(zip(labels, scores, maps, regions, strict=True))[5:]:
            evaluation.add(*item)
        assert evaluation.result()["auc_spro"] == pytest.approx(metrics.auc_spro(maps, regions), abs=1e-12)


def region(mask_shape, saturation=1, where=(0, 0)):
    mask = np.zeros(mask_shape, dtype=bool)
    mask[where] = True
    return Region(mask, saturation)


@pytest.mark.parametrize(
    ("label", "score", "anomaly_map", "regions", "message"),
    [
        (1, 0.5, np.zeros((4, 4)), [region((4, 5))], r"image 0: anomaly map has shape \(4, 4\) but the mask"),
        (1, 0.5, np.full((3, 3), np.nan), [region((3, 3))], "non-finite"),
        (0, 0.5, np.zeros((3, 3)), [region((3, 3))], "good image .* cannot have defect regions"),
        (2, 0.5, np.zeros((3, 3)), [], "label must be 0"),
        (1, float("nan"), np.zeros((3, 3)), [], "score is not finite"),
        (1, "high", np.zeros((3, 3)), [], "score must be a real number"),
        (1, 0.5, np.zeros(9), [], "must be 2-D"),
        (1, 0.5, np.zeros((3, 3)), [region((3, 3), saturation=2)], "saturation_area 2 exceeds"),
        (1, 0.5, np.zeros((3, 3)), [Region(np.zeros((3, 3), bool), 1)], "region mask is empty"),
    ],
)
def test_bad_input_is_refused(label, score, anomaly_map, regions, message) -> None:
    with StreamingEvaluation() as evaluation, pytest.raises(ValueError, match=message):
        evaluation.add(label, score, anomaly_map, regions)


def test_undefined_results_are_refused() -> None:
    with StreamingEvaluation() as evaluation, pytest.raises(ValueError, match="no image was added"):
        evaluation.result()
    with StreamingEvaluation() as evaluation:
        evaluation.add(1, 1.0, np.ones((2, 2)), [Region(np.ones((2, 2), bool), 4)])
        with pytest.raises(ValueError, match="no defect-free pixel"):
            evaluation.result()
    with pytest.raises(ValueError, match="no defect region"):
        streamed_pixel_metrics([np.zeros((2, 2))], [[]])


@pytest.mark.parametrize(("batch", "n_values"), [(500, 40), (40, 500), (300, 300)])
def test_counting_pass_is_exact_both_ways(batch: int, n_values: int) -> None:
    from fedinspect.evaluation.streaming import _counting_pass

    rng = np.random.default_rng(batch)
    scores = np.round(rng.normal(size=3 * batch), 1).astype(np.float32)  # ties with the values
    values = np.unique(np.round(rng.normal(size=n_values), 1).astype(np.float32))
    positives, counts = np.unique(np.round(rng.normal(0.5, size=n_values), 1).astype(np.float32), return_counts=True)
    at_or_below, below, tied = _counting_pass(iter(np.split(scores.copy(), 3)), values, positives, counts)
    np.testing.assert_array_equal(at_or_below, [(scores <= v).sum() for v in values])
    pairs = np.repeat(positives, counts)[:, None], scores[None, :]
    assert below == (pairs[0] > pairs[1]).sum()
    assert tied == (pairs[0] == pairs[1]).sum()
