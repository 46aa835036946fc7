"""Secure sum of statistics (SecAgg+): encoding, flwr's quantizer and masks emulated in numpy, and on Flower."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'flwr[simulation]')")

from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedinspect.federation.secure_sum import (
    CLIPPING_RANGE,
    MODULUS,
    ArraySpec,
    SecureSumError,
    SecureSumSettings,
    check_arrays,
    clip_count_spec,
    decode_mean,
    encode,
    padim_specs,
    padim_statistics,
    plain_sum_simulation,
    secure_sum_simulation,
)

SPECS = (ArraySpec((1,), 100, integer=True, name="count"), ArraySpec((4, 3), 5.0, name="sum"),
         ArraySpec((2, 3, 3), 50.0, name="outer"))


def hand_made(partition: int) -> list[np.ndarray]:
    """Client statistics within SPECS' bounds, different per client."""
    rng = np.random.default_rng([7, partition])
    return [np.array([10.0 + partition]), rng.uniform(-5, 5, (4, 3)), rng.uniform(-50, 50, (2, 3, 3))]


def flwr_secure_sum(clients: list[list[np.ndarray]], settings: SecureSumSettings, seed: int = 0) -> list[np.ndarray]:
    """SecAgg+'s arithmetic as flwr 1.41 does it (client: weight 1, quantize, factor, masks mod 2^32; server: sum,
    unmask, dequantize, offset, divide by the summed factor), without the key exchange: the workflow's mean."""
    n = len(clients)
    q = settings.protocol(n)["quantization_range"]
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # noqa: NPY002 (flwr's stochastic rounding draws from the global generator)
    total, masks = None, None
    for arrays in clients:
        encoded, _ = encode(arrays, settings.specs, settings.on_overflow)
        vector = factor_combine(q, quantize(encoded, CLIPPING_RANGE, q))
        mask = [rng.integers(0, MODULUS, a.shape, dtype=np.int64) for a in vector]  # stands for all masks
        vector = parameters_mod(parameters_addition(vector, mask), MODULUS)
        total = vector if total is None else parameters_addition(total, vector)
        masks = mask if masks is None else parameters_addition(masks, mask)
    total = parameters_mod(parameters_subtraction(parameters_mod(total, MODULUS), masks), MODULUS)
    q_total, recon = factor_extract(total)
    mean = dequantize(recon, CLIPPING_RANGE, q)
    for vec in mean:
        vec += -(n - 1) * CLIPPING_RANGE
        vec *= q / q_total
    return mean


def test_round_trip_through_flwr_arithmetic_is_within_the_derived_bound() -> None:
    # bound per entry: n clients, each moved by < 1 quantum 2 b / Q by stochastic rounding -> n * 2 b / Q
    settings = SecureSumSettings(SPECS)
    clients = [hand_made(i) for i in range(3)]
    exact = [sum(c[j] for c in clients) for j in range(3)]
    q = settings.protocol(3)["quantization_range"]
    assert q == 2**30  # the most with 3 * Q < 2^32
    sums, clipped = decode_mean(flwr_secure_sum(clients, settings), SPECS, 3, q)
    assert clipped == 0
    assert sums[0][0] == 33.0  # integers come back exactly
    bounds = settings.error_bound(3)
    assert bounds[1] == pytest.approx(3 * 2 * 5.0 / 2**30, rel=1e-6)
    for got, want, bound in zip(sums[1:], exact[1:], bounds[1:], strict=True):
        error = np.max(np.abs(got - want))
        assert 0 < error < bound  # quantized (not exact), but within the bound


def test_extreme_values_neither_wrap_nor_lose_precision() -> None:
    """Every client at +bound (or -bound, or 0): the largest sum n Q still fits the 2^32 modulus."""
    settings = SecureSumSettings(SPECS)
    for sign in (1.0, -1.0, 0.0):
        clients = [[np.array([100.0 * abs(sign)]), np.full((4, 3), 5.0 * sign), np.full((2, 3, 3), 50.0 * sign)]
                   for _ in range(5)]
        sums, _ = decode_mean(flwr_secure_sum(clients, settings), SPECS, 5, settings.protocol(5)["quantization_range"])
        np.testing.assert_array_equal(sums[1], np.full((4, 3), 25.0 * sign))
        np.testing.assert_array_equal(sums[2], np.full((2, 3, 3), 250.0 * sign))


