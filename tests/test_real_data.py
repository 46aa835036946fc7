"""End-to-end checks on real industrial images (../shared/data/real); skipped where absent."""

from __future__ import annotations

import pytest

from fedinspect.pipeline import evaluate_category, fit_category

pytestmark = [pytest.mark.slow, pytest.mark.real_data]


def test_mpdd_metal_plate_is_detected_and_localised(real_data, tmp_path) -> None:
    category = real_data / "mpdd" / "metal_plate"
    if not category.is_dir():
        pytest.skip(f"{category} absent")
    model = fit_category(category, tmp_path / "model", progress=False)
    results = evaluate_category(model, category, tmp_path / "results", progress=False)
    # anomalib 2.7 PatchCore with the same backbone: image AUROC 0.995, pixel AUROC 0.989, AUPRO 0.925
    assert results["image_auroc"] >= 0.98
    assert results["pixel_auroc"] >= 0.98
    assert results["auc_spro"]["0.3"] >= 0.90
    assert len(list((tmp_path / "results" / "maps").rglob("*.png"))) == results["counts"]["test"] == 97


def test_same_seed_reproduces_the_numbers(real_data, tmp_path) -> None:
    category = real_data / "glass" / "glass_chip"
    if not category.is_dir():
        pytest.skip(f"{category} absent")
    first = evaluate_category(fit_category(category, progress=False), category, progress=False, write_maps=False)
    second = evaluate_category(fit_category(category, progress=False), category, progress=False, write_maps=False)
    assert first["image_scores"] == second["image_scores"]
    assert first["auc_spro"] == second["auc_spro"]
