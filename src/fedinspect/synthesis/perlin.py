"""Two-dimensional Perlin (gradient) noise and the thresholded masks DRAEM draws its anomalies from.

Perlin noise puts a random unit gradient at each corner of a ``res[0] x res[1]`` lattice and blends
the corners' dot products with the quintic fade 6t^5 - 15t^4 + 10t^3, so it is smooth, zero at the
lattice points and lies in [-1, 1] after the sqrt(2) scaling. Thresholding it gives blobs of random,
organic shape whose size follows the lattice: coarse lattices give large blobs, fine ones small.
"""

from __future__ import annotations

import math

import numpy as np


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant: 0 at 0, 1 at 1, first and second derivatives 0 at both ends."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def noise_from_gradients(shape: tuple[int, int], gradients: np.ndarray) -> np.ndarray:
    """Perlin noise of ``shape`` (H, W) from lattice gradients (res_y + 1, res_x + 1, 2).

    Pixel (y, x) sits at lattice position (y * res_y / H, x * res_x / W), so pixel (0, 0) is on a
    lattice point and any H, W works (no need for the shape to be a multiple of the lattice).
    """
    height, width = shape
    res_y, res_x = gradients.shape[0] - 1, gradients.shape[1] - 1
    if gradients.ndim != 3 or gradients.shape[2] != 2 or res_y < 1 or res_x < 1:
        raise ValueError(f"gradients must have shape (res_y + 1, res_x + 1, 2) with res >= 1, got {gradients.shape}")
    pos_y = np.arange(height) * (res_y / height)
    pos_x = np.arange(width) * (res_x / width)
    cell_y, cell_x = np.floor(pos_y).astype(int), np.floor(pos_x).astype(int)
    fy = (pos_y - cell_y)[:, None]
    fx = (pos_x - cell_x)[None, :]
    iy, ix = cell_y[:, None], cell_x[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) + u * (corner(1, 0) - corner(0, 0))
    bottom = corner(0, 1) + u * (corner(1, 1) - corner(0, 1))
    return (math.sqrt(2) * (top + v * (bottom - top))).astype(np.float32)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``shape`` on a ``res`` lattice with random unit gradients drawn from ``rng``."""
    if min(res) < 1:
        raise ValueError(f"the lattice needs at least one cell per axis, got {res}")
    angles = rng.uniform(0.0, 2 * math.pi, (res[0] + 1, res[1] + 1))
    return noise_from_gradients(shape, np.stack([np.cos(angles), np.sin(angles)], axis=-1))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0, max_scale: int = 6,
                threshold: float = 0.5) -> np.ndarray:
    """A boolean (H, W) mask: Perlin noise above ``threshold`` on a lattice of random scale.

    As in DRAEM, the lattice has 2**k cells along the short side, with k drawn for each axis
    uniformly from ``[min_scale, max_scale)`` (0..5: from one blob the size of the image to 32 small ones);
    the long side of a non-square image gets proportionally more cells. DRAEM also rotates the noise by a
    random angle; the lattice's two independent scales already give elongated shapes, so we do not.
    """
    if not 0 <= min_scale < max_scale:
        raise ValueError(f"need 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    height, width = shape
    short = min(height, width)
    exponents = rng.integers(min_scale, max_scale, size=2)
    res = (min(height, max(1, round(2 ** int(exponents[0]) * height / short))),
           min(width, max(1, round(2 ** int(exponents[1]) * width / short))))
    return perlin_noise(shape, res, rng) > threshold
