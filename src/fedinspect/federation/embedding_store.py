"""Training embeddings kept on disk between the clients' pass and the server's later reads of them.

The centralized baseline and the attacks reuse the patch embeddings the clients computed, category by
category, long after the clients' pass. Held in memory they make a run's peak grow with its training set
(1.1 GB for the ``full`` synthetic dataset at 256 px); here each image's array waits in a ``.npy`` file of a
temporary folder (written and read back by this process only, never unpickled) and costs memory only while
it is read.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np


class SpilledEmbeddings(MutableMapping[Path, np.ndarray]):
    """A ``dict`` of image path -> patch embeddings whose values live on disk until read.

    Reading a value loads a fresh copy (changing it does not change what is stored). The temporary folder
    (in ``spill_dir``, default the system's) is deleted by :meth:`close`, or when the object is collected.
    """

    def __init__(self, spill_dir: str | Path | None = None) -> None:
        self._folder = tempfile.TemporaryDirectory(dir=spill_dir, prefix="fedinspect-embeddings-")
        self._files: dict[Path, Path] = {}
        self._written = 0

    def __setitem__(self, key: Path, value: np.ndarray) -> None:
        file = Path(self._folder.name) / f"{self._written}.npy"
        self._written += 1
        np.save(file, np.asarray(value), allow_pickle=False)
        if key in self._files:
            self._files[key].unlink()
        self._files[key] = file

    def __getitem__(self, key: Path) -> np.ndarray:
        return np.load(self._files[key], allow_pickle=False)

    def __delitem__(self, key: Path) -> None:
        self._files.pop(key).unlink()

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[Path]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Delete every stored array and the folder."""
        self._files.clear()
        self._folder.cleanup()
