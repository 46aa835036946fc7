from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fedinspect.detectors.preprocessing import Letterbox, gaussian_blur


def test_strip_keeps_its_aspect_ratio() -> None:
    letterbox = Letterbox(short_side=64, multiple=16)
    image = np.full((100, 500, 3), 50, dtype=np.uint8)
    image[40:60, 240:260] = 255  # a square defect
    tensor = letterbox(image)
    assert tuple(tensor.shape) == (3, 64, 320)
    ys, xs = np.nonzero(tensor[0].numpy() > 0.6)
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert abs(height - width) <= 1, "a square defect must stay square"


def test_padding_to_multiple_and_restore_to_original_size() -> None:
    letterbox = Letterbox(short_side=50, multiple=16)
    assert letterbox.resized_shape(75, 100) == (50, 67)
    assert letterbox.padded_shape(75, 100) == (64, 80)
    smooth = torch.linspace(0, 1, 80).repeat(64, 1)
    restored = letterbox.restore(smooth, (75, 100))
    assert restored.shape == (75, 100) and restored.dtype == np.float32
    # the padded columns (67..79) are cropped away: the restored map ends where the image ended
    assert restored[:, -1].max() < smooth[0, 67].item()


def test_letterbox_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        Letterbox()(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    maps = np.random.default_rng(0).normal(size=(2, 40, 50)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    for i in range(2):
        # torch's 'reflect' padding is scipy's 'mirror' mode
        reference = gaussian_filter(maps[i].astype(np.float64), sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], reference, atol=1e-5)


def _blur_by_hand(image: np.ndarray, sigma: float) -> np.ndarray:
    """Width then height: numpy's reflect padding, a kernel cut at 4 sigma (shorter than the side), summing to 1."""
    out = image.astype(np.float64)
    for axis in (1, 0):
        radius = min(int(4 * sigma + 0.5), out.shape[axis] - 1)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        cells = np.arange(out.shape[axis]) + radius
        out = sum(w * np.take(padded, cells + o, axis=axis) for w, o in zip(kernel, offsets, strict=True))
    return out


@pytest.mark.parametrize("shape", [(40, 50), (7, 90), (3, 4)])  # (7, 90) and (3, 4): the kernel is cut short
def test_gaussian_blur_matches_a_direct_convolution(shape: tuple[int, int]) -> None:
    maps = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), 4.0)
    assert ours.dtype == torch.float32 and ours.shape == maps.shape
    for i in range(2):
        np.testing.assert_allclose(ours[i].numpy(), _blur_by_hand(maps[i], 4.0), atol=1e-5)


def test_gaussian_blur_small_map_keeps_mass() -> None:
    maps = torch.ones(1, 3, 4)
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), 1.0, atol=1e-6)


def test_square_letterbox_stretches_every_shape_onto_one_grid() -> None:
    box = Letterbox(short_side=32, multiple=16, square=True)
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 40:] = 255  # right half white: after stretching, still the right half
    tensor = box(wide)
    assert tuple(tensor.shape) == (3, 32, 32) and box.padded_shape(13, 90) == (32, 32)
    assert float(tensor[:, :, :15].max()) == 0.0 and float(tensor[:, :, 17:].min()) == 1.0
    restored = box.restore(tensor[0], (40, 80))
    assert restored.shape == (40, 80)
    assert restored[:, :36].max() < 0.05 and restored[:, 44:].min() > 0.95
