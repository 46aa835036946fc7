"""The Gaussian mechanism for PaDiM's statistics: noise scales, sensitivity, epsilon, distributed noise, projection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedinspect.detectors.padim import Padim, feature_statistics
from fedinspect.privacy.statistics_dp import (
    StatisticsPrivacy,
    add_noise,
    noisy_gaussians,
    project_covariance,
    set_noisy_statistics,
    symmetric_noise,
)

GRID, K = (1, 2), 3
DRAWS = 20_000


def _zero_stats(clip: float = 2.0):
    return feature_statistics(np.zeros((4, GRID[0] * GRID[1], K)), GRID, clip_norm=clip)


def _releases(privacy: StatisticsPrivacy, clients: int, draws: int, seed: int = 0,
              shares: int | None = None) -> dict[str, np.ndarray]:
    """``draws`` sums of the noisy zero statistics of ``shares`` (default all) of ``clients`` clients: their noise."""
    shares = clients if shares is None else shares
    stats, seeds = _zero_stats(privacy.clip_norm), np.random.default_rng(seed).integers(2**63, size=(draws, shares))
    count, total, outer = np.empty(draws), np.empty((draws, 2, K)), np.empty((draws, 2, K, K))
    for d in range(draws):
        noisy = [add_noise(stats, privacy, clients, int(s)) for s in seeds[d]]
        summed = sum(noisy[1:], noisy[0])
        count[d], total[d], outer[d] = summed.count - 4 * shares, summed.sum, summed.sum_outer
    return {"count": count, "sum": total, "diagonal": outer[:, :, np.arange(K), np.arange(K)],
            "off_diagonal": outer[:, :, 0, 1:], "outer": outer}


def test_noise_of_one_release_has_the_calibrated_scales() -> None:
    privacy = StatisticsPrivacy(clip_norm=2.0, noise_multiplier=1.5, mode="local")
    noise = _releases(privacy, clients=1, draws=DRAWS)
    z, c = 1.5, 2.0
    assert noise["count"].std() == pytest.approx(z, rel=0.02)
    assert noise["sum"].std() == pytest.approx(z * c, rel=0.02)
    assert noise["diagonal"].std() == pytest.approx(z * c**2, rel=0.02)
    assert noise["off_diagonal"].std() == pytest.approx(z * c**2 / math.sqrt(2), rel=0.02)
    assert np.array_equal(noise["outer"], noise["outer"].transpose(0, 1, 3, 2))  # mirrored, exactly symmetric
    assert abs(np.corrcoef(noise["sum"][:, 0, 0], noise["sum"][:, 0, 1])[0, 1]) < 0.03  # independent coordinates


def test_distributed_sum_carries_the_noise_of_one_release_and_local_m_times() -> None:
    z, c, m = 1.0, 1.0, 5
    distributed = _releases(StatisticsPrivacy(clip_norm=c, noise_multiplier=z), m, DRAWS // 4, seed=1)
    assert distributed["sum"].std() == pytest.approx(z * c, rel=0.02)
    assert distributed["count"].std() == pytest.approx(z, rel=0.04)
    assert distributed["off_diagonal"].std() == pytest.approx(z * c**2 / math.sqrt(2), rel=0.03)
    local = _releases(StatisticsPrivacy(clip_norm=c, noise_multiplier=z, mode="local"), m, DRAWS // 4, seed=2)
    assert local["sum"].std() == pytest.approx(z * c * math.sqrt(m), rel=0.02)
    # min_honest 0.6 of 5: each of the 3 honest clients needed adds a third, so the sum of all 5 carries 5/3
    honest = StatisticsPrivacy(clip_norm=c, noise_multiplier=z, min_honest=0.6)
    assert honest.honest_clients_needed(m) == 3 and honest.client_variance_fraction(m) == pytest.approx(1 / 3)
    three = _releases(honest, m, DRAWS // 4, seed=3, shares=3)  # the 3 honest ones alone: one release's noise
    assert three["sum"].std() == pytest.approx(z * c, rel=0.02)
    five = _releases(honest, m, DRAWS // 4, seed=4)
    assert five["sum"].std() == pytest.approx(z * c * math.sqrt(5 / 3), rel=0.02)


def test_sensitivity_of_one_clipped_image_is_at_most_one_per_normalised_part() -> None:
    rng, c = np.random.default_rng(0), 3.0
    base = rng.normal(size=(5, 6, 4))
    spread = rng.normal(size=(1, 6, 4))
    concentrated = np.zeros((1, 6, 4))
    concentrated[0, 2, 1] = 10.0  # all its norm at one position and one channel: the worst case
    for image, tight in ((spread, False), (concentrated, True)):
        without = feature_statistics(base, (2, 3), clip_norm=c)
        with_it = feature_statistics(np.concatenate([base, image]), (2, 3), clip_norm=c)
        d_sum = np.linalg.norm(with_it.sum - without.sum) / c
        d_outer = np.linalg.norm(with_it.sum_outer - without.sum_outer) / c**2  # Frobenius over all positions
        d_count = with_it.count - without.count
        joint = math.sqrt(d_sum**2 + d_outer**2 + d_count**2)
        assert d_sum <= 1 + 1e-9 and d_outer <= 1 + 1e-9 and d_count == 1
        assert joint <= math.sqrt(3) + 1e-9
        if tight:
            assert joint == pytest.approx(math.sqrt(3))


def test_the_sqrt2_map_of_a_symmetric_matrix_keeps_the_frobenius_norm_and_whitens_the_noise() -> None:
    noise = symmetric_noise(np.random.default_rng(4), 40_000, 3, std=2.0)
    upper = np.triu_indices(3, 1)
    mapped = np.concatenate([noise[:, np.arange(3), np.arange(3)], math.sqrt(2) * noise[:, upper[0], upper[1]]], 1)
    np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), np.linalg.norm(noise, axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(np.cov(mapped, rowvar=False), 4.0 * np.eye(6), atol=0.08)


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8: the exact epsilon of the Gaussian mechanism (sensitivity 1, std sigma)."""
    def delta_of(eps: float) -> float:
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
    return brentq(lambda eps: delta_of(eps) - delta, 1e-9, 200)


