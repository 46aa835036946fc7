"""Shared fixtures: small datasets written on the fly, and the location of the real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random texture (uint8 RGB) that pretrained features find 'normal'."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.normal(size=(height, width)), 2.0)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    gray = (80 + 100 * noise).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def one_torch_thread():
    """Train with one torch thread: on a loaded 2-core machine two spinning threads make a step 30-50x slower.

    For the trained detectors' tests (their numbers do not depend on the thread count they are compared at).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mvtec_category(tmp_path: Path) -> Path:
    """A minimal MVTec-layout category: 3 train, 1 good and 2 defective test images (one with two blobs)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "widget"
    for i in range(3):
        save_png(root / "train" / "good" / f"{i:03d}.png", textured_image(rng, 48, 64))
    save_png(root / "test" / "good" / "000.png", textured_image(rng, 48, 64))
    for stem in ("000", "001"):
        image = textured_image(rng, 48, 64)
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[5:10, 5:12] = 255
        if stem == "001":
            mask[30:40, 40:44] = 255
        image[mask > 0] = 250
        save_png(root / "test" / "crack" / f"{stem}.png", image)
        save_png(root / "ground_truth" / "crack" / f"{stem}_mask.png", mask)
    return root


def write_blob_category(root: Path, seed: int, n_train: int = 10, n_test: int = 7, shape=(48, 64)) -> Path:
    """An MVTec-layout category large enough for the T1-T3 shares: ``n_test`` good, crack and stain images each.

    Defects are bright (crack) or dark (stain) rectangles at seeded places, masked exactly.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    for i in range(n_train):
        save_png(root / "train" / "good" / f"{i:03d}.png", textured_image(rng, height, width))
    for i in range(n_test):
        save_png(root / "test" / "good" / f"{i:03d}.png", textured_image(rng, height, width))
        for defect, value in (("crack", 250), ("stain", 10)):
            image = textured_image(rng, height, width)
            mask = np.zeros(shape, dtype=np.uint8)
            top, left = int(rng.integers(2, height - 14)), int(rng.integers(2, width - 14))
            mask[top:top + 10, left:left + 10] = 255
            image[mask > 0] = value
            save_png(root / "test" / defect / f"{i:03d}.png", image)
            save_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture
def blob_category(tmp_path: Path) -> Path:
    """:func:`write_blob_category`: 10 train, 7 good + 7 crack + 7 stain test images of 64x48."""
    return write_blob_category(tmp_path / "blobs", seed=3)


@pytest.fixture
def autovi_category(tmp_path: Path) -> Path:
    """A minimal AutoVI-layout category with one absolute and one relative defect type."""
    rng = np.random.default_rng(1)
    root = tmp_path / "pipe_clip"
    config = [
        {"defect_name": "scratch", "pixel_value": 255, "saturation_threshold": 20, "relative_saturation": False},
        {"defect_name": "missing", "pixel_value": 200, "saturation_threshold": 0.5, "relative_saturation": True},
    ]
    root.mkdir(parents=True)
    (root / "defects_config.json").write_text(json.dumps(config))
    for i in range(2):
        save_png(root / "train" / "good" / f"{i:04d}.png", textured_image(rng, 40, 40))
    save_png(root / "test" / "good" / "0000.png", textured_image(rng, 40, 40))
    save_png(root / "test" / "scratch" / "0000.png", textured_image(rng, 40, 40))
    region_a = np.zeros((40, 40, 3), dtype=np.uint8)
    region_a[2:8, 2:8] = 255  # 36 px, absolute saturation 20
    region_b = np.zeros((40, 40, 3), dtype=np.uint8)
    region_b[20:30, 20:30] = 200  # 100 px, relative 0.5 -> 50
    save_png(root / "ground_truth" / "scratch" / "0000" / "000.png", region_a)
    save_png(root / "ground_truth" / "scratch" / "0000" / "001.png", region_b)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 'tiny' dataset (all six categories), generated once per test session."""
    from fedinspect.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "tiny", seed=0, size="tiny", progress=False)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real images not available at {REAL_DATA}")
    return REAL_DATA