def test_out_of_range_values_are_clipped_and_counted_or_refused() -> None:
    arrays = hand_made(0)
    arrays[1][0, 0] = 7.0  # bound 5
    arrays[2][1, 2, 2] = -80.0  # bound 50
    encoded, clipped = encode(arrays, SPECS)
    assert clipped == 2
    assert encoded[1][0, 0] == CLIPPING_RANGE and encoded[2][1, 2, 2] == -CLIPPING_RANGE
    assert encoded[1][1, 1] == pytest.approx(arrays[1][1, 1] * CLIPPING_RANGE / 5.0)
    assert encoded[-1][0] * clip_count_spec(SPECS).bound / CLIPPING_RANGE == 2  # the clip count travels summed
    with pytest.raises(SecureSumError, match="2 entries exceed their public bound"):
        encode(arrays, SPECS, on_overflow="raise")
    # summed: the server learns the total clipped count (2 + 2), and the clipped sum
    settings = SecureSumSettings(SPECS)
    sums, total_clipped = decode_mean(flwr_secure_sum([arrays, arrays, hand_made(1)], settings), SPECS, 3,
                                      settings.protocol(3)["quantization_range"])
    assert total_clipped == 4
    assert sums[1][0, 0] == pytest.approx(10.0 + hand_made(1)[1][0, 0], abs=settings.error_bound(3)[1])


def test_bad_statistics_are_refused_with_the_client_named() -> None:
    good = hand_made(0)
    with pytest.raises(SecureSumError, match="partition 3: sum holds 1 non-finite"):
        check_arrays([good[0], _with(good[1], (0, 1), np.nan), good[2]], SPECS, "partition 3")
    with pytest.raises(SecureSumError, match="outer holds 1 non-finite"):
        check_arrays([good[0], good[1], _with(good[2], (0, 0, 0), np.inf)], SPECS, "c")
    with pytest.raises(SecureSumError, match=r"sum has shape \(3, 4\), the sum expects \(4, 3\)"):
        check_arrays([good[0], good[1].T, good[2]], SPECS, "c")
    with pytest.raises(SecureSumError, match="2 arrays, the sum expects 3"):
        check_arrays(good[:2], SPECS, "c")
    with pytest.raises(SecureSumError, match="count must hold integers"):
        check_arrays([np.array([2.5]), good[1], good[2]], SPECS, "c")
    with pytest.raises(SecureSumError, match="not numeric"):
        check_arrays([good[0], "abc", good[2]], SPECS, "c")
    with pytest.raises(SecureSumError, match="expected 4"):  # an aggregate that does not fit the announced specs
        decode_mean([np.zeros(1), np.zeros((4, 3))], SPECS, 3, 2**30)


def _with(array: np.ndarray, index: tuple, value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def test_settings_are_checked() -> None:
    with pytest.raises(SecureSumError, match="at least 3 clients"):
        SecureSumSettings(SPECS).protocol(2)
    with pytest.raises(SecureSumError, match="must be odd"):
        SecureSumSettings(SPECS, num_shares=4).protocol(6)
    with pytest.raises(SecureSumError, match="reconstruction_threshold"):
        SecureSumSettings(SPECS, reconstruction_threshold=5).protocol(5)
    with pytest.raises(SecureSumError, match="the sum wraps"):
        SecureSumSettings(SPECS, quantization_bits=30).protocol(5)  # 5 * 2^30 > 2^32
    with pytest.raises(SecureSumError, match="min_clients"):
        SecureSumSettings(SPECS, min_clients=1).protocol(5)
    with pytest.raises(SecureSumError, match="on_overflow"):
        SecureSumSettings(SPECS, on_overflow="wrap")
    with pytest.raises(SecureSumError, match="bound must be finite"):
        ArraySpec((2,), float("nan"))
    assert SecureSumSettings(SPECS).protocol(20) == {"num_shares": 20, "reconstruction_threshold": 11,
                                                     "min_clients": 20, "quantization_range": 2**27}
    assert ArraySpec((1,), 100, integer=True).bound == 128  # integers: a power of two, summed exactly
    settings = SecureSumSettings(SPECS, min_clients=2, seed=3, client_config={"feature-bound": 2.0})
    assert SecureSumSettings.from_json(settings.to_json()) == settings


def test_padim_statistics_match_numpy_and_clip_to_the_public_norm() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4, 3))
    features[2, 1] = [30.0, 40.0, 0.0]  # norm 50 > bound 10
    arrays, clipped = padim_statistics(features, 10.0)
    assert clipped == 1
    x = features.copy()
    x[2, 1] = [6.0, 8.0, 0.0]
    assert arrays[0][0] == 6
    np.testing.assert_allclose(arrays[1], x.sum(0))
    for p in range(4):
        np.testing.assert_allclose(arrays[2][p], x[:, p].T @ x[:, p])
    specs = padim_specs(4, 3, max_images=6, feature_bound=10.0)
    assert [s.bound for s in specs] == [8.0, 60.0, 600.0]
    assert check_arrays(arrays, specs, "c") and encode(arrays, specs)[1] == 0  # within the bounds by construction


