"""The README's main job, end to end on the tiny synthetic data."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fedinspect.cli import main

pytestmark = pytest.mark.slow


def test_demo_federates_every_category_and_prints_the_tables(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--size", "tiny"]) == 0
    printed = capsys.readouterr().out
    for name in ("engine_wiring", "pipe_clip", "pipe_staple", "tank_screw", "underbody_pipes", "underbody_screw",
                 "mean", "centralized baseline", "clients sent"):
        assert name in printed
    results = json.loads((out / "run" / "results.json").read_text())
    assert len(results["categories"]) == 6 and len(results["clients"]) == 5
    for entry in results["categories"].values():
        assert set(entry["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
        assert entry["counts"]["test"] == 4
    # tank_screw is 1000x750: its maps must come back at that size
    maps = sorted((out / "run" / "maps" / "tank_screw").rglob("*.png"))
    assert len(maps) == 4 and Image.open(maps[0]).size == (1000, 750)
    assert (out / "run" / "report.html").is_file()
