"""Studies end to end with real federated runs: a small grid on the tiny data, and the CI study (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedinspect.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_command_runs_and_resumes(tiny_dataset, tmp_path, capsys) -> None:
    config = tmp_path / "STUDY.toml"
    config.write_text(f"""
[study]
name = "tiny"
data = "{tiny_dataset.as_posix()}"
seeds = [0]

[options]
clients = 3
image_size = 64
global_ratio = 0.05
centralized = false
compare_shared = false
write_maps = false
examples_per_category = 0

[grid]
partition = [{{ name = "category", partition = "category" }}]
strategy = ["federated_coreset", "fair_coreset"]
""")
    out = tmp_path / "study"
    assert main(["-q", "study", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 cells (2 run, 0 done before, 0 failed)" in printed
    with (out / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy"] for r in rows] == ["federated_coreset", "fair_coreset"]
    for cell in ("category__federated_coreset__seed0", "category__fair_coreset__seed0"):
        results = json.loads((out / "cells" / cell / "results.json").read_text())
        assert results["config"]["strategy"] == cell.split("__")[1]
        assert "worst" in results["fairness"]["image_auroc"]["clients"]
        assert all("auc_spro" in c for c in results["clients"])
    assert main(["-q", "study", "--config", str(config), "--out", str(out)]) == 0
    assert "2 cells (0 run, 2 done before, 0 failed)" in capsys.readouterr().out


def test_bad_study_file_exits_with_a_clear_error(tmp_path, capsys) -> None:
    config = tmp_path / "STUDY.toml"
    config.write_text('[study]\nsynthetic = "tiny"\n[options]\nstrategy = "nope"\n')
    assert main(["-q", "study", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "STUDY.toml: cell seed0: option 'strategy' must be one of" in error


@pytest.mark.slow
def test_ci_study_four_partitions_three_strategies_three_seeds(tmp_path) -> None:
    """The reduced study of the issue: 4 non-IID partitions x 3 strategies x 3 seeds on `small` (a few minutes)."""
    from fedinspect.study.config import load_study
    from fedinspect.study.runner import run_study

    study = load_study(ROOT / "studies" / "fairness_ci.toml")
    summary = run_study(study, tmp_path / "ci", progress=False)
    assert summary["cells"] == {"total": 36, "ran": 36, "reused": 0, "failed": 0}
    assert len(summary["rows"]) == 12
    for row in summary["rows"]:
        assert row["seeds"] == [0, 1, 2] and row["worst_client_image_auroc"]["n"] == 3
    worst = [t for t in summary["tests"] if t["metric"] == "worst client image AUROC"]
    assert {t["strategy"] for t in worst} == {"diversity_preserving", "fair_coreset"}
    assert len([t for t in worst if t["context"] == {"all": "pooled"}]) == 2
    assert all(t["wilcoxon"]["n"] == 12 for t in worst if t["context"] == {"all": "pooled"})
    advice = "\n".join(summary["recommendations"])
    for partition in ("category", "dirichlet-0.1", "dirichlet-1.0", "quantity"):
        assert f"partition = {partition}" in advice
    assert (tmp_path / "ci" / "report.html").is_file()
