from __future__ import annotations

import numpy as np
import pytest

from fedinspect.detectors.coreset import coreset_size, greedy_coreset


def naive_greedy(x: np.ndarray, n_select: int, first: int) -> list[int]:
    """Textbook greedy k-center with full pairwise distances (reference)."""
    selected = [first]
    min_distance = np.linalg.norm(x - x[first], axis=1)
    while len(selected) < n_select:
        nxt = int(np.argmax(min_distance))
        selected.append(nxt)
        min_distance = np.minimum(min_distance, np.linalg.norm(x - x[nxt], axis=1))
    return selected


def coverage_radius(x: np.ndarray, chosen: np.ndarray) -> float:
    distances = np.linalg.norm(x[:, None, :] - x[chosen][None, :, :], axis=2)
    return float(distances.min(axis=1).max())


def test_exact_greedy_matches_textbook_algorithm() -> None:
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    chosen = greedy_coreset(x, 30, projection_dim=0, seed=3)
    first = int(np.random.default_rng(3).integers(300))
    assert chosen.tolist() == sorted(naive_greedy(x.astype(np.float64), 30, first))


def test_same_seed_same_selection_and_other_seed_differs() -> None:
    x = np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32)
    a = greedy_coreset(x, 100, projection_dim=16, seed=7)
    b = greedy_coreset(x, 100, projection_dim=16, seed=7)
    c = greedy_coreset(x, 100, projection_dim=16, seed=8)
    assert (a == b).all()
    assert not np.array_equal(a, c)


def test_greedy_covers_far_better_than_random() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=10, size=(20, 4))
    x = (centres[rng.integers(20, size=1000)] + rng.normal(size=(1000, 4))).astype(np.float32)
    chosen = greedy_coreset(x, 40, projection_dim=0, seed=0)
    random = rng.choice(1000, 40, replace=False)
    assert coverage_radius(x, chosen) < 0.6 * coverage_radius(x, random)


def test_hierarchical_selection_is_close_to_exact() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    exact = greedy_coreset(x, 150, projection_dim=0, seed=0, chunk_size=10_000)
    chunked = greedy_coreset(x, 150, projection_dim=0, seed=0, chunk_size=500)
    assert len(chunked) == 150 and len(np.unique(chunked)) == 150
    assert (np.diff(chunked) > 0).all()
    # chunking is an approximation: its covering radius stays within 1.3x of exact greedy
    assert coverage_radius(x, chunked) <= 1.3 * coverage_radius(x, exact)


def test_large_ratio_terminates_with_exact_count() -> None:
    x = np.random.default_rng(5).normal(size=(1000, 4)).astype(np.float32)
    for n_select in (999, 700, 501, 1):
        chosen = greedy_coreset(x, n_select, projection_dim=0, chunk_size=64)
        assert len(np.unique(chosen)) == n_select


def test_coreset_size_and_errors() -> None:
    assert coreset_size(55_296, 0.1) == 5530
    assert coreset_size(3, 0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        coreset_size(10, 0.0)
    with pytest.raises(ValueError, match="n_select"):
        greedy_coreset(np.zeros((5, 2)), 6)
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset(np.zeros((0, 2)), 1)


def test_covered_points_steer_selection_away_from_them() -> None:
    rng = np.random.default_rng(6)
    left = rng.normal(loc=-10, size=(200, 3))
    right = rng.normal(loc=10, size=(200, 3))
    x = np.concatenate([left, right]).astype(np.float32)
    # 'left' is already covered by its own points: the extension should pick from 'right' first
    chosen = greedy_coreset(x, 5, projection_dim=0, covered=left[:50])
    assert (chosen >= 200).all()
    with pytest.raises(ValueError, match="covered"):
        greedy_coreset(x, 5, covered=np.zeros((3, 7)))
