"""Exact nearest-neighbour search in a memory bank with faiss."""

from __future__ import annotations

import numpy as np


class NearestNeighbours:
    """Euclidean k-nearest-neighbour index over the rows of a float32 memory bank."""

    def __init__(self, bank: np.ndarray) -> None:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        self.bank = bank
        import faiss  # here, not at import: the command line starts without it

        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(bank)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices), each (n_queries, k); distances are Euclidean (not squared)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.bank.shape[0])
        squared, indices = self.index.search(queries, k)
        return np.sqrt(np.maximum(squared, 0.0)), indices
