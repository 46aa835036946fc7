"""Tests of fedinspect.evaluation.metrics against literal, slow reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fedinspect.data.regions import Region, connected_component_regions, saturation_area
from fedinspect.evaluation.metrics import (
    FPR_LIMITS,
    area_under_curve,
    auc_spro,
    image_auroc,
    pixel_auroc,
    spro_curve,
)

# ----------------------------------------------------------------------------------------------
# Literal references (the official per-threshold definition, no cleverness)
# ----------------------------------------------------------------------------------------------


def brute_point(maps, regions, t):
    """(FPR, sPRO) at one threshold, exactly as the official definition states it."""
    fp = tn = 0
    spros = []
    for anomaly_map, image_regions in zip(maps, regions, strict=True):
        binary = anomaly_map > t
        union = np.zeros(anomaly_map.shape, dtype=bool)
        for region in image_regions:
            tp_area = np.sum(binary & region.mask)
            spros.append(min(tp_area / region.saturation_area, 1.0))
            union |= region.mask
        fp += np.sum(binary & ~union)
        tn += np.sum(~binary & ~union)
    return fp / (fp + tn), float(np.mean(spros))


def brute_curve(maps, regions):
    """Curve at every distinct score plus -inf and +inf, sorted by FPR then sPRO."""
    values = np.unique(np.concatenate([m.ravel() for m in maps])).astype(np.float64)
    thresholds = [-np.inf, *values.tolist(), np.inf]
    points = sorted(brute_point(maps, regions, t) for t in thresholds)
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def brute_area(x, y, limit):
    """Segment by segment: full trapezoids left of the limit, the crossing one cut at the limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def random_case(seed, ties):
    """Several images of different sizes, good ones, overlapping regions, both saturation kinds."""
    rng = np.random.default_rng(seed)
    maps, regions = [], []
    for index in range(int(rng.integers(3, 6))):
        shape = (int(rng.integers(3, 8)), int(rng.integers(3, 9)))
        if ties:
            anomaly_map = rng.integers(0, 12, size=shape).astype(np.float32)
        else:
            anomaly_map = rng.normal(size=shape)
        image_regions = []
        if index > 0 and rng.random() < 0.75:  # image 0 is always good
            for _ in range(int(rng.integers(1, 4))):  # regions overlap at random
                mask = rng.random(shape) < rng.uniform(0.1, 0.5)
                mask[rng.integers(1, shape[0]), rng.integers(shape[1])] = True
                mask[0, 0] = False  # pixel (0, 0) stays defect-free
                area = int(mask.sum())
                if rng.random() < 0.5:
                    saturation = saturation_area(area, float(rng.uniform(0.05, 1.0)), relative=True)
                else:
                    saturation = saturation_area(area, int(rng.integers(1, 12)), relative=False)
                image_regions.append(Region(mask, saturation, "random"))
        maps.append(anomaly_map)
        regions.append(image_regions)
    if not any(regions):
        mask = np.zeros(maps[-1].shape, dtype=bool)
        mask[1:3, 1:3] = True
        regions[-1] = [Region(mask, 3, "forced")]
    return maps, regions


CASES = [(seed, ties) for seed in range(8) for ties in (True, False)]


# ----------------------------------------------------------------------------------------------
# Fast implementation versus the literal reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "ties"), CASES)
def test_full_curve_matches_brute_force(seed, ties):
    maps, regions = random_case(seed, ties)
    fpr, spro, thresholds = spro_curve(maps, regions, drop_intermediate=False)
    distinct = np.unique(np.concatenate([m.ravel() for m in maps]))
    np.testing.assert_array_equal(thresholds, np.concatenate([distinct[::-1], [-np.inf]]))
    for f, s, t in zip(fpr, spro, thresholds, strict=True):
        ref_f, ref_s = brute_point(maps, regions, t)
        assert f == pytest.approx(ref_f, abs=1e-12)
        assert s == pytest.approx(ref_s, abs=1e-12)
    # the +inf threshold of the official definition only repeats the first point
    assert brute_point(maps, regions, np.inf) == (0.0, 0.0)
    assert (fpr[0], spro[0], fpr[-1], spro[-1]) == (0.0, 0.0, 1.0, 1.0)
    ref_fpr, ref_spro = brute_curve(maps, regions)
    np.testing.assert_allclose(np.concatenate([[0.0], fpr]), ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([[0.0], spro]), ref_spro, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("seed", "ties"), CASES)
