"""Anomaly maps as 16-bit single-channel PNGs, the files the official AutoVI evaluation reads.

Scores are mapped linearly from [low, high] (one range per category, so that one threshold
means the same on every image) to 0..65535; 8-bit maps would lose too much resolution.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from fedinspect.data.images import read_mask

LEVELS = 65535


def score_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """(min, max) over all maps; a constant set gets a unit-wide range."""
    return _widened(float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))


def _widened(low: float, high: float) -> tuple[float, float]:
    """(low, high), or a unit-wide range from ``low`` where all scores are equal."""
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


class DeferredMaps:
    """Maps to be written as PNGs once the whole category's score range is known, without holding them all.

    :func:`write_map` scales every map of a category by one range, which only the last map completes. Each
    map :meth:`add`-ed goes to a ``.npy`` file in a temporary folder (our own file, read back without
    pickle) while the range is tracked; :meth:`write` then turns them into PNGs a batch at a time. Use it in
    a ``with`` block: the temporary files are deleted on leaving it, written or not.
    """

    def __init__(self, spill_dir: str | Path | None = None, workers: int = 2, batch: int = 16) -> None:
        self._folder = tempfile.TemporaryDirectory(dir=spill_dir, prefix="fedinspect-maps-")
        self._targets: list[Path] = []
        self._low, self._high = math.inf, -math.inf
        self.workers, self.batch = workers, batch

    def __enter__(self) -> DeferredMaps:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._folder.cleanup()

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, target: str | Path, anomaly_map: np.ndarray) -> None:
        """Keep ``anomaly_map`` (float, 2-D) to be written to ``target``."""
        np.save(Path(self._folder.name) / f"{len(self._targets)}.npy", anomaly_map, allow_pickle=False)
        self._low = min(self._low, float(anomaly_map.min()))
        self._high = max(self._high, float(anomaly_map.max()))
        self._targets.append(Path(target))

    def score_range(self) -> tuple[float, float]:
        """:func:`score_range` of the maps added so far."""
        if not self._targets:
            raise ValueError("no map was added")
        return _widened(self._low, self._high)

    def write(self) -> tuple[float, float]:
        """Write every map added as a PNG scaled by the category's range; returns that range."""
        low, high = self.score_range()
        folder = Path(self._folder.name)
        for start in range(0, len(self._targets), self.batch):
            chunk = range(start, min(start + self.batch, len(self._targets)))
            write_maps([(self._targets[i], np.load(folder / f"{i}.npy", allow_pickle=False)) for i in chunk],
                       low, high, self.workers)
        return low, high