# ---------------------------------------------------------------- on Flower's Simulation Engine
def statistics_with_one_out_of_range(partition: int, config: dict) -> list[np.ndarray]:
    arrays = hand_made(partition)
    if partition == 2:
        arrays[1][3, 2] = 6.5  # beyond the bound 5: clipped (secure) / kept (plain), counted in both
    return arrays


def statistics_or_nan(partition: int, config: dict) -> list[np.ndarray]:
    arrays = hand_made(partition)
    if partition == 1:
        arrays[2][0, 1, 1] = np.nan
    return arrays


@pytest.mark.slow
def test_secure_sum_on_flower_equals_the_plain_sum_within_the_bound() -> None:
    settings = SecureSumSettings(SPECS)
    secure = secure_sum_simulation(statistics_with_one_out_of_range, 3, settings)
    plain = plain_sum_simulation(statistics_with_one_out_of_range, 3, settings)
    clients = [statistics_with_one_out_of_range(i, {}) for i in range(3)]
    exact = [sum(c[j] for c in clients) for j in range(3)]
    for got, want in zip(plain.sum, exact, strict=True):  # plain: the exact float64 sum
        np.testing.assert_array_equal(got, want)
    assert secure.contributors == plain.contributors == [0, 1, 2]
    assert secure.out_of_range == plain.out_of_range == 1
    assert secure.sum[0][0] == 33.0
    clipped = [np.clip(c[1], -5, 5) for c in clients]  # what the secure clients sent
    bounds = secure.error_bound
    assert bounds[1] == pytest.approx(3 * 2 * 5.0 / 2**30, rel=1e-6)
    assert np.max(np.abs(secure.sum[1] - sum(clipped))) < bounds[1]
    assert np.max(np.abs(secure.sum[2] - exact[2])) < bounds[2]
    assert abs(secure.sum[1][3, 2] - plain.sum[1][3, 2]) == pytest.approx(1.5, abs=1e-6)  # the clipped part
    assert secure.bytes_per_client > 8 * 31 and plain.bytes_per_client > 8 * 31  # the statistics travelled


@pytest.mark.slow
def test_a_client_that_drops_out_is_named_and_the_partial_sum_is_refused_unless_allowed() -> None:
    with pytest.raises(SecureSumError, match=r"only 2 of 3 clients contributed.*partition 1.*non-finite"):
        secure_sum_simulation(statistics_or_nan, 3, SecureSumSettings(SPECS))
    # SecAgg+ itself recovers from the dropout (threshold 2 of 3): allowed, the sum is over the survivors
    result = secure_sum_simulation(statistics_or_nan, 3, SecureSumSettings(SPECS, min_clients=2))
    assert result.contributors == [0, 2]
    assert len(result.dropped) == 1 and "partition 1" in next(iter(result.dropped.values()))
    survivors = [hand_made(0), hand_made(2)]
    assert result.sum[0][0] == 22.0
    assert np.max(np.abs(result.sum[2] - survivors[0][2] - survivors[1][2])) < result.error_bound[2]
