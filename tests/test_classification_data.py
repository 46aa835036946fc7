"""Labelled view, stratified split, client shares and image tensors of the classification data layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedinspect.classification.data import (
    client_shares,
    image_tensor,
    labelled_view,
    split_view,
    stratified_split,
)
from fedinspect.errors import DataError
from fedinspect.privacy.obfuscation import Obfuscation, switch_rows
from tests.conftest import save_png, textured_image


def test_mvtec_layout_gives_good_plus_defect_classes(mvtec_category: Path) -> None:
    view = labelled_view(mvtec_category)
    assert view.classes == ("good", "crack")
    assert view.counts() == {"good": 4, "crack": 2}  # 3 train/good + 1 test/good; 2 test/crack
    assert {item.path.parent.name for item in view.items if item.label == 1} == {"crack"}


def test_autovi_layout_gives_good_plus_defect_classes(autovi_category: Path) -> None:
    view = labelled_view(autovi_category)
    assert view.classes == ("good", "scratch")
    assert view.counts() == {"good": 3, "scratch": 1}


def test_a_dataset_with_several_categories_is_refused(mvtec_category: Path, autovi_category: Path) -> None:
    with pytest.raises(DataError, match="classification needs one category folder"):
        labelled_view(mvtec_category.parent)


def test_a_category_without_defects_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    save_png(tmp_path / "c" / "train" / "good" / "0.png", textured_image(rng, 16, 16))
    save_png(tmp_path / "c" / "test" / "good" / "0.png", textured_image(rng, 16, 16))
    with pytest.raises(DataError, match="no defect folder"):
        labelled_view(tmp_path / "c")


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares() -> None:
    labels = [0] * 50 + [1] * 20 + [2] * 5 + [3] * 2
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + test) == list(range(len(labels)))
    counts = np.bincount(np.asarray(labels)[test], minlength=4).tolist()
    assert counts == [10, 4, 1, 1]  # round(0.2 n), at least one of a class with two or more items
    assert (train, test) == stratified_split(labels, 0.2, seed=3)
    assert test != stratified_split(labels, 0.2, seed=4)[1]


def test_client_shares_cover_the_training_items_once() -> None:
    labels = [0] * 30 + [1] * 12 + [2] * 9
    for scheme in ("iid", "dirichlet"):
        shares = client_shares(labels, 3, scheme, seed=1, alpha=0.3)
        assert sorted(i for share in shares for i in share) == list(range(len(labels)))
    iid = client_shares(labels, 3, "iid", seed=1)
    assert [np.bincount(np.asarray(labels)[s]).tolist() for s in iid] == [[10, 4, 3]] * 3
    with pytest.raises(ValueError, match="unknown partition"):
        client_shares(labels, 3, "category")


def test_split_view_deals_the_training_part_to_the_clients(mvtec_category: Path) -> None:
    split = split_view(labelled_view(mvtec_category), 2, seed=0)
    assert len(split.train.items) + len(split.test.items) == 6
    assert sum(len(c.items) for c in split.clients) == len(split.train.items)
    with pytest.raises(ValueError, match="clients must be in"):
        split_view(labelled_view(mvtec_category), 50)


def test_images_are_resized_then_obfuscated(mvtec_category: Path) -> None:
    view = labelled_view(mvtec_category)
    plain = image_tensor(view, 20)
    assert plain.shape == (6, 3, 20, 20) and 0 <= float(plain.min()) and float(plain.max()) <= 1
    obfuscated = image_tensor(view, 20, Obfuscation(("switch_row",), key=5))
    expected = switch_rows((plain[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), 5)
    assert np.array_equal((obfuscated[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)
