"""The zoo study (seed 004's protocol) end to end on two tiny generated datasets: tables, thresholds, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedinspect.cli import main
from tests.conftest import write_blob_category

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("zoo")
    return [write_blob_category(root / "plates", seed=5, shape=(48, 64)),
            write_blob_category(root / "tiles", seed=6, shape=(64, 48))]


def test_zoo_study_within_across_union_with_a_failed_cell_and_resume(two_datasets, tmp_path, capsys):
    out = tmp_path / "zoo"
    args = ["-q", "zoo-study", "--data", *map(str, two_datasets), "--out", str(out), "--detectors", "ae_mse,padim",
            "--image-size", "48", "--epochs", "1", "--in-process"]
    # PaDiM models one grid: 64x48 and 48x64 images have two, so its cross tests and its union fit fail, named,
    # and everything else goes on
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "padim trained on union failed" in captured.err and "feature grid" in captured.err
    summary = json.loads((out / "zoo_study.json").read_text())
    assert sorted((f["detector"], f["train"], f["test"]) for f in summary["failed"]) == [
        ("padim", "plates", "tiles"), ("padim", "tiles", "plates"), ("padim", "union", None)]
    rows = {(r["detector"], r["train"], r["test"]): r for r in summary["rows"]}
    assert len(rows) == 6 + 2  # ae_mse: 2 x 2 + union x 2; padim: within each dataset
    assert {r["experiment"] for r in rows.values()} == {"same", "cross", "union"}
    for train, test in (("plates", "tiles"), ("tiles", "plates")):
        same, cross = rows[("ae_mse", train, train)], rows[("ae_mse", train, test)]
        # across datasets the training dataset's thresholds are used as they are
        assert (cross["t1"], cross["t2"], cross["t3"]) == (same["t1"], same["t2"], same["t3"])
        assert cross["figure"] is None and same["figure"].endswith("thresholds.png")
        assert rows[("padim", train, train)]["image_auroc"] > 0.8
    results = json.loads((out / "cells" / "padim" / "train-plates" / "test-plates" / "results.json").read_text())
    assert results["thresholds"]["t1_held_out"] is True and results["counts"]["train"] == 8  # 10 minus T1's 2
    report = (out / "report.md").read_text()
    assert "Trained on the union" in report and "Cost (the seed's Table 9)" in report
    assert "| ae_mse |" in report and "Failed cells" in report
    cost = summary["cost"]["ae_mse"]
    assert set(cost["fit_s"]) == {"plates", "tiles", "union"} and cost["parameters"] > 0 and cost["fps"] > 0

    # a rerun redoes only the cells with a failure and leaves finished results untouched
    finished = out / "cells" / "ae_mse" / "train-union" / "test-tiles" / "results.json"
    before = finished.stat().st_mtime_ns
    assert main(args) == 1
    assert "padim trained on union failed" in capsys.readouterr().err  # the failed cell was tried again
    assert finished.stat().st_mtime_ns == before


def test_zoo_study_cells_in_their_own_process(two_datasets, tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(["-q", "zoo-study", "--data", str(two_datasets[0]), "--out", str(out), "--detectors", "padim",
                 "--image-size", "48"]) == 0
    summary = json.loads((out / "zoo_study.json").read_text())
    assert [r["experiment"] for r in summary["rows"]] == ["same"]  # one dataset: no cross, no union
    fit = json.loads((out / "cells" / "padim" / "train-plates" / "fit.json").read_text())
    assert fit["peak_memory_mb"] > 50 and fit["model_bytes"] > 0
    assert (out / "report.html").is_file()


def test_zoo_study_refuses_unknown_detectors_and_missing_data(tmp_path, capsys):
    assert main(["zoo-study", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--detectors", "nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["zoo-study", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--detectors", "padim"]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    assert main(["zoo-study", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--detectors", "padim",
                 "--t1-percentile", "150"]) == 2
    assert "T1 percentile must lie in (0, 100]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
