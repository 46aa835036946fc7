"""Studies: statistics, Pareto fronts, the study file, resuming, analysis and the report (fast, no PatchCore)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedinspect.evaluation.fairness import run_fairness
from fedinspect.study import runner as study_runner
from fedinspect.study.config import StudyConfigError, load_study, option_names
from fedinspect.study.pareto import pareto_front
from fedinspect.study.statistics import bootstrap_ci, paired_permutation_test, wilcoxon_test


# ---------------------------------------------------------------- statistics
def test_bootstrap_ci_known_cases() -> None:
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    # two values 0 and 1: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], confidence=0.4) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([None, float("nan")]))
    assert bootstrap_ci([0.2, 0.5, 0.9], seed=3) == bootstrap_ci([0.2, 0.5, 0.9], seed=3)  # seeded


def test_bootstrap_ci_matches_scipy() -> None:
    x = np.random.default_rng(0).normal(0.8, 0.05, size=12)
    low, high = bootstrap_ci(x, n_resamples=20_000, seed=1)
    ref = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.004) and high == pytest.approx(ref.high, abs=0.004)
    assert low < x.mean() < high


def test_permutation_test_matches_scipy_exact() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.80, 0.05, size=10)
    b = a - rng.normal(0.02, 0.03, size=10)
    result = paired_permutation_test(a, b)
    ref = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided")
    assert result.n == 10 and "exact" in result.note
    assert result.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert result.mean_difference == pytest.approx(np.mean(a - b))


def test_permutation_test_random_path_and_undefined_pairs() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(0.5, 0.1, size=24)
    b = a + rng.normal(0.0, 0.1, size=24)
    result = paired_permutation_test(a, b, n_resamples=20_000, seed=0)
    ref = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                 n_resamples=20_000, random_state=1)
    assert result.n == 24 and "random" in result.note
    assert result.p_value == pytest.approx(ref.pvalue, abs=0.02)
    with_nan = paired_permutation_test([0.1, float("nan"), 0.3], [0.2, 0.4, float("nan")])
    assert with_nan.n == 1  # only the pairs where both are defined
    assert paired_permutation_test([], []).p_value is None


def test_wilcoxon_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.8, 0.05, size=15)
    b = a - rng.normal(0.01, 0.02, size=15)
    result = wilcoxon_test(a, b)
    ref = stats.wilcoxon(a, b)
    assert (result.n, result.statistic, result.p_value) == (15, pytest.approx(ref.statistic),
                                                            pytest.approx(ref.pvalue))
    assert "Wilcoxon" in result.test
    same = wilcoxon_test([0.5, 0.7], [0.5, 0.7])
    assert same.p_value is None and "every difference is 0" in same.note


# ---------------------------------------------------------------- Pareto
def test_pareto_front_hand_made() -> None:
    points = [[0.9, 0.5], [0.8, 0.8], [0.7, 0.7], [0.95, 0.4], [0.8, 0.8], [float("nan"), 1.0]]
    np.testing.assert_array_equal(pareto_front(points, (True, True)), [0, 1, 3, 4])  # equal points both stay
    # accuracy up, bytes down
    np.testing.assert_array_equal(pareto_front([[0.9, 10.0], [0.9, 5.0], [0.95, 20.0], [0.8, 5.0]], (True, False)),
                                  [1, 2])
    with pytest.raises(ValueError, match="objectives"):
        pareto_front([[1.0, 2.0, 3.0]], (True, True))


# ---------------------------------------------------------------- the study file
STUDY = """
[study]
name = "t"
data = "{data}"
seeds = [0, 1]
baseline = "federated_coreset"

[options]
clients = 2
image_size = 64
centralized = false
compare_shared = false
write_maps = false
examples_per_category = 0

