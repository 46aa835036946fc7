"""PaDiM federated in one round of summed statistics: equal to the centralized fit, checked, with DP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinspect.cli import main
from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.padim import Padim
from fedinspect.detectors.registry import load_detector
from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.detector_task import DetectorFederationConfig, make_task, run_detector_federation
from fedinspect.federation.rounds import ClientResult, run_rounds
from fedinspect.federation.statistics_task import StatisticsTask
from tests.conftest import write_blob_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = {"image_size": 64, "n_features": 20}


@pytest.fixture(scope="module")
def categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("padim_blobs")
    write_blob_category(root / "blobs", seed=3, n_train=12, n_test=7)
    write_blob_category(root / "other", seed=4, n_train=9, n_test=7)
    return root


def _scores(model: Padim, category: Path) -> np.ndarray:
    dataset = CategoryDataset(category)
    return model.score_samples([dataset.load_image(s) for s in dataset.test])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_federated_padim_equals_the_centralized_fit(categories: Path, scheme: str) -> None:
    config = DetectorFederationConfig(detector="padim", params=PARAMS, clients=4, partition=scheme, alpha=0.3,
                                      centralized=False)
    task = make_task(categories, config)
    assert isinstance(task, StatisticsTask) and task.rounds == 1
    outcome = run_rounds(task, progress=False)
    for name in ("blobs", "other"):
        dataset = CategoryDataset(categories / name)
        central = Padim(seed=0, **PARAMS).fit([dataset.load_image(s) for s in dataset.train])
        federated = task.global_detector(outcome.state, name)
        assert federated.n_train_images_ == len(dataset.train)
        assert np.abs(_scores(federated, categories / name) - _scores(central, categories / name)).max() < 1e-5
    sizes = [sum(r.values()) for r in (c["examples"] for c in outcome.clients.values())]
    assert sum(sizes) == 21


def test_statistics_that_do_not_fit_are_refused(categories: Path) -> None:
    task = StatisticsTask(categories, DetectorFederationConfig(detector="padim", params=PARAMS, clients=2))
    good = task.client_update(0, {}, 1, {})
    task.check_update("client_0", good, {})
    bad_shape = dict(good.arrays)
    key = next(k for k in bad_shape if k.endswith("/sum"))
    bad_shape[key] = bad_shape[key][:, :5]
    with pytest.raises(FedinspectError, match="client_0, blobs"):
        task.check_update("client_0", ClientResult(bad_shape, good.examples), {})
    asymmetric = dict(good.arrays)
    outer = next(k for k in asymmetric if k.endswith("/sum_outer"))
    asymmetric[outer] = asymmetric[outer].clone()
    asymmetric[outer][0, 0, 1] += 1.0
    with pytest.raises(FedinspectError, match="not symmetric"):
        task.check_update("client_0", ClientResult(asymmetric, good.examples), {})
    stranger = {f"elsewhere/{k.split('/', 1)[1]}": v for k, v in good.arrays.items() if k.startswith("blobs/")}
    with pytest.raises(FedinspectError, match="unknown category 'elsewhere'"):
        task.check_update("client_0", ClientResult(stranger, {"elsewhere": 1}), {})
    missing = {k: v for k, v in good.arrays.items() if not k.endswith("/count")}
    with pytest.raises(FedinspectError, match="expected"):
        task.check_update("client_0", ClientResult(missing, good.examples), {})
    negative = {**good.arrays, next(k for k in good.arrays if k.endswith("/count")): torch.tensor(-3.0,
                                                                                                dtype=torch.float64)}
    with pytest.raises(FedinspectError, match="count"):
        task.check_update("client_0", ClientResult(negative, good.examples), {})


def test_settings_are_checked_before_any_work(categories: Path) -> None:
    with pytest.raises(SettingsError, match="unknown DP-SGD setting"):  # a trained detector's privacy is DP-SGD
        DetectorFederationConfig(detector="ae_mse", privacy={"epsilon": 1.0, "clip_norm": 10.0})
    with pytest.raises(SettingsError, match="secure aggregation sums PaDiM's"):
        DetectorFederationConfig(detector="ae_mse", secure=True)
    with pytest.raises(SettingsError, match="privacy of the statistics: give exactly one"):
        DetectorFederationConfig(detector="padim", privacy={"clip_norm": 10.0})
    with pytest.raises(FedinspectError, match="PaDiM, not ae_mse"):
        StatisticsTask(categories, DetectorFederationConfig(detector="ae_mse"))


def test_dp_statistics_carry_noise_and_hide_the_counts(categories: Path, tmp_path: Path) -> None:
    config = DetectorFederationConfig(detector="padim", params=PARAMS, clients=3, centralized=False,
                                      privacy={"epsilon": 1.0, "clip_norm": 50.0, "mode": "distributed"})
    results = run_detector_federation(categories, tmp_path / "run", config, progress=False)
    assert results["privacy"]["unit"] == "image" and 0.98 < results["privacy"]["epsilon"] <= 1.0  # solver: <= target
    assert all(set(c["examples"].values()) == {0} for c in results["clients"])  # counts only inside the noise
    exact = run_detector_federation(categories, tmp_path / "exact",
                                    DetectorFederationConfig(detector="padim", params=PARAMS, clients=3,
                                                             centralized=False), progress=False)
    assert results["categories"]["blobs"]["image_auroc"] is not None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["privacy"]["mode"] == "distributed" and "secure aggregation" in saved["privacy"]["assumes"]
    assert exact["categories"]["blobs"]["pixel_auroc"] != results["categories"]["blobs"]["pixel_auroc"]


@pytest.mark.slow
def test_cli_federates_padim_in_one_round(categories: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["-q", "federate", "--data", str(categories), "--out", str(out), "--detector", "padim",
                 "--image-size", "64", "--clients", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["aggregation"] == "sum" and len(results["history"]) == 1
    fed, central = results["categories"]["blobs"], results["centralized"]["categories"]["blobs"]
    assert fed["image_auroc"] == pytest.approx(central["image_auroc"], abs=1e-9)
    assert fed["pixel_auroc"] == pytest.approx(central["pixel_auroc"], abs=1e-6)


@pytest.mark.slow
def test_secure_aggregation_gives_the_plain_sum_within_its_quantization_bound(categories: Path, tmp_path: Path) -> None:
    """SecAgg+ on the Simulation Engine: the server never holds one client's statistics, only their sum."""
    plain_config = DetectorFederationConfig(detector="padim", params=PARAMS, clients=3, centralized=False)
    plain_task = make_task(categories, plain_config)
    plain = run_rounds(plain_task, progress=False)
    config = DetectorFederationConfig(detector="padim", params=PARAMS, clients=3, centralized=False, secure=True)
    with pytest.raises(SettingsError, match="runs on Flower"):
        run_detector_federation(categories, tmp_path / "in_process", config, progress=False)
    results = run_detector_federation(categories, tmp_path / "secure", config, engine="flower-sim", progress=False)
    block = results["secure_aggregation"]
    assert block["contributors"] == ["client_0", "client_1", "client_2"] and block["entries_clipped"] == 0
    assert block["error_bound"]["blobs/count"] == 0.0 and 0 < block["error_bound"]["blobs/sum_outer"] < 1e-3
    for name in ("blobs", "other"):
        secure = load_detector(tmp_path / "secure" / "models" / name)
        exact = _scores(plain_task.global_detector(plain.state, name), categories / name)
        assert secure.n_train_images_ == len(CategoryDataset(categories / name).train)  # the count is exact
        assert np.abs(_scores(secure, categories / name) - exact).max() < 1e-3 * np.abs(exact).max()


