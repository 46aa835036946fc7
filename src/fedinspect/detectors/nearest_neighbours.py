"""Nearest-neighbour search in a memory bank with faiss: exact for small banks, approximate for large ones.

Exact search (``IndexFlatL2``) costs O(bank size) per query. For PatchCore's 1,024 queries per 256 px
image against a 10,000 x 152 bank that is 3.1 GFLOP, 26 ms on one core here: the core's FMA peak (about
115 GFLOP/s), so no exact method can be much faster. Above :data:`AUTO_EXACT_MAX_BANK` rows,
``method="auto"`` switches to an inverted-file index (IVF-Flat: seeded k-means cells, the ``nprobe``
nearest cells scanned exactly; by default about 1/32 of the cells, at least 8: :func:`default_nprobe`).

Approximate search can only miss the true nearest neighbour, never report a distance below the true
one. Measured by ``benchmarks/bench_search.py`` and ``benchmarks/bench_speed.py`` (one thread):
on the metal plates' 9,953-row bank IVF (256 cells, 8 probed) is 5.6x faster than exact search at recall@1
0.996, image AUROC unchanged and AUC-sPRO@0.05 +0.0003; on the magnetic tiles' 61,709-row bank (993 cells,
32 probed) it is 3x faster at recall 0.98 and AUC-sPRO@0.05 -0.0004 (image AUROC +0.0006 before PatchCore
made each image's maximum exact, unchanged since). Half as many
probes moved AUC-sPRO by 1e-3 or more on both. HNSW at the same recall is faster but its rare misses are
far off and inflate the maximum patch distance of good images (image AUROC -0.014 at efSearch 32), hence
IVF for ``auto``. :meth:`NearestNeighbours.refine_maximum` makes an image's maximum exact at the cost of a
few exact queries (PatchCore does so for every image under an approximate index).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METHODS = ("auto", "exact", "ivf", "hnsw")
# Measured (one thread, the metal plates' default 5,530 x 152 bank, a sweep of 40 test images outside the
# benchmarks): IVF at default_nprobe is 3.5x faster than exact search there at recall@1 0.997; below that
# the bank is cheap to search exactly, which needs no training and cannot miss.
AUTO_EXACT_MAX_BANK = 5_000
PROBED_FRACTION = 1 / 32  # of the IVF cells; half of it moved AUC-sPRO by 1e-3 on both real banks measured
MIN_NPROBE = 8
DEFAULT_EF_SEARCH = 64
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# faiss k-means warns below 39 training points per centroid; cells this full also keep the lists balanced.
MIN_POINTS_PER_CELL = 39


def default_nlist(n: int) -> int:
    """Number of IVF cells for ``n`` bank rows: about 4 sqrt(n), at least 39 rows per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """IVF cells scanned per query: 1/32 of ``nlist``, at least 8 (all of them for tiny indexes)."""
    return min(nlist, max(MIN_NPROBE, math.ceil(nlist * PROBED_FRACTION)))


