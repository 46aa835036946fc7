"""T2/T3 chosen on synthetic defects (``--synthetic-validation``): training images only, seeded, both blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedinspect.cli import SYNTHETIC_VALIDATION_METHODS, main
from fedinspect.data.dataset import CategoryDataset
from fedinspect.errors import SettingsError
from fedinspect.evaluation.synthetic_thresholds import (
    choose_synthetic_thresholds,
    draw_synthetic_defects,
)
from fedinspect.evaluation.thresholds import best_f1_pixel_threshold, train_shares
from fedinspect.synthesis.generators import OFFLINE_METHODS
from tests.conftest import write_blob_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 training images (T1 share: 2), 7 good + 7 crack + 7 stain test images of 64x48."""
    return write_blob_category(tmp_path_factory.mktemp("synthval") / "blobs", seed=3)


@pytest.fixture(scope="module")
def model(blobs: Path):
    from fedinspect.pipeline import fit_category

    return fit_category(blobs, progress=False, hold_out_t1=True, image_size=48, coreset_ratio=0.5)


def _evaluate(model, data: Path, out: Path | None, method: str | None, seed: int = 0) -> dict:
    from fedinspect.pipeline import ThresholdOptions, evaluate_category

    options = ThresholdOptions(split_seed=seed, synthetic_validation=method, figure_examples=0)
    return evaluate_category(model, data, out, progress=False, write_maps=False, thresholds=options)


