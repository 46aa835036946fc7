"""Simulated defects: Perlin-noise masks, texture sources, the DRAEM blend and the defect generators.

The pieces are small on purpose so that generators and detectors share them: ``perlin_mask(shape, rng)``, a
:class:`TextureSource`, ``simulate_anomaly(image, rng, textures) -> (image, mask)`` (the ``draem`` detector's
training defects), and the :class:`DefectGenerator` registry of ``fedinspect synthesize``
(:func:`make_generator`: ``perlin``, ``cutpaste``, ``cutpaste_scar``, ``memseg``; ``diffusion`` lives in
:mod:`fedinspect.synthesis.diffusion`, which imports diffusers only when a pipeline is loaded).

The names are imported on first use, so that the command line (which imports
:mod:`fedinspect.synthesis.commands` to build its parser) does not pay for numpy and Pillow at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "simulate_anomaly": "anomaly_simulation",
    "perlin_mask": "perlin",
    "perlin_noise": "perlin",
    "TextureSource": "textures",
    "METHODS": "generators",
    "OFFLINE_METHODS": "generators",
    "CutPasteGenerator": "generators",
    "DefectGenerator": "generators",
    "MemSegGenerator": "generators",
    "PerlinGenerator": "generators",
    "SynthesisError": "generators",
    "make_generator": "generators",
}
__all__ = ["METHODS", "OFFLINE_METHODS", "CutPasteGenerator", "DefectGenerator", "MemSegGenerator",
           "PerlinGenerator", "SynthesisError", "TextureSource", "make_generator", "perlin_mask", "perlin_noise",
           "simulate_anomaly"]

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
