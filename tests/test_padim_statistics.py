"""PaDiM's sufficient statistics: they add up over disjoint image sets, form the Gaussians, cross the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedinspect.detectors.padim import Padim, PadimFitError, PadimStatistics, StatisticsError, feature_statistics

from .conftest import textured_image

GRID, K = (2, 3), 4


def _features(seed: int, n: int) -> np.ndarray:
    """Hand-made (n, P, k) features: no backbone."""
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(n, GRID[0] * GRID[1], K))


def test_statistics_of_disjoint_sets_add_up_to_those_of_the_union() -> None:
    a, b = _features(0, 5), _features(1, 3)
    union = feature_statistics(np.concatenate([a, b]), GRID)
    added = feature_statistics(a, GRID) + feature_statistics(b, GRID)
    assert added.count == union.count == 8 and added.grid_shape == union.grid_shape == GRID
    np.testing.assert_allclose(added.sum, union.sum, rtol=1e-12)
    np.testing.assert_allclose(added.sum_outer, union.sum_outer, rtol=1e-12)
    # and they are the plain sums, computed independently
    x = np.concatenate([a, b])
    np.testing.assert_allclose(union.sum, x.sum(0), rtol=1e-12)
    np.testing.assert_allclose(union.sum_outer[4], x[:, 4].T @ x[:, 4], rtol=1e-12)


def test_set_statistics_of_the_sum_gives_the_pooled_mean_and_numpy_covariance() -> None:
    a, b = _features(2, 4), _features(3, 6)
    stats = feature_statistics(a, GRID) + feature_statistics(b, GRID)
    model = Padim(image_size=64, n_features=K, eps=0.01).set_statistics(stats.count, stats.sum, stats.sum_outer,
                                                                        stats.grid_shape)
    pooled = np.concatenate([a, b])
    np.testing.assert_allclose(model.mean_, pooled.mean(0), rtol=1e-12)
    for position in range(GRID[0] * GRID[1]):
        expected = np.cov(pooled[:, position], rowvar=False, ddof=1) + 0.01 * np.eye(K)
        np.testing.assert_allclose(model.covariance_[position], expected, rtol=1e-10, atol=1e-12)
    assert model.n_train_images_ == 10 and model.grid_shape_ == GRID


def test_clipping_scales_each_image_block_to_the_clip_norm_and_counts_the_clipped() -> None:
    x = _features(4, 6)
    norms = np.linalg.norm(x.reshape(6, -1), axis=1)
    clip = float(np.median(norms))
    stats = feature_statistics(x, GRID, clip_norm=clip)
    expected = x * np.minimum(1.0, clip / norms)[:, None, None]
    assert stats.clipped == int((norms > clip).sum()) == 3 and stats.clip_norm == clip
    np.testing.assert_allclose(stats.sum, expected.sum(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sum_outer, np.einsum("npi,npj->pij", expected, expected), rtol=1e-12)
    assert np.linalg.norm(expected.reshape(6, -1), axis=1).max() == pytest.approx(clip)
    unclipped = feature_statistics(x, GRID, clip_norm=norms.max() * 2)
    assert unclipped.clipped == 0
    np.testing.assert_allclose(unclipped.sum, x.sum(0), rtol=1e-12)
    with pytest.raises(ValueError, match="clip norm must be a positive number"):
        feature_statistics(x, GRID, clip_norm=0.0)


def test_fit_equals_statistics_of_two_halves_added() -> None:
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 64, 96) for _ in range(6)]
    tests = [textured_image(rng, 64, 96) for _ in range(3)]
    tests[2][20:36, 30:46] = 250
    central = Padim(image_size=64, n_features=20, seed=0, batch_size=4).fit(images)
    client = Padim(image_size=64, n_features=20, seed=0, batch_size=4)  # never fitted: statistics need no Gaussians
    stats = client.statistics(images[:2]) + client.statistics(images[2:])
    assert stats.count == 6 and stats.grid_shape == (8, 12) and stats.clipped == 0
    merged = Padim(image_size=64, n_features=20, seed=0).set_statistics(stats.count, stats.sum, stats.sum_outer,
                                                                        stats.grid_shape)
    np.testing.assert_allclose(merged.score_samples(tests), central.score_samples(tests), atol=1e-6, rtol=0)
    with pytest.raises(PadimFitError, match="no images given"):
        client.statistics([])


def test_wire_round_trip_is_exact_and_float64() -> None:
    stats = feature_statistics(_features(5, 3), GRID)
    arrays = stats.to_arrays()
    assert set(arrays) == {"count", "sum", "sum_outer", "grid_shape"}
    assert all(a.dtype == np.float64 for a in arrays.values())
    back = PadimStatistics.from_arrays(arrays, grid_shape=GRID, n_features=K)
    assert back.count == 3 and isinstance(back.count, int) and back.grid_shape == GRID and not back.noisy
    assert np.array_equal(back.sum, stats.sum) and np.array_equal(back.sum_outer, stats.sum_outer)
    noisy = dict(arrays, count=np.asarray(2.7))
    assert PadimStatistics.from_arrays(noisy, noisy=True).count == pytest.approx(2.7)


def _bad(problem: str) -> dict[str, np.ndarray]:
    arrays = feature_statistics(_features(6, 3), GRID).to_arrays()
    if problem == "missing":
        del arrays["sum_outer"]
    elif problem == "unknown":
        arrays["extra"] = np.zeros(1)
    elif problem == "nan":
        arrays["sum"][1, 2] = np.nan
    elif problem == "inf":
        arrays["sum_outer"][0, 1, 1] = np.inf
    elif problem == "negative":
        arrays["count"] = np.asarray(-1.0)
    elif problem == "fraction":
        arrays["count"] = np.asarray(2.5)
    elif problem == "outer_shape":
        arrays["sum_outer"] = arrays["sum_outer"][:, :3, :3]
    elif problem == "sum_shape":
        arrays["sum"] = arrays["sum"][:5]
    elif problem == "grid":
        arrays["grid_shape"] = np.asarray([2.0, 3.5])
    elif problem == "asymmetric":
        arrays["sum_outer"][0, 0, 1] += 1.0
    elif problem == "text":
        arrays["count"] = np.asarray("3")
    return arrays


@pytest.mark.parametrize(("problem", "match"), [
    ("missing", r"missing \['sum_outer'\]"), ("unknown", r"unknown \['extra'\]"), ("nan", "sum contains NaN"),
    ("inf", "sum_outer contains NaN or infinite"), ("negative", "count must be a non-negative integer, got -1"),
    ("fraction", "non-negative integer, got 2.5"), ("outer_shape", r"sum_outer must have shape \(6, 4, 4\)"),
    ("sum_shape", r"sum must have shape \(positions, features\) = \(6, k\)"),
    ("grid", "grid_shape must be two integers"), ("asymmetric", "not symmetric"), ("text", "count must be real"),
])
def test_bad_updates_are_refused_naming_the_sender(problem: str, match: str) -> None:
    with pytest.raises(StatisticsError, match=f"client 3: .*{match}"):
        PadimStatistics.from_arrays(_bad(problem), sender="client 3")


def test_updates_for_another_model_are_refused() -> None:
    arrays = feature_statistics(_features(7, 3), GRID).to_arrays()
    with pytest.raises(StatisticsError, match=r"grid \(2, 3\), expected \(3, 2\)"):
        PadimStatistics.from_arrays(arrays, grid_shape=(3, 2))
    with pytest.raises(StatisticsError, match="4 features, expected 5"):
        PadimStatistics.from_arrays(arrays, n_features=5)
    with pytest.raises(StatisticsError, match="expected a mapping"):
        PadimStatistics.from_arrays([1, 2, 3])  # type: ignore[arg-type]
    other = feature_statistics(np.zeros((2, 6, 4)), (3, 2))
    with pytest.raises(StatisticsError, match=r"cannot add statistics of a \(3, 2\) grid"):
        _ = feature_statistics(_features(8, 2), GRID) + other


def test_a_model_of_clipped_statistics_clips_test_images_alike_and_saves_the_norm(tmp_path) -> None:
    from fedinspect.detectors.registry import load_detector

    rng = np.random.default_rng(1)
    images = [textured_image(rng, 64, 64) for _ in range(5)]
    probe = textured_image(rng, 64, 64)
    model = Padim(image_size=64, n_features=10, seed=0)
    features = model.features(torch.stack([model.letterbox(image) for image in [*images, probe]]))
    norms = features[:, torch.from_numpy(model.channels)].double().flatten(1).norm(dim=1).numpy()
    clip = float(np.median(norms))
    stats = model.statistics(images, clip_norm=clip)
    assert stats.clipped == int((norms[:5] > clip).sum()) and 0 < stats.clipped < 5
    model.set_statistics(stats.count, stats.sum, stats.sum_outer, stats.grid_shape, clip_norm=clip)
    scaled = features[5:] * float(min(1.0, clip / norms[5]))
    expected = model._scorer(scaled)[0].numpy()  # the distances of the clipped probe, before smoothing
    unclipped = model._scorer(features[5:])[0].numpy()
    score = model.score_samples([probe])[0]
    assert expected.min() - 1e-3 <= score <= expected.max() + 1e-3
    if norms[5] > clip * 1.05:
        assert not np.allclose(expected, unclipped, rtol=1e-3)
    loaded = load_detector(model.save(tmp_path / "m"))
    assert loaded.clip_norm_ == pytest.approx(clip) and loaded.score_samples([probe])[0] == pytest.approx(score)
    with pytest.raises(ValueError, match="clip norm must be a positive number"):
        model.set_gaussians(model.mean_, model.covariance_, model.grid_shape_, clip_norm=-1.0)