def test_epsilon_is_the_accountants_for_multiplier_z_over_sqrt3() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    for accountant, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        reference = cls()
        reference.history = [(2.0 / math.sqrt(3), 1.0, 1)]
        privacy = StatisticsPrivacy(clip_norm=1.0, noise_multiplier=2.0, accountant=accountant)
        assert privacy.resolved_epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    # z = sqrt(3) per part is one Gaussian mechanism of multiplier 1: the exact (analytic) epsilon is below ours
    analytic = _analytic_gaussian_epsilon(1.0, 1e-5)
    assert analytic == pytest.approx(4.38, abs=0.01)
    rdp = StatisticsPrivacy(clip_norm=1.0, noise_multiplier=math.sqrt(3)).resolved_epsilon()
    prv = StatisticsPrivacy(clip_norm=1.0, noise_multiplier=math.sqrt(3), accountant="prv").resolved_epsilon()
    assert analytic <= rdp and analytic <= prv + 0.02 and prv == pytest.approx(analytic, abs=0.05)


@pytest.mark.parametrize("target", [1.0, 5.0, 10.0])
def test_a_target_epsilon_is_met_from_below(target: float) -> None:
    privacy = StatisticsPrivacy(clip_norm=1.0, epsilon=target)
    assert target * 0.98 <= privacy.resolved_epsilon() <= target
    report = privacy.report(clients=5)
    assert report["noise_multiplier"] == pytest.approx(report["joint_noise_multiplier"] * math.sqrt(3))
    assert report["epsilon_of_one_share"] > report["epsilon"]  # a share alone carries a fifth of the variance
    assert "secure aggregation" in report["assumes"] and report["honest_clients_needed"] == 5


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one of epsilon and noise_multiplier"):
        StatisticsPrivacy(clip_norm=1.0)
    with pytest.raises(ValueError, match="exactly one of"):
        StatisticsPrivacy(clip_norm=1.0, epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip norm must be a positive number"):
        StatisticsPrivacy(clip_norm=float("nan"), epsilon=1.0)
    with pytest.raises(ValueError, match="unknown noise mode 'central'"):
        StatisticsPrivacy(clip_norm=1.0, epsilon=1.0, mode="central")
    with pytest.raises(ValueError, match="min_honest applies to distributed"):
        StatisticsPrivacy(clip_norm=1.0, epsilon=1.0, mode="local", min_honest=0.5)
    with pytest.raises(ValueError, match=r"min_honest must be a fraction of the clients in \(0, 1\]"):
        StatisticsPrivacy(clip_norm=1.0, epsilon=1.0, min_honest=0.0)
    with pytest.raises(ValueError, match="unknown privacy settings"):
        StatisticsPrivacy.from_dict({"clip_norm": 1.0, "epsilon": 1.0, "sigma": 2})
    privacy = StatisticsPrivacy(clip_norm=1.0, epsilon=1.0)
    assert StatisticsPrivacy.from_dict(privacy.to_dict()) == privacy
    unclipped = feature_statistics(np.ones((3, 2, K)), GRID)
    with pytest.raises(ValueError, match=r"clipped at None, .*clip norm 1.0"):
        add_noise(unclipped, privacy, 5, seed=0)
    loose = feature_statistics(np.ones((3, 2, K)), GRID, clip_norm=2.0)
    with pytest.raises(ValueError, match=r"clipped at 2\.0"):
        add_noise(loose, privacy, 5, seed=0)
    with pytest.raises(ValueError, match="already carry noise"):
        add_noise(add_noise(_zero_stats(1.0), privacy, 5, seed=0), privacy, 5, seed=1)


def test_projection_makes_a_positive_definite_matrix_and_keeps_one_unchanged() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6))
    pd = a @ a.T + 0.5 * np.eye(6)
    np.testing.assert_allclose(project_covariance(pd, 0.01), pd, rtol=1e-10, atol=1e-12)
    indefinite = (a + a.T) / 2
    assert np.linalg.eigvalsh(indefinite).min() < 0
    projected = project_covariance(indefinite, 0.01)
    np.testing.assert_allclose(projected, projected.T, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(projected), np.maximum(np.linalg.eigvalsh(indefinite), 0.01),
                               rtol=1e-10, atol=1e-12)
    np.linalg.cholesky(projected)  # positive definite
    with pytest.raises(ValueError, match="eigenvalue floor"):
        project_covariance(pd, -1.0)


def test_noisy_gaussians_match_set_statistics_without_noise_and_floor_the_count() -> None:
    x = np.random.default_rng(6).normal(size=(7, 2, K))
    stats = feature_statistics(x, GRID)
    mean, cov, count = noisy_gaussians(stats, eps=0.01)
    assert count == 7
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov[1], np.cov(x[:, 1], rowvar=False) + 0.01 * np.eye(K), rtol=1e-9)
    privacy = StatisticsPrivacy(clip_norm=1.0, noise_multiplier=50.0, mode="local")
    noisy = add_noise(feature_statistics(x[:2], GRID, clip_norm=1.0), privacy, 1, seed=0)
    mean, cov, count = noisy_gaussians(noisy, eps=0.01)
    assert count >= 2 and np.linalg.eigvalsh(cov).min() >= 0.01 - 1e-9
    model = set_noisy_statistics(Padim(image_size=64, n_features=K), noisy)
    assert model.grid_shape_ == GRID and np.all(np.linalg.eigvalsh(model.covariance_) >= 0.01 - 1e-9)
    with pytest.raises(ValueError, match="count floor must be >= 2"):
        noisy_gaussians(stats, eps=0.01, min_count=1)
