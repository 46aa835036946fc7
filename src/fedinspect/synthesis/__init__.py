"""Simulated defects for training: Perlin-noise masks, texture sources and the DRAEM blend.

The pieces are small on purpose so that other generators (CutPaste, a supervised detector's synthetic
defects) reuse them: ``perlin_mask(shape, rng)``, a :class:`TextureSource`, and
``simulate_anomaly(image, rng, textures) -> (image, mask)``.
"""

from fedinspect.synthesis.anomaly_simulation import simulate_anomaly
from fedinspect.synthesis.perlin import perlin_mask, perlin_noise
from fedinspect.synthesis.textures import TextureSource

__all__ = ["TextureSource", "perlin_mask", "perlin_noise", "simulate_anomaly"]
