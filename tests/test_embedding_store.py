from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedinspect.federation.embedding_store import SpilledEmbeddings


def test_spilled_embeddings_behave_as_a_dict_with_their_values_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = {Path(f"train/good/{i}.png"): rng.normal(size=(5 + i, 8)).astype(np.float32) for i in range(3)}
    store = SpilledEmbeddings(spill_dir=tmp_path)
    store.update(values)
    (folder,) = tmp_path.iterdir()
    assert len(list(folder.iterdir())) == 3 and len(store) == 3 and list(store) == list(values)
    for key, value in values.items():
        assert key in store and store[key].dtype == np.float32 and np.array_equal(store[key], value)
    store[Path("train/good/0.png")] = np.zeros((2, 8), np.float32)  # replaced: the old file goes
    assert len(list(folder.iterdir())) == 3 and store[Path("train/good/0.png")].shape == (2, 8)
    read = store[Path("train/good/1.png")]
    read[:] = 7.0  # a copy: what is stored does not change
    assert np.array_equal(store[Path("train/good/1.png")], values[Path("train/good/1.png")])
    assert np.array_equal(store.pop(Path("train/good/2.png")), values[Path("train/good/2.png")])
    assert Path("train/good/2.png") not in store and len(list(folder.iterdir())) == 2
    assert store.pop(Path("absent.png"), None) is None
    with pytest.raises(KeyError):
        store[Path("absent.png")]
    store.close()
    assert not folder.exists() and len(store) == 0