def _best_f1_by_brute_force(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every distinct score tried as a threshold (rule score >= t), F1 counted directly; ties: highest t."""
    best = (-1.0, -np.inf)
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.count_nonzero(predicted & labels)
        f1 = 2 * tp / (np.count_nonzero(predicted) + np.count_nonzero(labels))
        if f1 >= best[0]:
            best = (f1, float(threshold))
    return best[1], best[0]


def test_synthetic_thresholds_read_only_the_t1_share_of_the_training_images(model, blobs, monkeypatch):
    import fedinspect.pipeline as pipeline

    read: list[Path] = []
    drawn_into: list[np.ndarray] = []
    inside = [False]
    load_image = CategoryDataset.load_image
    choose = pipeline.synthetic_validation_thresholds
    draw = pipeline.draw_synthetic_defects

    def recording_load(self, sample):
        if inside[0]:
            read.append(sample.image_path)
        return load_image(self, sample)

    def recording_choose(*args, **kwargs):
        inside[0] = True
        try:
            return choose(*args, **kwargs)
        finally:
            inside[0] = False

    def recording_draw(images, *args, **kwargs):
        drawn_into.extend(np.array(image) for image in images)
        return draw(images, *args, **kwargs)

    monkeypatch.setattr(CategoryDataset, "load_image", recording_load)
    monkeypatch.setattr(pipeline, "synthetic_validation_thresholds", recording_choose)
    monkeypatch.setattr(pipeline, "draw_synthetic_defects", recording_draw)
    results = _evaluate(model, blobs, None, "cutpaste")

    dataset = CategoryDataset(blobs)
    t1_share = [dataset.train[i] for i in train_shares(len(dataset.train), 0)[2]]
    assert read == [sample.image_path for sample in t1_share]  # the T1 share, nothing else, no test image
    assert all(path.parts[-3:-1] == ("train", "good") for path in read)
    assert len(drawn_into) == 2
    for image, sample in zip(drawn_into, t1_share, strict=True):
        assert np.array_equal(image, dataset.load_image(sample))
    test_images = [dataset.load_image(sample) for sample in dataset.test]
    assert not any(np.array_equal(image, test) for image in drawn_into for test in test_images)
    record = results["thresholds"]["synthetic_validation"]
    assert record["images"] == [str(s.image_path.relative_to(dataset.root)) for s in t1_share]
    assert record["synthetic"] is True and record["method"] == "cutpaste" and record["seed"] == 0
    assert record["good_images"] == 2 and record["defective_images"] == 2


def test_synthetic_t2_t3_are_the_best_f1_thresholds_on_the_synthetic_maps(model, blobs):
    results = _evaluate(model, blobs, None, "perlin")
    block = results["thresholds"]
    # redraw the same defects into the same images and score them with the same model
    dataset = CategoryDataset(blobs)
    samples = [dataset.train[i] for i in train_shares(len(dataset.train), 0)[2]]
    images = [dataset.load_image(sample) for sample in samples]
    good_scores, good_maps = model.predict(iter(images), total=len(images))
    defective, masks = draw_synthetic_defects(images, "perlin", seed=0)
    defect_scores, defect_maps = model.predict(iter(defective), total=len(defective))
    maps = [*good_maps, *defect_maps]
    truth = [np.zeros(m.shape, dtype=bool) for m in good_maps] + masks

    t2, f1_2 = best_f1_pixel_threshold(maps, truth)
    assert block["T2"]["value"] == t2 and block["synthetic_validation"]["T2_synthetic_f1"] == f1_2
    pixels = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    brute_t2, brute_f1 = _best_f1_by_brute_force(pixels, np.concatenate([t.ravel() for t in truth]))
    assert t2 == pytest.approx(brute_t2) and f1_2 == pytest.approx(brute_f1)
    image_scores = np.concatenate([good_scores, defect_scores]).astype(np.float64)
    brute_t3, brute_f1_3 = _best_f1_by_brute_force(image_scores, np.array([False] * 2 + [True] * 2))
    assert block["T3"]["value"] == pytest.approx(brute_t3)
    assert block["synthetic_validation"]["T3_synthetic_f1"] == pytest.approx(brute_f1_3)


def test_synthetic_defects_are_reproducible_for_a_seed_and_change_with_it():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    kept = [image.copy() for image in images]
    for method in OFFLINE_METHODS:
        first, first_masks = draw_synthetic_defects(images, method, seed=4, copies=2)
        again, again_masks = draw_synthetic_defects(images, method, seed=4, copies=2)
        _, other_masks = draw_synthetic_defects(images, method, seed=5, copies=2)
        assert len(first) == 6 and all(mask.any() for mask in first_masks)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(first_masks, again_masks, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(first_masks, other_masks, strict=True))
        for k, (image, mask) in enumerate(zip(first, first_masks, strict=True)):  # the mask is what changed
            assert np.array_equal(np.any(image != images[k // 2], axis=2), mask)
    assert all(np.array_equal(a, b) for a, b in zip(images, kept, strict=True))  # the inputs are untouched


def test_evaluate_is_reproducible_and_results_hold_both_blocks(model, blobs, tmp_path):
    results = _evaluate(model, blobs, tmp_path / "a", "memseg")
    again = _evaluate(model, blobs, None, "memseg")
    block = json.loads((tmp_path / "a" / "results.json").read_text())["thresholds"]
    assert block == json.loads(json.dumps(again["thresholds"]))
    assert block == json.loads(json.dumps(results["thresholds"]))
    real = block["real_chosen"]
    for name in ("T2", "T3"):
        for entry in (block[name], real[name]):
            assert {"value", "chosen_by", "iou", "pro", "pixel_f1", "image_f1"} <= set(entry)
        assert "synthetic" in block[name]["chosen_by"] and "real select share" in real[name]["chosen_by"]
        assert block["comparison"][name]["synthetic"] == block[name]["value"]
        assert block["comparison"][name]["real"] == real[name]["value"]
    # the real-chosen thresholds are those of the usual protocol, measured on the same report share
    usual = _evaluate(model, blobs, None, None)["thresholds"]
    for name in ("T2", "T3"):
        assert real[name]["value"] == usual[name]["value"]
        assert real[name]["iou"] == usual[name]["iou"] and real[name]["image_f1"] == usual[name]["image_f1"]
    assert block["T1"]["value"] == usual["T1"]["value"]
    assert "synthetic_validation" not in usual and "real_chosen" not in usual
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Synthetic against real defects" in report and "no test image was used to choose them" in report


def test_a_category_without_defective_images_still_gets_synthetic_thresholds(model, blobs, tmp_path):
    good_only = tmp_path / "good_only"
    shutil.copytree(blobs, good_only)
    for folder in ("test/crack", "test/stain", "ground_truth"):
        shutil.rmtree(good_only / folder)
    block = _evaluate(model, good_only, tmp_path / "out", "cutpaste_scar")["thresholds"]
    assert "real_chosen" not in block and "skipped" not in block
    assert block["T2"]["value"] > 0 and block["T3"]["value"] > 0
    assert 0.0 <= block["T3"]["good_images_flagged"] <= 1.0 and "not computed" in block["note"]
    assert "no real defect" in (tmp_path / "out" / "report.md").read_text()
    # without the option such a category has no thresholds at all
    assert "skipped" in _evaluate(model, good_only, None, None)["thresholds"]


def test_a_bad_method_name_is_a_clear_error(blobs, tmp_path, capsys):
    from fedinspect.pipeline import ThresholdOptions
    from fedinspect.study.zoo import ZooSettings

    assert SYNTHETIC_VALIDATION_METHODS == OFFLINE_METHODS  # the parser's spelling of the generators
    for bad in ("bogus", "diffusion"):
        with pytest.raises(SettingsError, match="choose from perlin, cutpaste, cutpaste_scar, memseg"):
            ThresholdOptions(synthetic_validation=bad)
        with pytest.raises(SettingsError, match="unknown or unsupported method"):
            ZooSettings(detectors=("padim",), synthetic_validation=bad)
    with pytest.raises(ValueError, match="choose from"):
        draw_synthetic_defects([np.zeros((32, 32, 3), np.uint8)], "bogus", seed=0)
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tmp_path), "--data", str(blobs), "--out", str(tmp_path / "o"),
              "--synthetic-validation", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["zoo-study", "--help"])
    assert "--synthetic-validation" in capsys.readouterr().out


def test_choose_rejects_mismatched_inputs():
    maps = [np.zeros((4, 4), np.float32)]
    with pytest.raises(ValueError, match="masks"):
        choose_synthetic_thresholds(maps, [0.0], maps, [1.0], [], "perlin", 0)
    with pytest.raises(ValueError, match="scores"):
        choose_synthetic_thresholds(maps, [0.0, 1.0], maps, [1.0], [np.ones((4, 4), bool)], "perlin", 0)


@pytest.mark.slow
def test_evaluate_and_zoo_study_commands_take_the_option(model, blobs, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model.save(model_dir)
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", "--model", str(model_dir), "--data", str(blobs), "--out", str(out),
                 "--synthetic-validation", "perlin"]) == 0
    assert json.loads((out / "results.json").read_text())["thresholds"]["synthetic_validation"]["method"] == "perlin"
    assert "which this model may have been fitted on" in capsys.readouterr().err  # a saved model does not say

    study = tmp_path / "zoo"
    args = ["-q", "zoo-study", "--data", str(blobs), "--out", str(study), "--detectors", "padim",
            "--image-size", "48", "--in-process"]
    assert main([*args, "--synthetic-validation", "cutpaste"]) == 0
    assert "may have been fitted on" not in capsys.readouterr().err  # the zoo holds the T1 share out
    results_file = study / "cells" / "padim" / "train-blobs" / "test-blobs" / "results.json"
    results = json.loads(results_file.read_text())
    assert results["synthetic_validation"] == "cutpaste"
    assert results["thresholds"]["synthetic_validation"]["method"] == "cutpaste"
    assert "real_chosen" in results["thresholds"]
    summary = json.loads((study / "zoo_study.json").read_text())
    assert summary["settings"]["synthetic_validation"] == "cutpaste"
    assert summary["rows"][0]["t2"] == results["thresholds"]["T2"]["value"]
    # a rerun without the option redoes the test (thresholds chosen otherwise), not the fit
    fit_time = (study / "cells" / "padim" / "train-blobs" / "fit.json").stat().st_mtime_ns
    assert main(args) == 0
    results = json.loads(results_file.read_text())
    assert "synthetic_validation" not in results and "synthetic_validation" not in results["thresholds"]
    assert (study / "cells" / "padim" / "train-blobs" / "fit.json").stat().st_mtime_ns == fit_time
