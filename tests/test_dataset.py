from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.data.dataset import CategoryDataset, find_categories, read_defects_config
from fedinspect.data.images import read_image
from fedinspect.errors import DataError

from .conftest import save_png


def test_mvtec_layout_regions_are_connected_components(mvtec_category: Path) -> None:
    dataset = CategoryDataset(mvtec_category)
    assert dataset.layout == "mvtec"
    assert (len(dataset.train), len(dataset.test)) == (3, 3)
    assert dataset.defect_types == ["crack"]
    sample = next(s for s in dataset.test if s.stem == "001")
    regions = dataset.load_regions(sample, (48, 64))
    assert sorted(r.area for r in regions) == [35, 40]
    # classic PRO: each component saturates at its full area
    assert all(r.saturation_area == r.area for r in regions)
    assert all(r.defect_name == "crack" for r in regions)


def test_autovi_layout_saturation_from_config(autovi_category: Path) -> None:
    dataset = CategoryDataset(autovi_category)
    assert dataset.layout == "autovi"
    sample = next(s for s in dataset.test if s.label == 1)
    regions = dataset.load_regions(sample, (40, 40))
    by_name = {r.defect_name: r for r in regions}
    assert by_name["scratch"].area == 36 and by_name["scratch"].saturation_area == 20  # min(20, 36)
    assert by_name["missing"].area == 100 and by_name["missing"].saturation_area == 50  # int(0.5 * 100)


def test_good_and_defect_labels(autovi_category: Path) -> None:
    dataset = CategoryDataset(autovi_category)
    assert sorted((s.defect, s.label) for s in dataset.test) == [("good", 0), ("scratch", 1)]
    assert all(s.label == 0 and s.split == "train" for s in dataset.train)


def test_grayscale_and_rgb_images_read_as_rgb(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_png(tmp_path / "g.png", gray)
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == gray).all() and (rgb[..., 2] == gray).all()
    color = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "c.png", color)
    assert (read_image(tmp_path / "c.png") == color).all()


def test_missing_train_folder_is_named(mvtec_category: Path) -> None:
    for image in (mvtec_category / "train" / "good").iterdir():
        image.unlink()
    (mvtec_category / "train" / "good").rmdir()
    with pytest.raises(DataError, match=r"train/good: missing folder"):
        CategoryDataset(mvtec_category)


def test_truncated_image_is_named(mvtec_category: Path) -> None:
    path = mvtec_category / "train" / "good" / "001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.train if s.image_path == path)
    with pytest.raises(DataError, match=r"001\.png: unreadable or truncated"):
        dataset.load_image(sample)


def test_not_an_image_is_named(mvtec_category: Path) -> None:
    path = mvtec_category / "train" / "good" / "002.png"
    path.write_text("hello")
    dataset = CategoryDataset(mvtec_category)
    with pytest.raises(DataError, match=r"002\.png: not a readable image"):
        dataset.load_image(dataset.train[2])


def test_mask_size_mismatch_names_both_files(mvtec_category: Path) -> None:
    save_png(mvtec_category / "ground_truth" / "crack" / "000_mask.png", np.zeros((10, 10), np.uint8))
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.test if s.stem == "000" and s.label)
    with pytest.raises(DataError, match=r"000_mask\.png: mask size 10x10 differs from its image .*crack/000\.png"):
        dataset.load_regions(sample, (48, 64))


def test_defect_image_without_ground_truth(mvtec_category: Path) -> None:
    (mvtec_category / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack/001\.png: defective test image has no ground truth"):
        CategoryDataset(mvtec_category)


def test_autovi_mask_value_absent_from_config(autovi_category: Path) -> None:
    bad = np.zeros((40, 40, 3), dtype=np.uint8)
    bad[0:3, 0:3] = 77
    save_png(autovi_category / "ground_truth" / "scratch" / "0000" / "002.png", bad)
    dataset = CategoryDataset(autovi_category)
    sample = next(s for s in dataset.test if s.label)
    with pytest.raises(DataError, match=r"002\.png: mask value 77 is not in defects_config\.json"):
        dataset.load_regions(sample, (40, 40))


def test_autovi_without_config_is_explained(autovi_category: Path) -> None:
    (autovi_category / "defects_config.json").unlink()
    with pytest.raises(DataError, match=r"defects_config\.json is missing"):
        CategoryDataset(autovi_category)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"defect_name": "a", "pixel_value": 0, "saturation_threshold": 5, "relative_saturation": False},
         "pixel_value must be"),
        ({"defect_name": "a", "pixel_value": 9, "saturation_threshold": 1.5, "relative_saturation": True},
         "relative saturation_threshold"),
        ({"defect_name": "a", "pixel_value": 9, "saturation_threshold": 0.5, "relative_saturation": False},
         "absolute saturation_threshold"),
        ({"defect_name": "a", "pixel_value": 9}, "lacks key"),
    ],
)
def test_defects_config_validation(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=message):
        read_defects_config(path)


def test_multichannel_autovi_mask_identical_channels_is_one_region(autovi_category: Path) -> None:
    dataset = CategoryDataset(autovi_category)
    sample = next(s for s in dataset.test if s.label)
    regions = dataset.load_regions(sample, (40, 40))
    assert len(regions) == 2  # two PNGs with three identical channels each


def test_empty_mvtec_mask_counts_for_image_level_only(mvtec_category: Path) -> None:
    save_png(mvtec_category / "ground_truth" / "crack" / "000_mask.png", np.zeros((48, 64), np.uint8))
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.test if s.stem == "000" and s.label)
    with pytest.warns(UserWarning, match="empty ground-truth mask"):
        assert dataset.load_regions(sample, (48, 64)) == []


def test_varying_image_sizes_inside_a_category(mvtec_category: Path) -> None:
    rng = np.random.default_rng(3)
    save_png(mvtec_category / "train" / "good" / "003.png", rng.integers(0, 255, (30, 150), dtype=np.uint8))
    dataset = CategoryDataset(mvtec_category)
    shapes = {dataset.load_image(s).shape for s in dataset.train}
    assert shapes == {(48, 64, 3), (30, 150, 3)}


def test_find_categories(tmp_path: Path, mvtec_category: Path) -> None:
    assert find_categories(mvtec_category) == [mvtec_category]
    assert find_categories(mvtec_category.parent) == [mvtec_category]
    with pytest.raises(DataError, match="no category folder"):
        find_categories(tmp_path / "widget" / "test")


def test_sixteen_bit_image(tmp_path: Path) -> None:
    array = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "d.png")
    image = read_image(tmp_path / "d.png")
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == round(57000 / 65535 * 255)
