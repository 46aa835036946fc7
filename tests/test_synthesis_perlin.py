"""Perlin-noise masks, texture sources and the DRAEM blend (fedinspect.synthesis), against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from fedinspect.errors import DataError
from fedinspect.synthesis import TextureSource, perlin_mask, perlin_noise, simulate_anomaly
from fedinspect.synthesis.perlin import fade, noise_from_gradients


def test_fade_and_a_single_cell_computed_by_hand():
    assert fade(np.array([0.0, 0.25, 0.5, 1.0])).tolist() == pytest.approx([0.0, 0.103515625, 0.5, 1.0])
    gradients = np.zeros((2, 2, 2))
    gradients[0, 0] = (1.0, 0.0)  # only the top-left corner has a gradient, pointing down (+y)
    noise = noise_from_gradients((4, 4), gradients)
    # pixel (1, 0): offset (0.25, 0) from the corner, dot product 0.25, weight 1 - fade(0.25) along y
    assert noise[1, 0] == pytest.approx(math.sqrt(2) * 0.25 * (1 - 0.103515625), abs=1e-6)
    # pixel (2, 2): the cell's centre, dot product 0.5, weight (1 - fade(0.5))^2 = 1/4
    assert noise[2, 2] == pytest.approx(math.sqrt(2) * 0.125, abs=1e-6)
    assert noise[0, 3] == 0.0  # offset (0, 0.75) is orthogonal to the gradient


def test_noise_is_zero_on_the_lattice_bounded_and_smooth():
    noise = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    assert noise.shape == (64, 96) and noise.dtype == np.float32
    np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-6)  # lattice points every 16 pixels
    assert np.abs(noise).max() <= 1.0 and noise.std() > 0.1
    assert np.abs(np.diff(noise, axis=0)).max() < 0.2 and np.abs(np.diff(noise, axis=1)).max() < 0.2


def test_masks_are_seeded_and_cover_part_of_the_image():
    first = [perlin_mask((64, 80), np.random.default_rng(5)) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    rng = np.random.default_rng(1)
    masks = [perlin_mask((64, 80), rng) for _ in range(40)]
    assert all(m.shape == (64, 80) and m.dtype == bool for m in masks)
    coverage = np.array([m.mean() for m in masks])
    assert 0.01 < coverage.mean() < 0.3 and coverage.max() < 0.8
    assert len({m.tobytes() for m in masks}) == 40
    with pytest.raises(ValueError, match="min_scale"):
        perlin_mask((8, 8), rng, min_scale=3, max_scale=3)


def test_simulated_anomaly_is_the_paper_blend_inside_the_mask_and_the_image_outside():
    textures = TextureSource([np.full((16, 16, 3), 200, np.uint8), np.full((20, 12, 3), 30, np.uint8)])
    image = np.random.default_rng(0).random((48, 64, 3)).astype(np.float32)
    out, mask = simulate_anomaly(image, np.random.default_rng(7), textures)
    # replay the same draws in the documented order: (anomaly?), mask, texture, beta
    rng = np.random.default_rng(7)
    rng.random()
    expected_mask = perlin_mask((48, 64), rng)
    texture = textures.sample((48, 64), rng)
    beta = rng.uniform(0.1, 1.0)
    np.testing.assert_array_equal(mask, expected_mask)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(out[~mask], image[~mask])
    np.testing.assert_allclose(out[mask], beta * image[mask] + (1 - beta) * texture[mask], atol=1e-6)

    unchanged, empty = simulate_anomaly(image, np.random.default_rng(7), textures, anomaly_probability=0.0)
    np.testing.assert_array_equal(unchanged, image)
    assert not empty.any()
    as_uint8, _ = simulate_anomaly((image * 255).astype(np.uint8), np.random.default_rng(7), textures)
    assert as_uint8.dtype == np.uint8
    with pytest.raises(ValueError, match="beta_range"):
        simulate_anomaly(image, rng, textures, beta_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="RGB"):
        simulate_anomaly(image[..., 0], rng, textures)


def test_texture_sources_builtin_and_from_a_folder(tmp_path):
    builtin = TextureSource.builtin()
    assert len(builtin) == 12 and "brick" in builtin.names and "stripes" in builtin.names
    sample = builtin.sample((40, 56), np.random.default_rng(0))
    assert sample.shape == (40, 56, 3) and sample.dtype == np.float32 and 0 <= sample.min() <= sample.max() <= 1
    np.testing.assert_array_equal(sample, builtin.sample((40, 56), np.random.default_rng(0)))

    with pytest.raises(DataError, match="not found") as error:
        TextureSource.from_folder(tmp_path / "dtd")
    assert str(tmp_path / "dtd") in str(error.value)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no image") as error:
        TextureSource.from_folder(tmp_path)
    assert str(tmp_path) in str(error.value)
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((24, 24, 3), 10, np.uint8)).save(tmp_path / "dark.png")
    source = TextureSource.from_folder(tmp_path)
    assert source.names == ["dark.png", "gray.png"] and source.textures[1].shape == (20, 30, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        TextureSource.from_folder(tmp_path)
