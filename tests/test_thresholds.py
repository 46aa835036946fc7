"""Thresholds T1-T3, the protocol split and the metrics at a threshold, against hand cases and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score, roc_auc_score

from fedinspect.data.regions import Region, connected_component_regions
from fedinspect.evaluation.thresholds import (
    best_f1_image_threshold,
    best_f1_pixel_threshold,
    percentile_threshold,
    threshold_metrics,
    threshold_report,
    threshold_split,
)

# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------

TYPES = ["good"] * 20 + ["crack"] * 7 + ["scratch"] * 1 + ["hole"] * 2


def test_split_sizes_disjoint_covering_and_stratified() -> None:
    split = threshold_split(20, TYPES, seed=3)
    assert (split.fit.size, split.validation.size, split.t1.size) == (14, 3, 3)
    train = np.concatenate([split.fit, split.validation, split.t1])
    assert np.array_equal(np.sort(train), np.arange(20))
    test = np.concatenate([split.select, split.report])
    assert np.array_equal(np.sort(test), np.arange(len(TYPES)))
    types = np.asarray(TYPES)
    selected = {t: int(np.count_nonzero(types[split.select] == t)) for t in ("good", "crack", "scratch", "hole")}
    # round(0.15 * count), half up: 20 -> 3, 7 -> 1 (1.05), 1 -> 0 (single image: report), 2 -> 0 (0.3)
    assert selected == {"good": 3, "crack": 1, "scratch": 0, "hole": 0}
    assert types[split.report].tolist().count("scratch") == 1


def test_split_reproducible_from_seed() -> None:
    a, b = threshold_split(40, TYPES, seed=7), threshold_split(40, TYPES, seed=7)
    for name in ("fit", "validation", "t1", "select", "report"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    c = threshold_split(40, TYPES, seed=8)
    assert not (np.array_equal(a.t1, c.t1) and np.array_equal(a.select, c.select))


def test_split_small_training_set_keeps_one_image_per_share() -> None:
    split = threshold_split(3, ["good", "good", "good", "good"], seed=0)
    assert (split.fit.size, split.validation.size, split.t1.size) == (1, 1, 1)
    assert split.select.size == 1  # round(0.6) = 1


@pytest.mark.parametrize(
    ("n_train", "types", "message"),
    [
        (2, TYPES, "at least 3 training images"),
        (10, [], "at least one test image"),
        (10, ["good", "crack", "hole"], "too few test images"),
    ],
)
def test_split_rejects_bad_input(n_train: int, types: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        threshold_split(n_train, types, seed=0)


# ----------------------------------------------------------------------------------------------
# T1
# ----------------------------------------------------------------------------------------------


def test_percentile_threshold_hand_case() -> None:
    maps = [np.arange(4, dtype=float).reshape(2, 2), np.arange(4, 10, dtype=float).reshape(2, 3)]
    assert percentile_threshold(maps, 50) == pytest.approx(4.5)
    assert percentile_threshold(maps, 100) == 9.0
    assert percentile_threshold(maps) == pytest.approx(8.91)  # linear: position 0.99 * 9 between 8 and 9


@pytest.mark.parametrize("p", [0, -1, 100.5, float("nan")])
def test_percentile_outside_range_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match=r"percentile must lie in \(0, 100\]"):
        percentile_threshold([np.zeros((2, 2))], p)


def test_percentile_empty_share_is_refused() -> None:
    with pytest.raises(ValueError, match="no image in the share"):
        percentile_threshold([])


# ----------------------------------------------------------------------------------------------
# T2 and T3
# ----------------------------------------------------------------------------------------------


def _brute_force_best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    return max(f1_score(labels, scores >= t, zero_division=0.0) for t in np.unique(scores))


def test_best_f1_image_threshold_hand_case() -> None:
    # t=0.8: F1 2/3; t=0.4: 1/2; t=0.35: 4/5 (TP 2, FP 1); t=0.1: 2/3
    threshold, f1 = best_f1_image_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert threshold == 0.35
    assert f1 == pytest.approx(0.8)


def test_best_f1_tie_goes_to_the_highest_threshold() -> None:
    # t=4: F1 2/3 (TP 1, FN 1); t=1: F1 2/3 (TP 2, FP 2): the tie is broken towards 4
    threshold, f1 = best_f1_image_threshold([4, 3, 2, 1], [1, 0, 0, 1])
    assert (threshold, f1) == (4.0, pytest.approx(2 / 3))


def test_best_f1_image_matches_brute_force_over_all_thresholds() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounded: many ties
    threshold, f1 = best_f1_image_threshold(scores, labels)
    assert f1 == pytest.approx(_brute_force_best_f1(labels, scores))
    assert f1 == pytest.approx(f1_score(labels, scores >= threshold))


def test_best_f1_pixel_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    masks = [np.zeros((6, 7), dtype=bool) for _ in range(3)]
    masks[0][1:3, 1:4] = True
    masks[2][4:6, 5:7] = True
    maps = [np.round(rng.random((6, 7)) + 0.8 * m, 2) for m in masks]
    threshold, f1 = best_f1_pixel_threshold(maps, masks)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert f1 == pytest.approx(_brute_force_best_f1(labels, scores))
    assert f1 == pytest.approx(f1_score(labels, scores >= threshold))
    # Region lists give the same pixels as their union mask
    regions = [connected_component_regions(m) for m in masks]
    assert best_f1_pixel_threshold(maps, regions) == (threshold, f1)


def test_best_f1_pixel_subsampling_is_seeded() -> None:
    rng = np.random.default_rng(2)
    masks = [rng.random((20, 20)) < 0.2 for _ in range(2)]
    maps = [rng.random((20, 20)) + m for m in masks]
    first = best_f1_pixel_threshold(maps, masks, max_pixels=300, seed=4)
    assert best_f1_pixel_threshold(maps, masks, max_pixels=300, seed=4) == first
    assert first[0] in np.concatenate([m.ravel() for m in maps])


def test_best_f1_without_defect_is_refused() -> None:
    with pytest.raises(ValueError, match="no defective sample"):
        best_f1_image_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no defective sample"):
        best_f1_pixel_threshold([np.ones((2, 2))], [np.zeros((2, 2), dtype=bool)])


def test_best_f1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        best_f1_image_threshold([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="no image in the share"):
        best_f1_image_threshold([], [])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        best_f1_image_threshold([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="image 0: anomaly map has shape"):
        best_f1_pixel_threshold([np.ones((2, 2))], [np.ones((2, 3), dtype=bool)])


# ----------------------------------------------------------------------------------------------
# Metrics at a threshold
# ----------------------------------------------------------------------------------------------


def _hand_case() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Defective image with two regions, a good image with one false alarm, a clean good image."""
    defective = np.array([[0.9, 0.8, 0.1, 0.55], [0.2, 0.1, 0.7, 0.6]])
    mask = np.array([[1, 1, 0, 1], [1, 1, 0, 1]], dtype=bool)  # regions: the 2x2 block and the right column
    good = np.array([[0.1, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    clean = np.full((2, 4), 0.3)
    maps = [defective, good, clean]
    masks = [mask, np.zeros((2, 4), dtype=bool), np.zeros((2, 4), dtype=bool)]
    scores = np.array([m.max() for m in maps])
    return maps, masks, scores, np.array([1, 0, 0])


def test_metrics_hand_case_two_regions() -> None:
    maps, masks, scores, labels = _hand_case()
    metrics = threshold_metrics(maps, masks, scores, labels, 0.5)
    # pixels >= 0.5: defective image (0,0),(0,1),(0,3),(1,2),(1,3); good image (0,1)
    assert (metrics["pixels_tp"], metrics["pixels_fp"], metrics["pixels_fn"], metrics["pixels_tn"]) == (4, 2, 2, 16)
    assert metrics["iou"] == pytest.approx(4 / 8)
    assert metrics["pixel_precision"] == pytest.approx(4 / 6)
    assert metrics["pixel_recall"] == pytest.approx(4 / 6)
    assert metrics["pixel_f1"] == pytest.approx(2 / 3)
    # PRO: block 2 of 4 pixels, right column 2 of 2 -> (0.5 + 1) / 2, not the pooled recall 4/6
    assert metrics["regions"] == 2
    assert metrics["pro"] == pytest.approx(0.75)
    # images: scores 0.9 (defective), 0.6 (good), 0.3 (good) -> TP 1, FP 1, FN 0
    assert metrics["image_precision"] == pytest.approx(0.5)
    assert metrics["image_recall"] == 1.0
    assert metrics["image_f1"] == pytest.approx(2 / 3)


def test_metrics_count_a_score_equal_to_the_threshold_as_anomalous() -> None:
    maps, masks, scores, labels = _hand_case()
    # 0.55 is the score of the right column's top pixel; 0.6 the good image's score: both count (>=)
    assert threshold_metrics(maps, masks, scores, labels, 0.55) == threshold_metrics(maps, masks, scores, labels, 0.5)
    assert threshold_metrics(maps, masks, scores, labels, 0.6)["image_precision"] == pytest.approx(0.5)


def test_metrics_take_region_lists_and_ignore_saturation() -> None:
    maps, masks, scores, labels = _hand_case()
    regions = [[Region(r.mask, 1, "x") for r in connected_component_regions(masks[0])], [], []]
    assert threshold_metrics(maps, regions, scores, labels, 0.5) == threshold_metrics(maps, masks, scores, labels, 0.5)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.75, 1.1])
def test_metrics_match_sklearn(threshold: float) -> None:
    rng = np.random.default_rng(5)
    masks = [np.zeros((8, 9), dtype=bool) for _ in range(5)]
    masks[0][2:5, 2:5] = True
    masks[1][0:2, 6:9] = True
    masks[1][6:8, 0:2] = True
    masks[3][3:7, 4:6] = True
    maps = [rng.random((8, 9)) * 0.8 + 0.4 * m for m in masks]
    labels = np.array([int(m.any()) for m in masks])
    scores = rng.random(5) * 0.5 + 0.5 * labels
    metrics = threshold_metrics(maps, masks, scores, labels, threshold)
    truth = np.concatenate([m.ravel() for m in masks])
    predicted = np.concatenate([m.ravel() for m in maps]) >= threshold
    assert metrics["iou"] == pytest.approx(jaccard_score(truth, predicted, zero_division=0.0))
    assert metrics["pixel_f1"] == pytest.approx(f1_score(truth, predicted, zero_division=0.0))
    assert metrics["pixel_precision"] == pytest.approx(precision_score(truth, predicted, zero_division=0.0))
    assert metrics["pixel_recall"] == pytest.approx(recall_score(truth, predicted, zero_division=0.0))
    image_predicted = scores >= threshold
    assert metrics["image_f1"] == pytest.approx(f1_score(labels, image_predicted, zero_division=0.0))
    assert metrics["image_precision"] == pytest.approx(precision_score(labels, image_predicted, zero_division=0.0))
    assert metrics["image_recall"] == pytest.approx(recall_score(labels, image_predicted, zero_division=0.0))
    overlaps = [
        np.mean(m[r.mask] >= threshold)
        for m, gt in zip(maps, masks, strict=True)
        for r in connected_component_regions(gt)
    ]
    assert metrics["regions"] == 4
    assert metrics["pro"] == pytest.approx(np.mean(overlaps))


def test_metrics_reject_bad_input() -> None:
    maps, masks, scores, labels = _hand_case()
    with pytest.raises(ValueError, match="no image in the share"):
        threshold_metrics([], [], [], [], 0.5)
    with pytest.raises(ValueError, match="image 1: anomaly map has shape"):
        threshold_metrics(maps, [masks[0], np.zeros((3, 4), dtype=bool), masks[2]], scores, labels, 0.5)
    with pytest.raises(ValueError, match="3 anomaly maps but ground truth for 2"):
        threshold_metrics(maps, masks[:2], scores, labels, 0.5)
    with pytest.raises(ValueError, match="3 anomaly maps but 2 image labels"):
        threshold_metrics(maps, masks, scores[:2], labels[:2], 0.5)
    with pytest.raises(ValueError, match="threshold must be finite"):
        threshold_metrics(maps, masks, scores, labels, float("nan"))
    with pytest.raises(ValueError, match="PRO is undefined"):
        threshold_metrics(maps[1:], masks[1:], scores[1:], labels[1:], 0.5)
    with pytest.raises(ValueError, match="image 0: anomaly map contains non-finite"):
        threshold_metrics([np.full((2, 4), np.nan), *maps[1:]], masks, scores, labels, 0.5)


def test_report_is_json_ready_with_three_thresholds() -> None:
    maps, masks, scores, labels = _hand_case()
    report = threshold_report(maps, masks, scores, labels, t1=0.65, t2=0.5, t3=0.7, percentile=95)
    assert json.loads(json.dumps(report)) == report
    assert list(report) == ["T1", "T2", "T3"]
    assert report["T1"]["value"] == 0.65
    assert report["T1"]["chosen_by"].startswith("95th percentile")
    assert "pixel-level F1" in report["T2"]["chosen_by"]
    assert "image-level F1" in report["T3"]["chosen_by"]
    for name, value in (("T1", 0.65), ("T2", 0.5), ("T3", 0.7)):
        expected = threshold_metrics(maps, masks, scores, labels, value)
        assert {k: report[name][k] for k in expected} == expected


# ----------------------------------------------------------------------------------------------
# The protocol inside `evaluate`
# ----------------------------------------------------------------------------------------------


def test_threshold_protocol_chooses_on_its_shares_and_reports_on_the_report_share():
    from fedinspect.evaluation.thresholds import threshold_protocol

    rng = np.random.default_rng(0)
    masks = [np.zeros((6, 6), bool) for _ in range(8)]
    for m in masks[4:]:
        m[1:3, 1:4] = True
    maps = [rng.random((6, 6)) + 1.5 * m for m in masks]
    scores = np.array([m.max() for m in maps])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    good = [rng.random((6, 6)) for _ in range(2)]
    select, report = np.array([0, 4]), np.array([1, 2, 3, 5, 6, 7])
    out = threshold_protocol(good, maps, masks, scores, labels, select, report, percentile=90)
    assert out["T1"]["value"] == pytest.approx(np.percentile(np.concatenate([g.ravel() for g in good]), 90))
    t2, f1 = best_f1_pixel_threshold([maps[0], maps[4]], [masks[0], masks[4]])
    assert out["T2"]["value"] == t2 and out["T2"]["select_f1"] == f1
    at_t2 = threshold_metrics([maps[i] for i in report], [masks[i] for i in report], scores[report],
                              labels[report], t2)
    assert out["T2"]["iou"] == at_t2["iou"] and out["T2"]["pro"] == at_t2["pro"]
    assert out["shares"] == {"t1": 2, "select": 2, "report": 6}
    assert out["threshold_free"]["image_auroc"] == pytest.approx(roc_auc_score(labels[report], scores[report]))
    # thresholds given from elsewhere are used as they are, nothing is chosen
    given = threshold_protocol([], maps, masks, scores, labels, select, report, chosen={"T1": 0.5, "T2": 0.9,
                                                                                        "T3": 1.2})
    assert [given[t]["value"] for t in ("T1", "T2", "T3")] == [0.5, 0.9, 1.2]
    assert given["T3"]["select_f1"] is None and "given" in given["T3"]["chosen_by"]


@pytest.mark.slow
def test_evaluate_writes_thresholds_and_their_figure(blob_category, tmp_path):
    from fedinspect.pipeline import evaluate_category, fit_category

    model = fit_category(blob_category, progress=False, hold_out_t1=True, image_size=48, coreset_ratio=0.5)
    assert model.n_train_images_ == 8  # 10 minus the T1 share of 2
    results = evaluate_category(model, blob_category, tmp_path / "eval", progress=False)
    block = results["thresholds"]
    assert block["shares"] == {"t1": 2, "select": 3, "report": 18}
    for name in ("T1", "T2", "T3"):
        assert {"value", "chosen_by", "iou", "pro", "pixel_f1", "image_f1", "image_precision"} <= set(block[name])
    assert block["T2"]["pixel_f1"] > 0.3 and block["threshold_free"]["image_auroc"] > 0.9  # the blobs are found
    split = threshold_split(10, [p.split("/")[1] for p in results["image_scores"]], 0)
    labels = np.array([0 if "/good/" in p else 1 for p in results["image_scores"]])
    scores = np.array(list(results["image_scores"].values()))
    assert block["T3"]["image_f1"] == pytest.approx(
        f1_score(labels[split.report], scores[split.report] >= block["T3"]["value"]))
    assert (tmp_path / "eval" / "thresholds.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["thresholds"]["T1"]["value"] == block["T1"]["value"]


@pytest.mark.slow
def test_evaluate_writes_a_report_naming_the_detector_and_its_thresholds(blob_category, tmp_path):
    from fedinspect.pipeline import evaluate_category, fit_category

    model = fit_category(blob_category, progress=False, detector="padim", hold_out_t1=True, image_size=48,
                         n_features=20)
    results = evaluate_category(model, blob_category, tmp_path / "eval", progress=False)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.startswith("# padim on blobs")
    assert "T1 from 2 good training images (held out of fitting)" in report
    t2_row = next(line for line in report.splitlines() if line.startswith("| T2 |"))
    assert f"{results['thresholds']['T2']['value']:.4f}" in t2_row
    assert "![" in report and "(thresholds.png)" in report
    assert "thresholds.png" in (tmp_path / "eval" / "report.html").read_text()
