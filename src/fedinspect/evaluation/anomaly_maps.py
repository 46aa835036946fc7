"""Anomaly maps as 16-bit single-channel PNGs, the files the official AutoVI evaluation reads.

Scores are mapped linearly from [low, high] (one range per category, so that one threshold
means the same on every image) to 0..65535; 8-bit maps would lose too much resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fedinspect.data.images import read_mask

LEVELS = 65535


def score_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """(min, max) over all maps; a constant set gets a unit-wide range."""
    low = float(min(m.min() for m in maps))
    high = float(max(m.max() for m in maps))
    return (low, high) if high > low else (low, low + 1.0)


def write_map(path: str | Path, anomaly_map: np.ndarray, low: float, high: float) -> Path:
    """Write ``anomaly_map`` as a 16-bit grayscale PNG scaled from [low, high]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = np.clip((anomaly_map - low) / (high - low), 0.0, 1.0) * LEVELS
    # Fast compression: maps are written once per test image, and level 6 costs ~5x the time for ~10% less disk.
    Image.fromarray(np.rint(scaled).astype(np.uint16)).save(path, compress_level=1)
    return path


def read_map(path: str | Path, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Read a map written by :func:`write_map` back to scores in [low, high]."""
    levels = read_mask(path).astype(np.float64)
    return (low + levels / LEVELS * (high - low)).astype(np.float32)


def write_maps(
    targets: Sequence[tuple[Path, np.ndarray]], low: float, high: float, workers: int = 2
) -> list[Path]:
    """Write many maps with :func:`write_map`; PNG compression releases the GIL, so threads overlap."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda target: write_map(target[0], target[1], low, high), targets))