def test_reduced_curve_and_auc_match_brute_force(seed, ties):
    maps, regions = random_case(seed, ties)
    fpr, spro, thresholds = spro_curve(maps, regions)
    full_fpr, _, _ = spro_curve(maps, regions, drop_intermediate=False)
    assert fpr.size <= full_fpr.size
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= 0) and np.all(np.diff(thresholds) < 0)
    for f, s, t in zip(fpr, spro, thresholds, strict=True):
        ref_f, ref_s = brute_point(maps, regions, t)
        assert f == pytest.approx(ref_f, abs=1e-12)
        assert s == pytest.approx(ref_s, abs=1e-12)
    ref_fpr, ref_spro = brute_curve(maps, regions)
    extra_limits = np.random.default_rng(seed).uniform(0.001, 1.0, size=5).tolist()
    expected = {str(limit): brute_area(ref_fpr, ref_spro, limit) for limit in FPR_LIMITS}
    result = auc_spro(maps, regions)
    assert list(result) == ["0.01", "0.05", "0.1", "0.3", "1.0"]
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12)
    for limit in [*extra_limits, *ref_fpr[(ref_fpr > 0)].tolist()]:
        assert area_under_curve(fpr, spro, limit) == pytest.approx(
            brute_area(ref_fpr, ref_spro, limit), abs=1e-12
        )


def test_float64_and_integer_maps_keep_their_ties():
    maps, regions = random_case(3, ties=True)
    as_int = [m.astype(np.uint16) for m in maps]
    as_f64 = [m.astype(np.float64) for m in maps]
    reference = auc_spro(maps, regions)
    assert auc_spro(as_int, regions) == reference
    assert auc_spro(as_f64, regions) == reference


# ----------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------


def hand_case():
    # One image, 2x3. The region holds the scores 0.9 and 0.4 (saturation 2, its full area); the
    # 4 defect-free pixels hold 0.2, 0.6, 0.8 and 0.1.
    anomaly_map = np.array([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1]])
    mask = np.array([[True, False, False], [True, False, False]])
    return [anomaly_map], [[Region(mask, 2, "hand")]]


def test_hand_case_full_curve():
    # threshold  positives (score > t)      FPR   sPRO
    #   0.9      none                       0     0
    #   0.8      0.9                        0     1/2
    #   0.6      0.9 0.8                    1/4   1/2
    #   0.4      0.9 0.8 0.6                2/4   1/2
    #   0.2      ... + 0.4 (region)         2/4   1
    #   0.1      ... + 0.2                  3/4   1
    #   -inf     all                        1     1
    # (with "score >= t" every point would move one row up: the test pins the strict comparison)
    fpr, spro, thresholds = spro_curve(*hand_case(), drop_intermediate=False)
    np.testing.assert_array_equal(thresholds, [0.9, 0.8, 0.6, 0.4, 0.2, 0.1, -np.inf])
    np.testing.assert_array_equal(fpr, [0, 0, 0.25, 0.5, 0.5, 0.75, 1])
    np.testing.assert_array_equal(spro, [0, 0.5, 0.5, 0.5, 1, 1, 1])


def test_hand_case_reduced_curve_and_areas():
    # The straight runs (0,.5)-(.25,.5)-(.5,.5) and (.5,1)-(.75,1)-(1,1) lose their middle points.
    fpr, spro, _ = spro_curve(*hand_case())
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(spro, [0, 0.5, 0.5, 1, 1])
    # Area from 0 to L: sPRO is 1/2 on (0, 1/2) and 1 on (1/2, 1).
    #   L <= 0.5: area L/2, normalized 0.5.   L = 1: 0.25 + 0.5 = 0.75.
    #   L = 0.6: 0.25 + 0.1 = 0.35, normalized 0.35 / 0.6.
    result = auc_spro(*hand_case())
    assert result == pytest.approx({"0.01": 0.5, "0.05": 0.5, "0.1": 0.5, "0.3": 0.5, "1.0": 0.75})
    assert auc_spro(*hand_case(), limits=(0.5, 0.6)) == pytest.approx({"0.5": 0.5, "0.6": 0.35 / 0.6})


def test_perfect_map_scores_one_everywhere():
    rng = np.random.default_rng(0)
    maps, regions = [], []
    for shape in [(6, 7), (5, 5), (8, 4)]:
        mask = rng.random(shape) < 0.3
        mask[0, 0], mask[1, 1] = False, True
        maps.append(mask.astype(np.float32))
        regions.append(connected_component_regions(mask))
    maps.append(np.zeros((4, 4), dtype=np.float32))  # a good image
    regions.append([])
    fpr, spro, _ = spro_curve(maps, regions)
    np.testing.assert_array_equal(fpr, [0, 0, 1])
    np.testing.assert_array_equal(spro, [0, 1, 1])
    assert auc_spro(maps, regions) == {str(limit): 1.0 for limit in FPR_LIMITS}
    inverted = [1.0 - m for m in maps]
    # every defect-free pixel comes first: the curve runs (0,0) -> (1,0) -> (1,1), area 0
    assert auc_spro(inverted, regions) == {str(limit): 0.0 for limit in FPR_LIMITS}


