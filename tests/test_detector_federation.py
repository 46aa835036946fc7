"""Trained detectors federated by FedAvg / FedProx: local training hooks, the task, Flower = in process, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinspect.cli import main
from fedinspect.data.dataset import CategoryDataset
from fedinspect.detectors.autoencoder import AutoencoderMSE
from fedinspect.detectors.trained_detector import TrainingError
from fedinspect.errors import SettingsError
from fedinspect.federation.detector_task import (
    DetectorFederationConfig,
    DetectorTask,
    make_task,
    run_detector_federation,
)
from fedinspect.federation.rounds import run_rounds
from tests.conftest import write_blob_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federated_blobs")
    write_blob_category(root / "blobs", seed=3, n_train=8, n_test=7)
    write_blob_category(root / "other", seed=4, n_train=6, n_test=7)
    return root


def _images(category: Path) -> list[np.ndarray]:
    dataset = CategoryDataset(category)
    return [dataset.load_image(s) for s in dataset.train]


def test_trainable_state_round_trip_and_refusals(two_categories: Path) -> None:
    model = AutoencoderMSE(image_size=64, epochs=1, seed=1).initialize()
    state = model.trainable_state()
    other = AutoencoderMSE(image_size=64, epochs=1, seed=2).initialize()
    assert any(not torch.equal(state[k], v) for k, v in other.trainable_state().items())
    other.load_trainable_state(state)
    assert all(torch.equal(state[k], v) for k, v in other.trainable_state().items())
    key = next(k for k, v in state.items() if v.is_floating_point())
    with pytest.raises(TrainingError, match=r"client_3: tensors .* missing"):
        other.load_trainable_state({k: v for k, v in state.items() if k != key}, source="client_3")
    with pytest.raises(TrainingError, match=f"{key} is torch.float32 .*expected"):
        other.load_trainable_state({**state, key: torch.zeros(3)})
    with pytest.raises(TrainingError, match="non-finite"):
        other.load_trainable_state({**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(SettingsError, match="proximal_mu"):
        other.partial_fit(_images(two_categories / "blobs"), proximal_mu=-1)


class _SGDAutoencoder(AutoencoderMSE):
    """Plain SGD, for which FedProx's term has its textbook effect (Adam rescales each coordinate's step)."""

    def _optimizer(self, module):
        return torch.optim.SGD(self._parameters_to_train(module), lr=self.learning_rate)


def test_partial_fit_continues_and_fedprox_stays_near_the_start(two_categories: Path) -> None:
    images = _images(two_categories / "blobs")
    start_model = _SGDAutoencoder(image_size=64, epochs=3, seed=0, learning_rate=1.0).initialize()
    start = start_model.trainable_state()
    parameters = {name for name, _ in start_model.module_.named_parameters()}  # not BatchNorm's running stats

    def distance(mu: float) -> float:
        model = _SGDAutoencoder(image_size=64, epochs=3, seed=0, learning_rate=1.0).load_trainable_state(start)
        model.partial_fit(images, proximal_mu=mu)
        assert model.n_validation_images_ == 0 and len(model.history_) == 3  # every image, no early stop
        return float(sum(((v.double() - start[k].double()) ** 2).sum()
                         for k, v in model.trainable_state().items() if k in parameters))

    free, held = distance(0.0), distance(1.0)
    assert free > 0 and held < 0.3 * free


def test_first_round_is_the_weighted_mean_of_the_clients_models(two_categories: Path) -> None:
    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 64, "batch_size": 4}, clients=2,
                                      rounds=1, centralized=False)
    task = DetectorTask(two_categories, config)
    start = task.initial_state()
    updates = [task.client_update(i, start, 1, {}) for i in range(2)]
    outcome = run_rounds(task, progress=False)
    for category in ("blobs", "other"):
        counts = [u.examples[category] for u in updates]
        assert sum(counts) == len(CategoryDataset(two_categories / category).train)
        key = next(k for k in outcome.state if k.startswith(f"{category}/") and outcome.state[k].is_floating_point())
        expected = sum(n * u.arrays[key].double().numpy() for n, u in zip(counts, updates, strict=True)) / sum(counts)
        assert np.allclose(outcome.state[key].double().numpy(), expected, atol=1e-6)
    record = outcome.history[0]
    assert set(record["image_auroc"]) == {"blobs", "other"}
    assert record["bytes_per_client"]["client_0"] == updates[0].n_bytes > 0


def test_padim_and_patchcore_are_not_fedavg_tasks(two_categories: Path) -> None:
    with pytest.raises(SettingsError, match="not trained by gradient descent"):
        DetectorTask(two_categories, DetectorFederationConfig(detector="patchcore"))
    with pytest.raises(SettingsError, match="clients must be an integer"):
        DetectorFederationConfig(clients=0)


@pytest.mark.slow
def test_flower_simulation_equals_in_process_over_two_rounds(two_categories: Path, tmp_path: Path) -> None:
    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 64, "batch_size": 4}, clients=2,
                                      rounds=2, centralized=False)
    local = run_detector_federation(two_categories, tmp_path / "local", config, progress=False)
    flower = run_detector_federation(two_categories, tmp_path / "flower", config, engine="flower-sim", progress=False)
    assert flower["engine"] == "flower-sim" and flower["missing_clients"] == []
    for a, b in zip(local["history"], flower["history"], strict=True):
        assert a["image_auroc"] == b["image_auroc"] and a["train_loss"] == b["train_loss"]
        assert a["bytes_per_client"] == b["bytes_per_client"]

    def metrics(results: dict) -> dict:
        return {name: {k: v for k, v in entry.items() if k != "timings"}
                for name, entry in results["categories"].items()}

    assert metrics(local) == metrics(flower)
    saved = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert saved["config"]["rounds"] == 2 and (tmp_path / "flower" / "models" / "blobs" / "ae_mse.json").is_file()
    assert (tmp_path / "flower" / "report.html").is_file() and (tmp_path / "flower" / "rounds.png").is_file()


def test_cli_refuses_options_of_another_federation(two_categories: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "run")
    assert main(["-q", "federate", "--data", str(two_categories), "--out", out, "--detector", "ae_mse",
                 "--strategy", "robust_coreset"]) == 2
    assert "--strategy: options of federated PatchCore" in capsys.readouterr().err
    assert main(["-q", "federate", "--data", str(two_categories), "--out", out, "--rounds", "3"]) == 2
    assert "--rounds: federated PatchCore is one round of memory banks" in capsys.readouterr().err
    assert main(["-q", "federate", "--data", str(two_categories), "--out", out, "--detector", "ae_mse",
                 "--backbone", "efficientnet_lite2"]) == 2
    assert "--backbone: ae_mse does not take it" in capsys.readouterr().err
    for option in ("--rounds", "--local-epochs"):  # 0 is a value to refuse, not "none given"
        assert main(["-q", "federate", "--data", str(two_categories), "--out", out, "--detector", "ae_mse",
                     option, "0"]) == 2
        assert f"{option[2:].replace('-', '_')} must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.slow
def test_cli_federates_a_trained_detector(two_categories: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["-q", "federate", "--data", str(two_categories), "--out", str(out), "--detector", "ae_mse",
                 "--image-size", "64", "--clients", "2", "--rounds", "2", "--local-epochs", "2",
                 "--proximal-mu", "0.01"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["proximal_mu"] == 0.01 and results["config"]["local_epochs"] == 2
    assert set(results["rounds_to_centralized"]) == {"blobs", "other"}
    assert "FedProx mu 0.01" in capsys.readouterr().out


def test_two_factories_share_one_model_and_are_compared_with_each_alone(two_categories: Path, tmp_path: Path) -> None:
    """Seed 004's cross-dataset experiment as a federation: each factory holds one product (partition
    'category'); one shared model is federated, and each factory's own model is tested on both products."""
    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 64, "batch_size": 4}, clients=2,
                                      partition="category", rounds=2, model_scope="shared", local_baseline=True)
    task = DetectorTask(two_categories, config)
    assert task.groups == ["all"] and [task.client_groups(i) for i in range(2)] == [["all"], ["all"]]
    held = [set(task.client_categories(i)) for i in range(2)]
    assert held[0] | held[1] == {"blobs", "other"} and not held[0] & held[1]
    results = run_detector_federation(two_categories, tmp_path / "run", config, progress=False)
    assert set(results["local_only"]) == {"client_0", "client_1"}
    for block in results["local_only"].values():
        assert set(block["categories"]) == {"blobs", "other"}  # its own product and the other factory's
        assert all(entry["model_of"] == "all" for entry in block["categories"].values())
    assert (tmp_path / "run" / "models" / "all" / "ae_mse.json").is_file()
    assert set(results["centralized"]["categories"]) == {"blobs", "other"}
    assert results["centralized"]["categories"]["blobs"]["counts"]["train"] == 14  # fitted on the union
    report = (tmp_path / "run" / "report.md").read_text()
    assert "client_0 alone" in report and "| federated |" in report