def _faiss_threads() -> None:
    """Let faiss use as many OpenMP threads as torch (1 under the tests' ``one_torch_thread``)."""
    import faiss
    import torch

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class NearestNeighbours:
    """Euclidean k-nearest-neighbour index over the rows of a float32 memory bank.

    Parameters
    ----------
    bank:
        (n, d) finite array; copied as float32.
    method:
        ``"exact"`` (faiss ``IndexFlatL2``), ``"ivf"`` (IVF-Flat), ``"hnsw"`` (HNSW-Flat) or ``"auto"``:
        exact up to :data:`AUTO_EXACT_MAX_BANK` rows, IVF above. ``self.method`` is the method chosen.
    nprobe:
        IVF cells scanned per query (default :func:`default_nprobe`); more = higher recall, slower.
    ef_search:
        HNSW candidate-list size per query (default :data:`DEFAULT_EF_SEARCH`); more = higher recall.
    nlist:
        IVF cells (default :func:`default_nlist`).
    seed:
        Seed of the IVF k-means (its initial centroids and the training subsample).
    auto_exact_max:
        Largest bank that ``"auto"`` searches exactly.

    The same bank, settings, seed and thread count give the same index and the same results. HNSW is
    built on one thread for that reason (faiss's parallel insertion order depends on thread timing).
    """

    def __init__(
        self,
        bank: np.ndarray,
        method: str = "auto",
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        nlist: int | None = None,
        seed: int = 0,
        auto_exact_max: int = AUTO_EXACT_MAX_BANK,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown nearest-neighbour method {method!r}; expected one of {', '.join(METHODS)}")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("nlist", nlist)):
            _check_positive(name, value)
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
            raise ValueError(f"memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        self.bank = bank
        n, dim = bank.shape
        if method == "auto":
            method = "exact" if n <= auto_exact_max else "ivf"
        self.method = method
        self.seed = int(seed)
        import faiss  # here, not at import: the command line starts without it

        _faiss_threads()
        self._exact: Any = None
        if method == "exact":
            self.index = self._exact_index()
        elif method == "ivf":
            self.nlist = min(nlist if nlist is not None else default_nlist(n), n)
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, self.nlist)
            index.cp.seed = self.seed
            index.cp.min_points_per_centroid = 1  # nlist is ours to choose; no warning for small banks
            index.train(bank)
            index.add(bank)
            self._quantizer = quantizer  # the index refers to it: keep it alive as long as the index
            self.index = index
            self.nprobe = nprobe if nprobe is not None else default_nprobe(self.nlist)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                index.add(bank)
            finally:
                faiss.omp_set_num_threads(threads)
            self.index = index
            self.ef_search = ef_search if ef_search is not None else DEFAULT_EF_SEARCH

    # ------------------------------------------------------------------ knobs
    @property
    def nprobe(self) -> int:
        """IVF cells scanned per query (IVF only)."""
        if self.method != "ivf":
            raise AttributeError(f"nprobe applies to the IVF index, not to {self.method!r}")
        return int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        _check_positive("nprobe", value)
        if self.method != "ivf":
            raise AttributeError(f"nprobe applies to the IVF index, not to {self.method!r}")
        self.index.nprobe = int(min(value, self.nlist))

    @property
    def ef_search(self) -> int:
        """HNSW candidate-list size per query (HNSW only)."""
        if self.method != "hnsw":
            raise AttributeError(f"ef_search applies to the HNSW index, not to {self.method!r}")
        return int(self.index.hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        _check_positive("ef_search", value)
        if self.method != "hnsw":
            raise AttributeError(f"ef_search applies to the HNSW index, not to {self.method!r}")
        self.index.hnsw.efSearch = int(value)

    # ------------------------------------------------------------------ search
    def _exact_index(self) -> Any:
        import faiss

        if self._exact is None:
            self._exact = faiss.IndexFlatL2(self.bank.shape[1])
            self._exact.add(self.bank)
        return self._exact

    def _checked_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        dim = self.bank.shape[1]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries must be an (n, {dim}) array for this {dim}-d memory bank, "
                             f"got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries contain NaN or infinite values")
        return queries

    def refine_maximum(
        self, queries: np.ndarray, distances: np.ndarray, indices: np.ndarray, chunk: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest (distances, indices), (n, 1), of ``queries`` with their largest distance made exact.

        ``distances``/``indices`` are this index's k=1 answer for ``queries``. An approximate answer is
        never closer than the true one, so re-searching exactly the queries in decreasing order of distance
        until the largest exact distance found reaches the next approximate one certifies the maximum and
        its query: PatchCore's image score (the largest patch distance of an image) then equals exact
        search's, at the cost of a few exact queries. Nothing to do for an exact index.
        """
        queries = self._checked_queries(queries)
        distances = np.array(distances, dtype=np.float32).reshape(len(queries), -1)[:, :1]
        indices = np.array(indices, dtype=np.int64).reshape(len(queries), -1)[:, :1]
        if self.method == "exact" or len(queries) == 0:
            return distances, indices
        _faiss_threads()
        order = np.argsort(-distances[:, 0], kind="stable")
        best = -np.inf
        for start in range(0, len(order), chunk):
            if best >= distances[order[start], 0]:
                break
            rows = order[start:start + chunk]
            squared, nearest = self._exact_index().search(queries[rows], 1)
            distances[rows] = np.sqrt(np.maximum(squared, 0.0))
            indices[rows] = nearest
            best = max(best, float(distances[rows, 0].max()))
        return distances, indices

    def search(self, queries: np.ndarray, k: int = 1, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices), each (n_queries, k); distances are Euclidean (not squared).

        ``k`` larger than the bank is clipped to its size. ``exact=True`` searches exactly whatever the
        method (for a few queries whose answer matters most, such as PatchCore's reweighting neighbourhood).
        A query for which an approximate index finds fewer than ``k`` neighbours (its probed cells hold too
        few rows) is answered exactly instead.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._checked_queries(queries)
        k = min(int(k), self.bank.shape[0])
        if queries.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        _faiss_threads()
        squared, indices = (self._exact_index() if exact else self.index).search(queries, k)
        missing = (indices < 0).any(axis=1)
        if missing.any():
            squared[missing], indices[missing] = self._exact_index().search(queries[missing], k)
        return np.sqrt(np.maximum(squared, 0.0)), indices