def test_saturation_credits_a_region_fully_once_half_is_found():
    # Region of 4 pixels scored 0.9 0.8 0.3 0.2; the 4 defect-free pixels score 0.5 0.1 0.05 0.0.
    anomaly_map = np.array([[0.9, 0.8, 0.5, 0.1], [0.3, 0.2, 0.05, 0.0]])
    mask = np.array([[True, True, False, False], [True, True, False, False]])
    for saturation, expected in [(2, 1.0), (4, 0.5)]:
        fpr, spro, thresholds = spro_curve([anomaly_map], [[Region(mask, saturation)]], False)
        at = np.flatnonzero(thresholds == 0.5)[0]  # 0.9 and 0.8 detected, no false positive
        assert (fpr[at], spro[at]) == (0.0, expected)
    # saturated at 2: the curve jumps straight to sPRO 1 at FPR 0, so the AUC is 1 at every limit
    assert auc_spro([anomaly_map], [[Region(mask, 2)]]) == {str(limit): 1.0 for limit in FPR_LIMITS}


def test_overlapping_regions_count_each_region_and_exclude_their_union():
    # Two regions share pixel (0, 1); the union (3 pixels) is excluded from the FPR.
    anomaly_map = np.array([[0.9, 0.7, 0.2], [0.1, 0.3, 0.4]])
    a = np.array([[True, True, False], [False, False, False]])
    b = np.array([[False, True, True], [False, False, False]])
    fpr, spro, thresholds = spro_curve([anomaly_map], [[Region(a, 2), Region(b, 2)]], False)
    # t = 0.7: region a has 1/2, region b 0/2 -> sPRO 1/4; t = 0.4: a 2/2, b 1/2 -> 3/4;
    # t = 0.2: 0.3 and 0.4 are false positives (2 of the 3 defect-free pixels), b still 1/2 -> 3/4
    # (its 0.2 is not > 0.2); t = 0.1: b complete -> 1
    by_threshold = {t: (f, s) for f, s, t in zip(fpr, spro, thresholds, strict=True)}
    assert by_threshold[0.7] == (0.0, 0.25)
    assert by_threshold[0.4] == (0.0, 0.75)
    assert by_threshold[0.2] == pytest.approx((2 / 3, 0.75))
    assert by_threshold[0.1] == pytest.approx((2 / 3, 1.0))


# ----------------------------------------------------------------------------------------------
# Classic PRO (MVTec layout)
# ----------------------------------------------------------------------------------------------


def simple_pro_auc(maps, gt_masks, limit):
    """Classic PRO written independently: per threshold, mean overlap of 8-connected components."""
    components = []
    for gt in gt_masks:
        labels, count = ndimage.label(gt, structure=np.ones((3, 3)))
        components.append([labels == k for k in range(1, count + 1)])
    negatives = np.concatenate([m[~gt] for m, gt in zip(maps, gt_masks, strict=True)])
    points = []
    for t in [-np.inf, *np.unique(np.concatenate([m.ravel() for m in maps]))]:
        overlaps = [
            np.sum((m > t) & c) / np.sum(c) for m, cs in zip(maps, components, strict=True) for c in cs
        ]
        points.append((np.mean(negatives > t), np.mean(overlaps)))
    points.sort()
    x, y = np.array(points).T
    return brute_area(x, y, limit)


@pytest.mark.parametrize("seed", range(4))
def test_connected_component_regions_give_classic_pro(seed):
    rng = np.random.default_rng(100 + seed)
    maps, gt_masks = [], []
    for _ in range(4):
        shape = (int(rng.integers(6, 10)), int(rng.integers(6, 10)))
        gt = ndimage.binary_dilation(rng.random(shape) < 0.06)
        gt[0, 0] = False
        maps.append(rng.random(shape) + 0.5 * gt)
        gt_masks.append(gt)
    gt_masks[0][:] = False  # one good image
    regions = [connected_component_regions(gt) for gt in gt_masks]
    assert sum(len(r) for r in regions) > 1
    result = auc_spro(maps, regions, limits=(0.05, 0.3, 1.0))
    for limit in (0.05, 0.3, 1.0):
        assert result[str(limit)] == pytest.approx(simple_pro_auc(maps, gt_masks, limit), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# AUROC
# ----------------------------------------------------------------------------------------------


def test_image_auroc_hand_case_and_sklearn():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 wins once, 0.8 twice -> 3/4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert image_auroc([False, True], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=200)
    scores = rng.normal(size=200) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)


