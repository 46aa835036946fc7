"""Pareto frontiers: the choices no other choice beats on every objective at once.

Point ``p`` dominates point ``q`` when ``p`` is at least as good as ``q`` on every objective and
strictly better on one ("good" is larger for a maximized objective, smaller for a minimized one,
such as bytes sent). The front is the set of points no other point dominates; equal points do not
dominate each other, so both stay. Points with an undefined (NaN) objective are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of ``points`` (n points x k objectives)."""
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(maximize):
        raise ValueError(f"points must be (n, {len(maximize)}) for {len(maximize)} objectives, got shape {x.shape}")
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    better = x * signs  # larger is better on every column
    valid = np.flatnonzero(np.isfinite(better).all(axis=1))
    front = []
    for i in valid:
        others = better[valid]
        dominated = np.any(np.all(others >= better[i], axis=1) & np.any(others > better[i], axis=1))
        if not dominated:
            front.append(int(i))
    return np.asarray(front, dtype=np.int64)
