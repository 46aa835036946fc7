"""Approximate greedy coreset (k-center) selection, as in PatchCore (Roth et al., CVPR 2022).

The greedy k-center rule picks, one at a time, the point farthest from everything picked so far,
so that the selected subset covers the feature space with the smallest radius. Distances are
computed on a Johnson-Lindenstrauss random projection of the features (PatchCore's
"approximate" sampler), which keeps the selection close to the full-dimensional one while making
each step cheap. Selection is deterministic for a given seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

# torch is imported in the functions that compute: the federation's strategies and the command line import
# this module for coreset_size and the strategy names without paying torch's start-up.


def coreset_size(n_points: int, ratio: float) -> int:
    """Number of points a coreset of ``ratio`` keeps: at least 1, at most ``n_points``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_points, round(n_points * ratio)))


def random_projection(
    features: torch.Tensor, dim: int, seed: int
) -> torch.Tensor:
    """Gaussian random projection to ``dim`` dimensions (identity when the features are smaller)."""
    import torch

    n_features = features.shape[1]
    if dim <= 0 or dim >= n_features:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n_features, dim, generator=generator, dtype=features.dtype) / np.sqrt(dim)
    return features @ matrix


@contextmanager
def _single_thread():
    import torch

    # Each greedy step is a memory-bound matrix-vector product: on small CPUs thread
    # synchronisation costs more than it brings (measured 3x slower with 2 threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _squared_distance_to_set(x: torch.Tensor, centres: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """For each row of ``x``, the squared distance to its nearest row of ``centres``."""
    import torch

    result = torch.empty(x.shape[0])
    for start in range(0, x.shape[0], block):
        result[start : start + block] = torch.cdist(x[start : start + block], centres).min(dim=1).values.square()
    return result


def _greedy(
    x: torch.Tensor, n_select: int, first: int, progress: bool, covered: torch.Tensor | None = None
) -> np.ndarray:
    """Plain greedy k-center on the rows of ``x``; returns positions in selection order.

    ``covered`` holds centres chosen earlier (already projected): distances start from them and
    the first pick is then the point farthest from them instead of ``first``.
    """
    import torch

    n_points = x.shape[0]
    if n_select >= n_points:
        return np.arange(n_points)
    squared_norms = (x * x).sum(dim=1)
    if covered is not None and len(covered):
        min_distance = _squared_distance_to_set(x, covered)
        first = int(torch.argmax(min_distance))
    else:
        min_distance = torch.full((n_points,), float("inf"))
    distance = torch.empty(n_points)
    selected = np.empty(n_select, dtype=np.int64)
    index = first
    with _single_thread():
        for step in tqdm(range(n_select), desc="coreset", disable=not progress, leave=False):
            selected[step] = index
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, computed in place to stay memory-light.
            torch.mv(x, x[index], out=distance)
            distance.mul_(-2.0).add_(squared_norms).add_(squared_norms[index])
            torch.minimum(min_distance, distance, out=min_distance)
            min_distance[index] = 0.0
            index = int(torch.argmax(min_distance))
    return selected


def greedy_coreset(
    features: np.ndarray | torch.Tensor,
    n_select: int,
    projection_dim: int = 64,
    seed: int = 0,
    chunk_size: int = 16384,
    progress: bool = False,
    covered: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of ``n_select`` rows chosen by greedy k-center on randomly projected features.

    Up to ``chunk_size`` points, this is the exact greedy rule (first centre drawn from ``seed``).
    Greedy costs O(n * n_select), quadratic in the data, so larger sets are split into random
    chunks of at most ``chunk_size`` points; each chunk keeps twice its share by greedy
    selection and the union is reduced again the same way until ``n_select`` remain (a
    hierarchical approximation of the global greedy rule, the same merge a federated server does).

    ``covered`` (m, d): points already kept elsewhere; the selection then extends them, picking
    the points they cover worst (used to top up a guaranteed set).
    """
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n, d) array, got shape {tuple(x.shape)}")
    n_points = x.shape[0]
    if not 1 <= n_select <= n_points:
        raise ValueError(f"n_select must be in [1, {n_points}], got {n_select}")
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")
    if n_select == n_points:
        return np.arange(n_points)
    projected_covered = None
    if covered is not None and len(covered):
        covered = torch.as_tensor(np.asarray(covered, dtype=np.float32))
        if covered.ndim != 2 or covered.shape[1] != x.shape[1]:
            raise ValueError(f"covered must be (m, {x.shape[1]}), got shape {tuple(covered.shape)}")
        projected_covered = random_projection(covered, projection_dim, seed).contiguous()
    x = random_projection(x, projection_dim, seed).contiguous()
    rng = np.random.default_rng(seed)
    return _hierarchical(x, np.arange(n_points), n_select, chunk_size, rng, progress, projected_covered)


def _split(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over chunks in proportion to their sizes (largest remainder), each at most its size."""
    exact = np.asarray(sizes, dtype=np.float64) * total / sum(sizes)
    shares = np.minimum(np.floor(exact).astype(int), sizes)
    for i in np.argsort(-(exact - shares), kind="stable"):
        if shares.sum() >= total:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    return shares.tolist()


def _hierarchical(
    x: torch.Tensor, index: np.ndarray, n_select: int, chunk_size: int, rng: np.random.Generator,
    progress: bool, covered: torch.Tensor | None = None,
) -> np.ndarray:
    n_points = len(index)
    if n_points <= chunk_size:
        positions = _greedy(x[index], n_select, int(rng.integers(n_points)), progress, covered)
        return np.sort(index[positions])
    oversample = 2 if 2 * n_select < n_points else 1
    chunks = np.array_split(rng.permutation(n_points), int(np.ceil(n_points / chunk_size)))
    shares = _split(oversample * n_select, [len(chunk) for chunk in chunks])
    kept = []
    for chunk, share in tqdm(list(zip(chunks, shares, strict=True)), desc="coreset chunks", disable=not progress,
                             leave=False):
        positions = _greedy(x[index[chunk]], share, int(rng.integers(len(chunk))), False, covered)
        kept.append(index[chunk[positions]])
    union = np.sort(np.concatenate(kept))
    if len(union) == n_select:
        return union
    if len(union) >= n_points:  # cannot shrink by chunking: finish with exact greedy
        positions = _greedy(x[index], n_select, int(rng.integers(n_points)), progress, covered)
        return np.sort(index[positions])
    return _hierarchical(x, union, n_select, chunk_size, rng, progress, covered)
