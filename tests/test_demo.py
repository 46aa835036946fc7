"""The README's main job, end to end on the tiny synthetic data."""

from __future__ import annotations

import json

import pytest

from fedinspect.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_every_category_and_prints_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--size", "tiny"]) == 0
    printed = capsys.readouterr().out
    for name in ("engine_wiring", "pipe_clip", "pipe_staple", "tank_screw", "underbody_pipes", "underbody_screw",
                 "mean"):
        assert name in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["categories"]) == 6
    for results in summary["categories"].values():
        assert set(results["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
        assert results["counts"]["test"] == 4
    # tank_screw is 1000x750: its maps must come back at that size
    from PIL import Image

    maps = sorted((out / "results" / "tank_screw" / "maps").rglob("*.png"))
    assert len(maps) == 4 and Image.open(maps[0]).size == (1000, 750)
