from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedinspect.evaluation.anomaly_maps import DeferredMaps, read_map, score_range, write_map, write_maps


def test_sixteen_bit_roundtrip(tmp_path: Path) -> None:
    anomaly_map = np.random.default_rng(0).uniform(2.0, 7.0, size=(30, 45)).astype(np.float32)
    low, high = score_range([anomaly_map])
    path = write_map(tmp_path / "maps" / "good" / "0001.png", anomaly_map, low, high)
    with Image.open(path) as image:
        assert image.mode == "I;16" and image.size == (45, 30)
    restored = read_map(path, low, high)
    np.testing.assert_allclose(restored, anomaly_map, atol=(high - low) / 65535)


def test_shared_range_keeps_order_across_images(tmp_path: Path) -> None:
    a = np.full((4, 4), 1.0, np.float32)
    b = np.full((4, 4), 3.0, np.float32)
    low, high = score_range([a, b])
    assert (low, high) == (1.0, 3.0)
    write_map(tmp_path / "a.png", a, low, high)
    write_map(tmp_path / "b.png", b, low, high)
    assert np.asarray(Image.open(tmp_path / "a.png")).max() == 0
    assert np.asarray(Image.open(tmp_path / "b.png")).min() == 65535


def test_constant_maps_get_a_valid_range() -> None:
    low, high = score_range([np.zeros((2, 2))])
    assert high > low


def test_deferred_maps_write_what_write_maps_writes_and_leave_no_temporary_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    maps = [rng.normal(loc=i, size=(20 + i, 30)).astype(np.float32) for i in range(5)]
    low, high = score_range(maps)
    write_maps([(tmp_path / "direct" / f"{i}.png", m) for i, m in enumerate(maps)], low, high)
    spill = tmp_path / "spill"
    spill.mkdir()
    with DeferredMaps(spill_dir=spill, batch=2) as deferred:
        for i, anomaly_map in enumerate(maps):
            deferred.add(tmp_path / "deferred" / "good" / f"{i}.png", anomaly_map)
        assert len(deferred) == 5 and any(spill.iterdir())
        assert deferred.write() == (low, high)
    assert not any(spill.iterdir())
    for i in range(5):
        assert np.array_equal(read_map(tmp_path / "deferred" / "good" / f"{i}.png"),
                              read_map(tmp_path / "direct" / f"{i}.png"))


def test_deferred_maps_refuse_to_write_nothing_and_clean_up_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no map"), DeferredMaps(spill_dir=tmp_path) as deferred:
        deferred.write()
    assert not any(tmp_path.iterdir())
