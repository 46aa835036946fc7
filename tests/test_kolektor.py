"""Reading a KolektorSDD2-layout folder written here: labels from masks, clear errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.data.kolektor import LabelledImage, is_kolektor_layout, read_kolektor, read_kolektor_split
from fedinspect.errors import DataError


def write(folder: Path, name: str, defect: bool, size: tuple[int, int] = (40, 20)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((height, width), dtype=np.uint8)
    if defect:
        mask[5, 7] = 1  # a single non-zero pixel, of any value, makes the image defective
    Image.fromarray(mask).save(folder / f"{name}_GT.png")


@pytest.fixture
def ksdd2(tmp_path: Path) -> Path:
    root = tmp_path / "ksdd2"
    for name, defect in (("10000", False), ("10001", True), ("10002", False)):
        write(root / "train", name, defect)
    for name, defect in (("20000", True), ("20001", False)):
        write(root / "test", name, defect)
    return root


def test_reads_images_labels_and_masks(ksdd2: Path) -> None:
    assert is_kolektor_layout(ksdd2)
    data = read_kolektor(ksdd2)
    assert [(s.stem, s.label) for s in data["train"]] == [("10000", 0), ("10001", 1), ("10002", 0)]
    assert [(s.stem, s.label) for s in data["test"]] == [("20000", 1), ("20001", 0)]
    assert data["test"][0] == LabelledImage(ksdd2 / "test" / "20000.png", 1, ksdd2 / "test" / "20000_GT.png")


def test_mvtec_layout_is_not_taken_for_kolektor(tmp_path: Path) -> None:
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    assert not is_kolektor_layout(tmp_path / "cat")
    assert not is_kolektor_layout(tmp_path / "nothing")


def test_missing_mask_names_the_image(ksdd2: Path) -> None:
    (ksdd2 / "train" / "10001_GT.png").unlink()
    with pytest.raises(DataError, match=r"10001\.png: image without its mask: expected 10001_GT\.png"):
        read_kolektor(ksdd2)


def test_mask_without_image_is_refused(ksdd2: Path) -> None:
    (ksdd2 / "test" / "20001.png").unlink()
    with pytest.raises(DataError, match=r"20001_GT\.png: mask without its image"):
        read_kolektor_split(ksdd2 / "test")


def test_unreadable_and_mismatched_files_are_named(ksdd2: Path) -> None:
    (ksdd2 / "test" / "20000_GT.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"20000_GT\.png: not a readable image"):
        read_kolektor_split(ksdd2 / "test")
    write(ksdd2 / "test", "20000", True)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(ksdd2 / "test" / "20001_GT.png")
    with pytest.raises(DataError, match=r"20001_GT\.png: mask of 10x10 pixels, but its image 20001\.png is 20x40"):
        read_kolektor_split(ksdd2 / "test")


def test_missing_split_or_empty_folder(ksdd2: Path, tmp_path: Path) -> None:
    for path in (ksdd2 / "test").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no images found"):
        read_kolektor(ksdd2)
    with pytest.raises(DataError, match="missing folder"):
        read_kolektor_split(tmp_path / "absent")