[grid]
partition = [
    {{ name = "category", partition = "category" }},
    {{ name = "dirichlet-1", partition = "dirichlet", alpha = 1.0 }},
]
strategy = ["federated_coreset", "fair_coreset"]
"""


def write_study(tmp_path: Path, text: str = STUDY, data: Path | None = None) -> Path:
    data = data or tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = tmp_path / "STUDY.toml"
    path.write_text(text.format(data=data.as_posix()))
    return path


def test_study_file_gives_a_cell_per_combination(tmp_path) -> None:
    study = load_study(write_study(tmp_path))
    assert len(study.cells) == 2 * 2 * 2
    ids = [cell.cell_id for cell in study.cells]
    assert ids[0] == "category__federated_coreset__seed0" and len(set(ids)) == len(ids)
    cell = next(c for c in study.cells if c.cell_id == "dirichlet-1__fair_coreset__seed1")
    assert (cell.config.partition, cell.config.alpha, cell.config.strategy) == ("dirichlet", 1.0, "fair_coreset")
    assert (cell.config.settings.seed, cell.config.settings.image_size, cell.config.clients) == (1, 64, 2)
    assert study.situation == "partition"


@pytest.mark.parametrize(("edit", "message"), [
    (("clients = 2", "clinets = 2"), r"STUDY.toml: cell category__federated_coreset__seed0: unknown option.*'clinets'"),
    (("clients = 2", 'clients = "two"'), r"STUDY.toml: cell .*option 'clients' must be an integer"),
    (('"fair_coreset"]', '"fancy"]'), r"STUDY.toml: cell category__fancy__seed0: option 'strategy' must be one of"),
    (("image_size = 64", "image_size = 64\nglobal_ratio = 2.0"), r"STUDY.toml: cell .*global_ratio must be in"),
    (("seeds = [0, 1]", "seeds = []"), r"STUDY.toml: \[study\] seeds must be a non-empty list"),
    (("baseline =", "basline ="), r"STUDY.toml: unknown key\(s\) \['basline'\] in \[study\]"),
    (("image_size = 64", "seed = 3"), r"'seed' is not an option"),
    (("[grid]", "[grids]"), r"unknown table\(s\) \['grids'\]"),
    (('name = "dirichlet-1"', 'name = "category"'), r"several levels are labelled \['category'\]"),
])
def test_study_file_errors_name_the_file_and_cell(tmp_path, edit, message) -> None:
    old, new = edit
    path = write_study(tmp_path, STUDY.replace(old, new, 1))
    with pytest.raises(StudyConfigError, match=message):
        load_study(path)


def test_study_file_not_toml_or_missing(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=")
    with pytest.raises(StudyConfigError, match=r"bad\.toml: not valid TOML"):
        load_study(bad)
    with pytest.raises(StudyConfigError, match="not found"):
        load_study(tmp_path / "missing.toml")
    assert "strategy" in option_names() and "image_size" in option_names() and "seed" not in option_names()


def test_example_study_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "studies"
    ci, full = load_study(root / "fairness_ci.toml"), load_study(root / "fairness_full.toml")
    for study in (ci, full):
        partitions = {c.config.partition for c in study.cells}
        alphas = {c.config.alpha for c in study.cells if c.config.partition == "dirichlet"}
        assert {"category", "dirichlet", "quantity"} <= partitions and alphas == {0.1, 1.0}
        assert len(study.axes["strategy"]) >= 3 and study.seeds == [0, 1, 2]


# ---------------------------------------------------------------- running and resuming (a fake federation)
def fake_results(config, quality: float) -> dict:
    """What run_federation returns, with metrics that depend on the strategy and the seed."""
    categories = {name: {"image_auroc": min(1.0, quality + 0.01 * k), "auc_spro": {"0.05": quality / 2}}
                  for k, name in enumerate(("a", "b", "c"))}
    clients = [{"client": f"client_{i}", "bytes_sent": 1000, "image_auroc": quality - 0.1 * i,
                "auc_spro": {"0.05": quality / 3}} for i in range(config.clients)]
    return {"config": config.to_dict(), "categories": categories, "clients": clients,
            "mean": {"image_auroc": quality, "auc_spro": {"0.05": quality / 2}},
            "fairness": run_fairness(categories, clients), "stages": {"global_bank": 10}, "timing": {"total_s": 1.0}}


class FakeFederation:
    """Stands in for run_federation: writes results.json, counts calls, can be interrupted."""

    def __init__(self, interrupt_at: int | None = None, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt_at, self.fail = interrupt_at, fail

    def __call__(self, data_dir, out_dir, config, progress=True, **kwargs):
        self.calls.append(Path(out_dir).name)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail is not None and Path(out_dir).name == self.fail:
            raise ValueError("infeasible partition")
        quality = 0.8 + (0.05 if config.strategy == "fair_coreset" else 0.0) + 0.01 * config.settings.seed
        results = fake_results(config, quality)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
        return results


def test_study_resumes_without_redoing_finished_cells(tmp_path, monkeypatch) -> None:
    study = load_study(write_study(tmp_path))
    out = tmp_path / "out"
    interrupted = FakeFederation(interrupt_at=2)
    monkeypatch.setattr(study_runner, "run_federation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study_runner.run_study(study, out, progress=False)
    first = out / "cells" / study.cells[0].cell_id / "results.json"
    stamp = first.stat().st_mtime_ns
    assert interrupted.calls == [c.cell_id for c in study.cells[:2]]

    resumed = FakeFederation()
    monkeypatch.setattr(study_runner, "run_federation", resumed)
    summary = study_runner.run_study(study, out, progress=False)
    assert resumed.calls == [c.cell_id for c in study.cells[1:]]  # the finished cell is not run again
    assert first.stat().st_mtime_ns == stamp
    assert summary["cells"] == {"total": 8, "ran": 7, "reused": 1, "failed": 0}

    again = FakeFederation()
    monkeypatch.setattr(study_runner, "run_federation", again)
    assert study_runner.run_study(study, out, progress=False)["cells"]["reused"] == 8 and again.calls == []


def test_changed_configuration_or_broken_results_rerun_the_cell(tmp_path, monkeypatch) -> None:
    study = load_study(write_study(tmp_path))
    out = tmp_path / "out"
    monkeypatch.setattr(study_runner, "run_federation", FakeFederation())
    study_runner.run_study(study, out, progress=False)
    (out / "cells" / study.cells[0].cell_id / "results.json").write_text('{"config": {"trunc')
    changed = load_study(write_study(tmp_path, STUDY.replace("image_size = 64", "image_size = 96")))
    fake = FakeFederation()
    monkeypatch.setattr(study_runner, "run_federation", fake)
    study_runner.run_study(changed, out, progress=False)
    assert len(fake.calls) == 8  # every cell's configuration changed
    fake = FakeFederation()
    monkeypatch.setattr(study_runner, "run_federation", fake)
    (out / "cells" / study.cells[3].cell_id / "results.json").write_text("{")
    study_runner.run_study(changed, out, progress=False)
    assert fake.calls == [study.cells[3].cell_id]


def test_failed_cell_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch) -> None:
    study = load_study(write_study(tmp_path))
    bad = study.cells[1].cell_id
    monkeypatch.setattr(study_runner, "run_federation", FakeFederation(fail=bad))
    summary = study_runner.run_study(study, tmp_path / "out", progress=False)
    assert summary["cells"]["failed"] == 1 and summary["failed"][0]["cell"] == bad
    error = (tmp_path / "out" / "cells" / bad / "error.txt").read_text()
    assert f"cell {bad}" in error and "infeasible partition" in error
    assert "failed: " + bad in (tmp_path / "out" / "report.md").read_text()


def test_study_outputs_table_tests_fronts_and_advice(tmp_path, monkeypatch) -> None:
    study = load_study(write_study(tmp_path))
    out = tmp_path / "out"
    monkeypatch.setattr(study_runner, "run_federation", FakeFederation())
    summary = study_runner.run_study(study, out, progress=False)
    rows = {(r["levels"]["partition"], r["levels"]["strategy"]): r for r in summary["rows"]}
    fair = rows[("category", "fair_coreset")]
    assert fair["seeds"] == [0, 1]
    assert fair["image_auroc"]["mean"] == pytest.approx(0.855)  # 0.85 and 0.86
    assert fair["worst_client_image_auroc"]["mean"] == pytest.approx(0.755)  # client_1 = quality - 0.1
    assert (fair["image_auroc"]["ci_low"], fair["image_auroc"]["ci_high"]) == pytest.approx((0.85, 0.86))
    tests = [t for t in summary["tests"] if t["metric"] == "worst client image AUROC"]
    pooled = next(t for t in tests if t["context"] == {"all": "pooled"})
    assert pooled["wilcoxon"]["n"] == 4 and pooled["wilcoxon"]["mean_difference"] == pytest.approx(0.05)
    per_category = next(t for t in summary["tests"] if t["metric"] == "per-category image AUROC")
    assert per_category["pairs"] == "seeds x categories" and per_category["permutation"]["n"] == 2 * 3
    assert summary["fronts"]["category"]["accuracy vs worst client"] == ["category / fair_coreset"]
    advice = "\n".join(summary["recommendations"])
    assert "for the worst-off client use category / fair_coreset" in advice and "+5.0 points" in advice
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("partition,strategy,seeds,image_auroc,image_auroc_ci_low")
    assert len(csv_lines) == 1 + 4
    assert "| category | fair_coreset | 2 | 0.855 [0.850, 0.860]" in (out / "table.md").read_text()
    html = (out / "report.html").read_text()
    assert "Paired tests against the baseline" in html and "Recommendations" in html
    assert (out / "figures" / "pareto.png").is_file() and (out / "figures" / "worst_client.png").is_file()
    json.loads((out / "study.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in study.json"))
