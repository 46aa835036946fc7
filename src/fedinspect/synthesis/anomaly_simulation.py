"""DRAEM's simulated anomaly: a Perlin-noise mask filled with a texture, blended into a good image.

Inside the mask the result is ``beta * image + (1 - beta) * texture`` with the opacity ``beta`` drawn
from ``beta_range`` (DRAEM: [0.1, 1.0)); outside it the image is unchanged (Zavrtanik et al., eq. 1).
"""

from __future__ import annotations

import numpy as np

from fedinspect.synthesis.perlin import perlin_mask
from fedinspect.synthesis.textures import TextureSource


def simulate_anomaly(image: np.ndarray, rng: np.random.Generator, textures: TextureSource,
                     beta_range: tuple[float, float] = (0.1, 1.0),
                     anomaly_probability: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous image, boolean mask) from a good (H, W, 3) image, uint8 or float in [0, 1].

    The image keeps its dtype. With probability ``1 - anomaly_probability`` the image is returned as
    is with an empty mask (DRAEM trains on such clean pairs half the time, so that a good image maps to
    an empty mask).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    low, high = beta_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"beta_range must satisfy 0 <= low < high <= 1, got {beta_range}")
    if not 0.0 <= anomaly_probability <= 1.0:
        raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
    shape = image.shape[:2]
    if rng.random() >= anomaly_probability:
        return image.copy(), np.zeros(shape, dtype=bool)
    mask = perlin_mask(shape, rng)
    texture = textures.sample(shape, rng)
    beta = rng.uniform(low, high)
    as_float = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    blended = np.where(mask[..., None], beta * as_float + (1.0 - beta) * texture, as_float)
    if image.dtype == np.uint8:
        return np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8), mask
    return blended.astype(image.dtype, copy=False), mask
