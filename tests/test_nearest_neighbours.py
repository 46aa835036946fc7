"""Nearest-neighbour search: exact against numpy brute force, approximate recall, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedinspect.detectors.nearest_neighbours import (
    AUTO_EXACT_MAX_BANK,
    NearestNeighbours,
    default_nlist,
    default_nprobe,
)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of the k nearest rows, in float64 (scipy)."""
    from scipy.spatial.distance import cdist

    distances = cdist(queries.astype(np.float64), bank.astype(np.float64))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def clustered(seed: int, n_bank: int = 6000, n_queries: int = 500, dim: int = 32, clusters: int = 200):
    """Rows drawn around overlapping cluster centres (like patch embeddings), and queries from the same mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    bank = centres[rng.integers(clusters, size=n_bank)] + rng.normal(size=(n_bank, dim))
    queries = centres[rng.integers(clusters, size=n_queries)] + rng.normal(size=(n_queries, dim))
    return bank.astype(np.float32), queries.astype(np.float32)


def recall_at_1(bank: np.ndarray, queries: np.ndarray, index: NearestNeighbours) -> float:
    exact_d, _ = brute_force(bank, queries, 1)
    approx_d, approx_i = index.search(queries, k=1)
    # the returned row really lies at the returned distance, and no closer than the true nearest one
    np.testing.assert_allclose(approx_d[:, 0], np.linalg.norm(bank[approx_i[:, 0]] - queries, axis=1), rtol=1e-4)
    assert (approx_d[:, 0] >= exact_d[:, 0] * (1 - 1e-4)).all()
    return float(np.mean(approx_d[:, 0] <= exact_d[:, 0] * (1 + 1e-5) + 1e-6))


def test_exact_hand_case():
    bank = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    distances, indices = NearestNeighbours(bank, method="exact").search(np.array([[0.0, 0.0], [3.0, 3.0]]), k=3)
    # Euclidean, not squared: |(3,4)| = 5
    np.testing.assert_allclose(distances, [[0.0, 1.0, 5.0], [1.0, np.sqrt(13.0), np.sqrt(18.0)]], atol=1e-5)
    np.testing.assert_array_equal(indices, [[0, 2, 1], [1, 2, 0]])


def test_k_larger_than_bank_is_clipped():
    bank = np.array([[0.0], [2.0], [5.0]])
    for method in ("exact", "ivf", "hnsw"):
        distances, indices = NearestNeighbours(bank, method=method).search(np.array([[1.9]]), k=10)
        assert indices.shape == (1, 3), method
        np.testing.assert_array_equal(indices, [[1, 0, 2]])
        np.testing.assert_allclose(distances, [[0.1, 1.9, 3.1]], atol=1e-5)


def test_exact_matches_brute_force_on_random_data():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(700, 24)).astype(np.float32)
    queries = rng.normal(size=(90, 24)).astype(np.float32)
    distances, indices = NearestNeighbours(bank, method="exact").search(queries, k=5)
    expected_d, expected_i = brute_force(bank, queries, 5)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("method", "knobs", "minimum"), [
    ("ivf", {}, 0.85), ("ivf", {"nprobe": 32}, 0.97), ("ivf", {"nprobe": 16}, 0.93), ("ivf", {"nprobe": 64}, 0.99),
    ("hnsw", {}, 0.99),
])
def test_approximate_recall_on_a_clustered_bank(method, knobs, minimum, one_torch_thread):
    """Measured on this case (seed 0): IVF 0.896 at the default nprobe 8 (of 153 cells), 0.988 at 32,
    0.954 at 16, 0.996 at 64 (0.716 at 1); HNSW 1.0 at the default ef_search 64."""
    bank, queries = clustered(seed=0)
    index = NearestNeighbours(bank, method=method, seed=0, **knobs)
    assert index.method == method
    assert recall_at_1(bank, queries, index) >= minimum


def test_more_probes_raise_ivf_recall_to_exact(one_torch_thread):
    bank, queries = clustered(seed=1)
    index = NearestNeighbours(bank, method="ivf", nprobe=1, seed=0)
    low = recall_at_1(bank, queries, index)
    index.nprobe = index.nlist  # every cell: exact
    assert low < 1.0
    assert recall_at_1(bank, queries, index) == 1.0


def test_same_seed_same_results_other_seed_other_cells(one_torch_thread):
    bank, queries = clustered(seed=2, n_bank=3000)
    first = NearestNeighbours(bank, method="ivf", seed=5, nprobe=2)
    again = NearestNeighbours(bank, method="ivf", seed=5, nprobe=2)
    other = NearestNeighbours(bank, method="ivf", seed=6, nprobe=2)
    for a, b in zip(first.search(queries, k=3), again.search(queries, k=3), strict=True):
        np.testing.assert_array_equal(a, b)
    centroids = [index._quantizer.reconstruct_n(0, index.nlist) for index in (first, again, other)]
    np.testing.assert_array_equal(centroids[0], centroids[1])
    assert not np.array_equal(centroids[0], centroids[2])
    hnsw = [NearestNeighbours(bank, method="hnsw", ef_search=8).search(queries, k=3) for _ in range(2)]
    np.testing.assert_array_equal(hnsw[0][1], hnsw[1][1])


def test_approximate_index_answers_exactly_when_its_cells_hold_too_few_rows():
    bank, queries = clustered(seed=4, n_bank=200, n_queries=20, clusters=4)
    index = NearestNeighbours(bank, method="ivf", nlist=4, nprobe=1)
    distances, indices = index.search(queries, k=150)  # more than one cell holds: faiss pads with -1
    expected_d, _ = brute_force(bank, queries, 150)
    assert (indices >= 0).all()
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)


def test_auto_is_exact_for_small_banks_and_ivf_above_the_threshold():
    bank, _ = clustered(seed=5, n_bank=500)
    assert NearestNeighbours(bank).method == "exact"
    assert NearestNeighbours(bank, auto_exact_max=499).method == "ivf"
    assert NearestNeighbours(bank, auto_exact_max=500).method == "exact"
    assert 2_000 <= AUTO_EXACT_MAX_BANK <= 10_000  # measured: IVF pays from about 5,000 rows (bench_search.py)


def test_default_nlist_keeps_cells_full():
    assert default_nlist(10) == 1
    assert default_nlist(1000) == 25  # 1000 // 39
    assert default_nlist(60_000) == 980  # 4 sqrt(60000)


def test_default_nprobe_scans_a_32nd_of_the_cells_and_at_least_8():
    assert [default_nprobe(n) for n in (1, 5, 8, 141, 256, 257, 993)] == [1, 5, 8, 8, 8, 9, 32]


def test_empty_queries_give_empty_results():
    distances, indices = NearestNeighbours(np.eye(3)).search(np.zeros((0, 3)), k=2)
    assert distances.shape == indices.shape == (0, 2)


@pytest.mark.parametrize(("bank", "kwargs", "message"), [
    (np.zeros((0, 4)), {}, "non-empty"),
    (np.zeros(4), {}, "non-empty"),
    (np.array([[0.0, np.nan]]), {}, "NaN"),
    (np.array([[0.0, np.inf]]), {}, "NaN or infinite"),
    (np.zeros((3, 2)), {"method": "annoy"}, "unknown nearest-neighbour method 'annoy'"),
    (np.zeros((3, 2)), {"method": "ivf", "nprobe": 0}, "nprobe must be a positive integer"),
    (np.zeros((3, 2)), {"method": "hnsw", "ef_search": 2.5}, "ef_search must be a positive integer"),
])
def test_bad_bank_or_settings(bank, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NearestNeighbours(bank, **kwargs)


@pytest.mark.parametrize(("queries", "k", "message"), [
    (np.zeros((2, 3)), 1, r"queries must be an \(n, 2\) array"),
    (np.zeros(2), 1, r"queries must be an \(n, 2\) array"),
    (np.array([[np.nan, 0.0]]), 1, "queries contain NaN"),
    (np.zeros((1, 2)), 0, "k must be a positive integer"),
])
def test_bad_queries(queries, k, message):
    index = NearestNeighbours(np.eye(2))
    with pytest.raises(ValueError, match=message):
        index.search(queries, k=k)


def test_knob_of_another_method_is_refused():
    with pytest.raises(AttributeError, match="nprobe applies to the IVF index"):
        NearestNeighbours(np.eye(2), method="hnsw").nprobe = 4
    with pytest.raises(AttributeError, match="ef_search applies to the HNSW index"):
        _ = NearestNeighbours(np.eye(2), method="exact").ef_search


def test_exact_flag_overrides_an_approximate_index(one_torch_thread):
    bank, queries = clustered(seed=6)
    index = NearestNeighbours(bank, method="ivf", nprobe=1)
    distances, indices = index.search(queries, k=4, exact=True)
    expected_d, expected_i = brute_force(bank, queries, 4)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(indices, expected_i)
    assert recall_at_1(bank, queries, index) < 0.9  # while the index itself misses often at nprobe 1


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_refine_maximum_makes_the_largest_distance_exact(method, one_torch_thread):
    bank, queries = clustered(seed=7, n_queries=300)
    index = NearestNeighbours(bank, method=method, nprobe=1) if method == "ivf" else \
        NearestNeighbours(bank, method=method, ef_search=1)
    distances, indices = index.search(queries, k=1)
    refined_d, refined_i = index.refine_maximum(queries, distances, indices, chunk=4)
    exact_d, _ = brute_force(bank, queries, 1)
    assert distances.max() > exact_d.max() + 1e-3 or method == "hnsw"  # the approximate maximum was off (IVF)
    np.testing.assert_allclose(refined_d.max(), exact_d.max(), rtol=1e-5)
    assert int(np.argmax(refined_d[:, 0])) == int(np.argmax(exact_d[:, 0]))
    assert (refined_d[:, 0] <= distances[:, 0] + 1e-5).all()  # refining only ever lowers a distance
    np.testing.assert_allclose(refined_d[:, 0], np.linalg.norm(bank[refined_i[:, 0]] - queries, axis=1), rtol=1e-4)


def test_patchcore_searches_with_its_search_setting_and_keeps_it_in_its_files(tmp_path) -> None:
    import json

    from fedinspect.detectors.patchcore import CONFIG_FILE, PatchCore

    bank = np.random.default_rng(0).normal(size=(50, 152)).astype(np.float32)  # Lite0 width
    model = PatchCore(search="hnsw", runtime="torch")
    with pytest.raises(ValueError, match="unknown search 'kdtree'"):
        PatchCore(search="kdtree")
    assert model.get_params()["search"] == "hnsw"
    model.set_memory_bank(bank)
    assert model._check_fitted().method == "hnsw"
    assert PatchCore(runtime="torch").set_memory_bank(bank)._check_fitted().method == "exact"  # auto, small bank
    folder = model.save(tmp_path / "model")
    assert PatchCore.load(folder).search == "hnsw"
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["params"]["search"]  # a model written before approximate search existed: searched exactly
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    assert PatchCore.load(folder).search == "exact"
