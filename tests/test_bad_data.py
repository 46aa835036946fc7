"""Bad input files: each is a clear DataError naming the file, or read in a documented way with a warning."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.data.dataset import CategoryDataset, find_categories
from fedinspect.data.images import image_size, read_image
from fedinspect.errors import DataError, FedinspectError

from .conftest import save_png, textured_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, color_type: int, bit_depth: int, rows: bytes) -> Path:
    """A PNG written by hand (not by Pillow): ``rows`` are the raw scanlines, each after a filter byte 0."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
                     + _chunk(b"IEND", b""))
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG of ``array`` (H, W) gray or (H, W, 3) RGB, big-endian samples as the format stores them."""
    color_type = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return write_png(path, array.shape[1], array.shape[0], color_type, 16, rows)


def write_bomb(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` gray pixels (its data is one row: never decoded)."""
    return write_png(path, width, height, 0, 8, b"\x00" * (width + 1))


# 5. Decompression bombs and the pixel limit


@pytest.mark.parametrize("side", [15_000, 12_000])  # above Pillow's hard limit; between its warning and error
def test_oversized_image_is_a_data_error_naming_the_file(tmp_path: Path, side: int) -> None:
    bomb = write_bomb(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        for read in (read_image, image_size):
            with pytest.raises(DataError, match=r"bomb\.png: image .*too large|bomb\.png: image of .* exceeds"):
                read(bomb)


def test_image_under_the_default_limit_reads_its_header_without_warning(tmp_path: Path) -> None:
    big = write_bomb(tmp_path / "big.png", 9_500, 9_500)  # 90.25 MP: above Pillow's warning, under our 100 MP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(big) == (9_500, 9_500)


def test_pixel_limit_is_read_from_the_environment_at_use_time(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_png(tmp_path / "small.png", np.zeros((48, 64), np.uint8))
    assert read_image(path).shape == (48, 64, 3)
    monkeypatch.setenv("FEDINSPECT_MAX_IMAGE_PIXELS", "3071")
    with pytest.raises(DataError, match=r"small\.png: image of 64x48 = 3072 pixels exceeds the limit of 3071 .*"
                                        r"FEDINSPECT_MAX_IMAGE_PIXELS"):
        read_image(path)
    monkeypatch.setenv("FEDINSPECT_MAX_IMAGE_PIXELS", "3072")
    assert image_size(path) == (48, 64)
    monkeypatch.setenv("FEDINSPECT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(FedinspectError, match="FEDINSPECT_MAX_IMAGE_PIXELS must be a positive whole number"):
        read_image(path)


@pytest.mark.slow
def test_federation_drops_the_client_holding_a_bomb(tmp_path: Path) -> None:
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig, run_federation

    rng = np.random.default_rng(5)
    root = tmp_path / "data" / "bolt"
    for i in range(4):
        save_png(root / "train" / "good" / f"{i:03d}.png", textured_image(rng, 48, 64))
    save_png(root / "test" / "good" / "000.png", textured_image(rng, 48, 64))
    save_png(root / "test" / "dent" / "000.png", textured_image(rng, 48, 64))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:20] = 255
    save_png(root / "ground_truth" / "dent" / "000_mask.png", mask)
    bomb = write_bomb(root / "train" / "good" / "002.png", 15_000, 15_000)

    config = FederationConfig(clients=2, global_size=200, compare_shared=False, write_maps=False,
                              settings=RoundSettings(image_size=64))
    results = run_federation(tmp_path / "data", tmp_path / "run", config, progress=False, report=False)
    assert len(results["missing_clients"]) == 1 and len(results["clients"]) == 1
    assert str(bomb) in results["missing_clients"][0]["reason"]
    assert results["centralized"]["skipped_images"] == [str(bomb)]


# 6. Two images with one name


@pytest.mark.parametrize("folder", ["train/good", "test/good", "test/crack"])
def test_two_images_with_one_stem_are_refused_naming_both(mvtec_category: Path, folder: str) -> None:
    first = mvtec_category / folder / "000.png"
    first.parent.mkdir(parents=True, exist_ok=True)
    if not first.exists():
        save_png(first, np.zeros((48, 64), np.uint8))
    Image.open(first).convert("RGB").save(mvtec_category / folder / "000.jpg")
    with pytest.raises(DataError, match=rf"{folder}/000\.png: same name as .*{folder}/000\.jpg"):
        CategoryDataset(mvtec_category)


def test_two_masks_for_one_image_are_refused_naming_both(mvtec_category: Path) -> None:
    truth = mvtec_category / "ground_truth" / "crack"
    Image.open(truth / "000_mask.png").save(truth / "000_mask.bmp")
    with pytest.raises(DataError, match=r"crack/000\.png: ambiguous ground truth: .*000_mask\.png, .*000_mask\.bmp"):
        CategoryDataset(mvtec_category)


# 7. MVTec masks that are not 0/255


@pytest.mark.parametrize("value", [100, 7, 1, 255])
def test_any_non_zero_mask_value_is_defect(mvtec_category: Path, value: int) -> None:
    mask = np.zeros((48, 64), np.uint8)
    mask[5:10, 5:12] = value  # 35 px
    mask[30:40, 40:44] = value  # 40 px
    save_png(mvtec_category / "ground_truth" / "crack" / "001_mask.png", mask)
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.test if s.stem == "001" and s.label)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a binary mask, whatever its value, reads silently
        regions = dataset.load_regions(sample, (48, 64))
    assert sorted(r.area for r in regions) == [35, 40]


def test_non_binary_mask_warns_naming_file_and_values(mvtec_category: Path) -> None:
    mask = np.zeros((48, 64), np.uint8)
    mask[0:4, 0:4] = 30
    mask[20:22, 20:30] = 200
    path = save_png(mvtec_category / "ground_truth" / "crack" / "000_mask.png", mask)
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.test if s.stem == "000" and s.label)
    with pytest.warns(UserWarning, match=rf"{path}: mask is not binary \(non-zero values 30, 200\)"):
        regions = dataset.load_regions(sample, (48, 64))
    assert sorted(r.area for r in regions) == [16, 20]