def test_image_auroc_errors():
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])


def test_pixel_auroc_hand_case_and_sklearn():
    # positives 0.9 and 0.3 against negatives 0.1, 0.2, 0.5: 0.9 wins 3 times, 0.3 twice -> 5/6
    maps = [np.array([[0.1, 0.9]]), np.array([[0.2, 0.5, 0.3]])]
    masks = [np.array([[False, True]]), np.array([[False, False, True]])]
    assert pixel_auroc(maps, masks) == pytest.approx(5 / 6)
    rng = np.random.default_rng(2)
    maps, masks = [], []
    for shape in [(5, 6), (7, 3), (4, 4)]:
        mask = rng.random(shape) < 0.3
        maps.append((rng.random(shape) + 0.3 * mask).astype(np.float32))
        masks.append(mask)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-15)


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match="image 1"):
        pixel_auroc([np.zeros((2, 2)), np.zeros((2, 3))], [np.eye(2, dtype=bool), np.zeros((3, 2), bool)])
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 2), bool)])


# ----------------------------------------------------------------------------------------------
# area_under_curve
# ----------------------------------------------------------------------------------------------


def test_area_under_curve_interpolates_at_the_limit():
    x = np.array([0.0, 0.2, 0.6, 1.0])
    y = np.array([0.0, 0.4, 0.8, 1.0])
    # limit 0.4 lies on the segment (0.2, 0.4)-(0.6, 0.8): y(0.4) = 0.6
    # area = 0.2 * 0.4 / 2 + 0.2 * (0.4 + 0.6) / 2 = 0.04 + 0.1 = 0.14 -> 0.14 / 0.4 = 0.35
    assert area_under_curve(x, y, 0.4) == pytest.approx(0.35)
    # limit on a point: area 0.04 -> 0.2
    assert area_under_curve(x, y, 0.2) == pytest.approx(0.2)
    # limit 1: the full trapezoid area
    assert area_under_curve(x, y, 1.0) == pytest.approx(float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)))
    # a vertical step at the limit adds no area; the order of y at a repeated x matters right of it
    step_x, step_y = np.array([0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])
    assert area_under_curve(step_x, step_y, 0.5) == pytest.approx(0.0)
    assert area_under_curve(step_x, step_y, 0.75) == pytest.approx(0.25 / 0.75)


def test_area_under_curve_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        area_under_curve(np.array([0.0, 0.5, 0.4, 1.0]), np.zeros(4), 0.3)
    with pytest.raises(ValueError, match="limit"):
        area_under_curve(np.array([0.0, 1.0]), np.zeros(2), 1.5)
    with pytest.raises(ValueError, match="limit"):
        area_under_curve(np.array([0.0, 1.0]), np.zeros(2), 0.0)


# ----------------------------------------------------------------------------------------------
# Input errors of the sPRO functions
# ----------------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_image():
    maps = [np.zeros((3, 3)), np.zeros((4, 5))]
    regions = [[], [Region(np.ones((5, 4), dtype=bool), 1)]]
    with pytest.raises(ValueError, match=r"image 1: .*\(4, 5\).*\(5, 4\)"):
        spro_curve(maps, regions)


def test_non_finite_scores_are_rejected():
    maps, regions = hand_case()
    for bad in (np.nan, np.inf):
        broken = maps[0].copy()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match=r"image 1: .*non-finite"):
            auc_spro([np.zeros((2, 2)), broken], [[], regions[0]])


def test_no_region_no_negative_and_bad_saturation_are_rejected():
    with pytest.raises(ValueError, match="no defect region"):
        auc_spro([np.zeros((3, 3)), np.ones((2, 2))], [[], []])
    full = np.ones((2, 2), dtype=bool)
    with pytest.raises(ValueError, match="no defect-free pixel"):
        auc_spro([np.zeros((2, 2))], [[Region(full, 4)]])
    with pytest.raises(ValueError, match="saturation_area"):
        auc_spro([np.zeros((2, 2))], [[Region(np.eye(2, dtype=bool), 0)]])
    with pytest.raises(ValueError, match="exceeds the region area"):
        auc_spro([np.zeros((2, 2))], [[Region(np.eye(2, dtype=bool), 3)]])
    with pytest.raises(ValueError, match="empty"):
        auc_spro([np.zeros((2, 2))], [[Region(np.zeros((2, 2), dtype=bool), 1)]])
    with pytest.raises(ValueError, match="2 anomaly maps but region lists for 1"):
        auc_spro([np.zeros((2, 2)), np.zeros((2, 2))], [[Region(np.eye(2, dtype=bool), 1)]])
    with pytest.raises(ValueError, match="limits"):
        auc_spro(*hand_case(), limits=(0.0,))
