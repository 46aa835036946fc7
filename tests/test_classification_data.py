"""Labelled view, stratified split, client shares and image tensors of the classification data layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedinspect.classification.data import (
    LabelledImage,
    LabelledView,
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


def _view(counts: list[int]) -> LabelledView:
    items = [LabelledImage(Path(f"c{label}_{i}.png"), label) for label, n in enumerate(counts) for i in range(n)]
    return LabelledView(Path("."), tuple(f"class{i}" for i in range(len(counts))), tuple(items))


def test_a_train_fraction_deals_a_stratified_subsample_and_keeps_the_test_split() -> None:
    view = _view([100, 40, 10, 5])
    full = split_view(view, 2, seed=0)
    half = split_view(view, 2, seed=0, train_fraction=0.5)
    assert half.test == full.test  # the same test split whatever the fraction
    assert set(half.train.items) < set(full.train.items)
    # per class round(0.5 n) of the training part (80, 32, 8, 4), a class of two or more keeping at least one
    assert list(half.train.counts().values()) == [40, 16, 4, 2]
    dealt = [i for c in half.clients for i in c.items]
    assert len(dealt) == len(half.train.items) and set(dealt) == set(half.train.items)  # all of it, once
    assert split_view(view, 2, seed=0, train_fraction=0.5) == half  # seeded
    other = split_view(view, 2, seed=0, train_fraction=0.5, fraction_seed=1)
    assert other.test == half.test and other.train != half.train  # another subsample of the same training part
    assert split_view(view, 2, seed=0, train_fraction=1.0) == full
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            split_view(view, 2, train_fraction=bad)