def test_shared_padim_needs_one_grid(tmp_path: Path) -> None:
    write_blob_category(tmp_path / "wide", seed=1, n_train=4, n_test=7, shape=(48, 96))
    write_blob_category(tmp_path / "square", seed=2, n_train=4, n_test=7, shape=(64, 64))
    config = DetectorFederationConfig(detector="padim", params={"image_size": 64, "n_features": 10}, clients=2,
                                      model_scope="shared", centralized=False)
    with pytest.raises(SettingsError, match="needs one feature grid"):
        run_rounds(make_task(tmp_path, config), progress=False)
    stretched = DetectorFederationConfig(**{**config.to_dict(),
                                            "params": {**config.params, "keep_aspect_ratio": False}})
    outcome = run_rounds(make_task(tmp_path, stretched), progress=False)
    assert float(outcome.state["all/count"]) == 8


def test_dp_sgd_rounds_accumulate_each_clients_epsilon(two_categories: Path, tmp_path: Path, capsys) -> None:
    """DP-SGD in every client's local training: its accountant history stays with it across rounds, and the
    server recomputes each client's epsilon from it (more rounds, more epsilon)."""
    from fedinspect.privacy.dp_sgd import DPSGDSettings, epsilon_of

    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 64}, clients=2, rounds=2,
                                      centralized=False, privacy={"noise_multiplier": 1.0, "delta": 1e-5,
                                                                  "batch_size": 4, "accumulation_steps": 1})
    outcome = run_rounds(DetectorTask(two_categories, config), progress=False)
    first, second = (record["epsilon"] for record in outcome.history)
    assert set(first) == {"client_0", "client_1"} and all(second[c] > first[c] > 0 for c in first)
    memory = outcome.memories["client_0"]["privacy_history"]
    settings = DPSGDSettings(noise_multiplier=1.0, delta=1e-5, batch_size=4, accumulation_steps=1)
    assert second["client_0"] == pytest.approx(max(epsilon_of(h, 1e-5) for h in memory.values()))
    assert sum(steps for _, _, steps in memory["blobs"]) == 2 * settings.steps_per_epoch(
        DetectorTask(two_categories, config).client_categories(0)["blobs"].__len__())
    out = str(tmp_path / "run")
    assert main(["-q", "federate", "--data", str(two_categories), "--out", out, "--detector", "ae_mse",
                 "--dp-epsilon", "1"]) == 2
    assert "--dp-epsilon: DP-SGD of a trained detector takes --dp-noise" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="DP-SGD trains the trained detectors"):
        DetectorFederationConfig(detector="patchcore", privacy={"noise_multiplier": 1.0})