def test_noise_mask_warns_and_lists_a_few_values(mvtec_category: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint8)
    save_png(mvtec_category / "ground_truth" / "crack" / "000_mask.png", noise)
    dataset = CategoryDataset(mvtec_category)
    sample = next(s for s in dataset.test if s.stem == "000" and s.label)
    with pytest.warns(UserWarning, match=r"000_mask\.png: mask is not binary .*\.\.\. \(255 values\)"):
        regions = dataset.load_regions(sample, (48, 64))
    assert sum(r.area for r in regions) == int((noise != 0).sum())


# 8. Dangling symlinks and folders that are not categories


def test_dangling_symlink_is_refused_naming_it(mvtec_category: Path) -> None:
    link = mvtec_category / "train" / "good" / "009.png"
    link.symlink_to(mvtec_category / "elsewhere" / "gone.png")
    with pytest.raises(DataError, match=r"train/good/009\.png: broken symbolic link to .*elsewhere/gone\.png"):
        CategoryDataset(mvtec_category)


def test_category_without_train_is_refused_and_other_folders_are_named(mvtec_category: Path) -> None:
    (mvtec_category.parent / "notes").mkdir()
    with pytest.warns(UserWarning, match=r"notes: not a category \(no train/ folder\); ignored"):
        assert find_categories(mvtec_category.parent) == [mvtec_category]
    broken = mvtec_category.parent / "gadget"
    save_png(broken / "test" / "good" / "000.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"gadget/train: missing folder"):
        find_categories(mvtec_category.parent)


# 9. 16-bit images scale by bit depth, not by their brightest pixel

SIXTEEN_BIT = np.array([[65535, 32768, 256, 255, 0]], dtype=np.uint16)
EIGHT_BIT = [255, 128, 1, 0, 0]  # value // 256: 65535 -> 255, 32768 -> 128, 256 -> 1, 255 -> 0


def test_sixteen_bit_gray_png_scales_by_bit_depth(tmp_path: Path) -> None:
    image = read_image(write_png16(tmp_path / "gray16.png", SIXTEEN_BIT))
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    assert image.dtype == np.uint8 and image.shape == (1, 5, 3)
    assert image[0, :, 0].tolist() == EIGHT_BIT and (image[..., 1] == image[..., 0]).all()
    dark = read_image(write_png16(tmp_path / "dark16.png", np.full((2, 2), 256, np.uint16)))
    assert (dark == 1).all()  # its maximum is 256, not full brightness


def test_sixteen_bit_rgb_png_matches_gray(tmp_path: Path) -> None:
    rgb = np.stack([SIXTEEN_BIT, SIXTEEN_BIT[:, ::-1], SIXTEEN_BIT], axis=2)
    path = write_png16(tmp_path / "rgb16.png", rgb)
    assert Image.open(path).mode == "RGB"  # Pillow reduces 16-bit colour to 8 bits itself
    image = read_image(path)
    assert image[0, :, 0].tolist() == EIGHT_BIT and image[0, :, 1].tolist() == EIGHT_BIT[::-1]


@pytest.mark.parametrize(("dtype", "mode"), [("<u2", "I;16"), (">u2", "I;16B"), ("<i4", "I")])
def test_sixteen_bit_tiff_modes(tmp_path: Path, dtype: str, mode: str) -> None:
    path = tmp_path / "image.tif"
    Image.fromarray(SIXTEEN_BIT.astype(dtype)).save(path)
    assert Image.open(path).mode == mode
    assert read_image(path)[0, :, 0].tolist() == EIGHT_BIT


def test_integer_and_float_images_without_a_fixed_scale_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 70_000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide\.tif: 32-bit integer image with values 0\.\.70000"):
        read_image(tmp_path / "wide.tif")
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: floating-point image"):
        read_image(tmp_path / "float.tif")