def test_cli_checks_padim_options_before_any_work(categories: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "run")
    base = ["-q", "federate", "--data", str(categories), "--out", out]
    assert main([*base, "--detector", "padim", "--secure-aggregation"]) == 2
    assert "runs on Flower" in capsys.readouterr().err
    assert main([*base, "--detector", "padim", "--dp-epsilon", "1"]) == 2
    assert "need --dp-clip" in capsys.readouterr().err
    assert main([*base, "--detector", "padim", "--dp-epsilon", "1", "--dp-clip", "100", "--dp-unit", "embedding"]) == 2
    assert "--dp-unit: PaDiM's statistics protect one image" in capsys.readouterr().err
    assert main([*base, "--detector", "ae_mse", "--secure-aggregation"]) == 2
    assert "--secure-aggregation: options of PaDiM's one round" in capsys.readouterr().err
    assert main([*base, "--keep-aspect-ratio", "no"]) == 2
    assert "--keep-aspect-ratio: federated PatchCore" in capsys.readouterr().err
    assert main([*base, "--detector", "ae_mse", "--keep-aspect-ratio", "no"]) == 2
    assert "--keep-aspect-ratio: options of PaDiM's one round of statistics, not of ae_mse" in capsys.readouterr().err
    assert not Path(out).exists()
