"""Simulated defects: Perlin-noise masks, texture sources, the DRAEM blend and the defect generators.

The pieces are small on purpose so that generators and detectors share them: ``perlin_mask(shape, rng)``, a
:class:`TextureSource`, ``simulate_anomaly(image, rng, textures) -> (image, mask)`` (the ``draem`` detector's
training defects), and the :class:`DefectGenerator` registry of ``fedinspect synthesize``
(:func:`make_generator`: ``perlin``, ``cutpaste``, ``cutpaste_scar``, ``memseg``; ``diffusion`` lives in
:mod:`fedinspect.synthesis.diffusion`, which imports diffusers only when a pipeline is loaded).
"""

from fedinspect.synthesis.anomaly_simulation import simulate_anomaly
from fedinspect.synthesis.generators import (
    METHODS,
    OFFLINE_METHODS,
    CutPasteGenerator,
    DefectGenerator,
    MemSegGenerator,
    PerlinGenerator,
    SynthesisError,
    make_generator,
)
from fedinspect.synthesis.perlin import perlin_mask, perlin_noise
from fedinspect.synthesis.textures import TextureSource

__all__ = ["METHODS", "OFFLINE_METHODS", "CutPasteGenerator", "DefectGenerator", "MemSegGenerator",
           "PerlinGenerator", "SynthesisError", "TextureSource", "make_generator", "perlin_mask", "perlin_noise",
           "simulate_anomaly"]
