"""The supervised detector per factory: synthesis inside each client, FedAvg of the trainable weights.

Tiny tiles are drawn here (gray noise; a defect is a dark square), the settings are cheap (64 px, the head
convolution fine-tuned, one or two rounds of one epoch).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.client import derived_seed
from fedinspect.federation.rounds import ClientResult, run_rounds, task_from_spec
from fedinspect.federation.supervised_task import (
    ClientData,
    ClientImages,
    ComparisonSettings,
    SupervisedFederationSettings,
    SupervisedTask,
    compare_local_federated_centralized,
    synthesize_in_client,
)

SETTINGS = SupervisedFederationSettings(rounds=1, local_epochs=1, method="cutpaste", n_synthetic=4,
                                        per_client={"client_1": {"n_synthetic": 2}}, image_size=64,
                                        trainable_blocks=1, lr=1e-3, batch_size=8, seed=5)


def tile(rng: np.random.Generator, defect: bool) -> np.ndarray:
    image = rng.normal(120, 10, (64, 80)).clip(0, 255)
    if defect:
        top, left = rng.integers(5, 40, 2)
        image[top:top + 12, left:left + 12] = 20
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def clients() -> list[ClientData]:
    rng = np.random.default_rng(0)
    return [ClientData([tile(rng, False) for _ in range(5)]),
            ClientData([tile(rng, False) for _ in range(3)], [tile(rng, True)])]


@pytest.fixture(scope="module")
def test_split() -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(1)
    labels = [0, 1] * 4
    return [tile(rng, bool(y)) for y in labels], labels


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    """One torch thread (conftest): the loaded 2-core machine."""


def test_fedavg_of_two_clients_is_the_weighted_mean_of_their_states(clients, test_split) -> None:
    task = SupervisedTask(clients, SETTINGS, test=test_split)
    initial = task.initial_state()
    outcome = run_rounds(task, progress=False)
    answers = outcome.final_results
    assert list(answers) == ["client_0", "client_1"] and not outcome.missing
    # client 0: 5 good + 4 synthetic; client 1: 3 good + 1 real + 2 synthetic (its per-client count)
    assert [answers[n].examples[""] for n in answers] == [9, 6]
    assert set(outcome.state) == set(initial)
    changed = False
    for key, value in outcome.state.items():
        a, b = answers["client_0"].arrays[key].double(), answers["client_1"].arrays[key].double()
        torch.testing.assert_close(value.double(), (9 * a + 6 * b) / 15, rtol=1e-6, atol=1e-7)
        changed |= not torch.equal(a, b)
    assert changed  # the two clients trained on different data
    record = outcome.history[0]
    assert set(("ap", "precision", "recall", "f1", "auroc")) <= set(record)


def test_synthesis_runs_in_the_client_from_its_own_seed(clients) -> None:
    task = SupervisedTask(clients, SETTINGS)
    spec = json.loads(json.dumps(task.spec()))
    assert spec["clients"] == [{"good": 5, "defective": 0}, {"good": 3, "defective": 1}]
    assert len(json.dumps(spec)) < 2000  # settings and counts: no image travels from the server
    bare = task_from_spec(spec)  # the fixed registry of kinds
    assert isinstance(bare, SupervisedTask)
    with pytest.raises(FedinspectError, match="client_0: this process holds no images"):
        bare.client_update(0, bare.initial_state(), 1, {})
    # the ClientApp's side: the operator gives it the images; it draws the defects with the client's seed
    in_client = ClientImages(clients)(spec, {})
    first = in_client.training_set(0).synthetic
    assert len(first) == 4 and len(in_client.training_set(1).synthetic) == 2
    again = SupervisedTask(clients, SETTINGS).training_set(0).synthetic
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    expected = synthesize_in_client(clients[0].good, "cutpaste", 4, derived_seed(5, "client_0", "synthesis"))
    assert all(np.array_equal(a, b) for a, b in zip(first, expected, strict=True))
    assert not any(np.array_equal(a, g) for a in first for g in clients[0].good)  # a defect was drawn
    # two clients with the same good images draw different defects (their seeds differ)
    twins = [clients[0], clients[0]]
    same_images = SupervisedTask(twins, replace(SETTINGS, per_client={}))
    a, b = same_images.training_set(0).synthetic, same_images.training_set(1).synthetic
    assert not any(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # a ClientApp holding other images refuses the spec
    with pytest.raises(FedinspectError, match="other data"):
        ClientImages(twins)(spec, {})


class _BadClient(SupervisedTask):
    """client_1 answers with a malformed update."""

    fault = "nan"

    def client_update(self, index, state, round_number, memory):
        result = super().client_update(index, state, round_number, memory)
        if index != 1:
            return result
        arrays = dict(result.arrays)
        key = "head.weight"
        if self.fault == "nan":
            arrays[key] = torch.full_like(arrays[key], float("nan"))
        elif self.fault == "shape":
            arrays[key] = torch.zeros(1, 7)
        else:
            return ClientResult(arrays, {"": 1000}, result.metrics)
        return ClientResult(arrays, result.examples, result.metrics)


@pytest.mark.parametrize(("fault", "reason"), [("nan", "non-finite"), ("shape", r"expected torch.float32 \(1, "),
                                               ("count", "claims 1000 training images")])
def test_a_malformed_update_is_dropped_and_named(clients, fault, reason) -> None:
    task = _BadClient(clients, SETTINGS)
    task.fault = fault
    outcome = run_rounds(task, progress=False)
    assert [(m["client"], m["round"]) for m in outcome.missing] == [("client_1", 1)]
    assert re.search(reason, outcome.missing[0]["reason"]) and outcome.missing[0]["reason"].startswith("client_1")
    assert list(outcome.final_results) == ["client_0"]
    for key, value in outcome.state.items():  # the mean of one answer is that answer
        torch.testing.assert_close(value, outcome.final_results["client_0"].arrays[key])


def test_spec_round_trips_and_bad_specs_are_refused(clients) -> None:
    task = SupervisedTask(clients, SETTINGS)
    spec = task.spec()
    rebuilt = SupervisedTask.from_spec(json.loads(json.dumps(spec)), {})
    assert rebuilt.spec() == spec and rebuilt.settings == SETTINGS
    for key in rebuilt.initial_state():
        torch.testing.assert_close(rebuilt.initial_state()[key], task.initial_state()[key])
    with pytest.raises(FedinspectError, match="spec of kind"):
        SupervisedTask.from_spec({**spec, "kind": "meta"}, {})
    with pytest.raises(FedinspectError, match="description"):
        SupervisedTask.from_spec({**spec, "clients": [{"good": -1, "defective": 0}]}, {})
    with pytest.raises(FedinspectError, match="unknown supervised federation settings"):
        SupervisedTask.from_spec({**spec, "settings": {**spec["settings"], "data_dir": "/etc"}}, {})


def test_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="offline generator"):
        SupervisedFederationSettings(method="diffusion")
    with pytest.raises(SettingsError, match="cannot be federated"):
        SupervisedFederationSettings(backbone="resnet50")
    with pytest.raises(SettingsError, match="unknown keys"):
        SupervisedFederationSettings(per_client={"client_0": {"count": 3}})
    with pytest.raises(SettingsError, match="not a client"):
        SupervisedTask([ClientData([np.zeros((32, 32, 3), np.uint8)])], replace(SETTINGS))


def _write_category(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for folder, n, defect in (("train/good", 8, False), ("test/good", 6, False), ("test/hole", 8, True)):
        (root / folder).mkdir(parents=True)
        for index in range(n):
            image = tile(rng, defect)
            Image.fromarray(image).save(root / folder / f"{index:03d}.png")
            if defect:
                mask = (image[..., 0] == 20).astype(np.uint8) * 255
                (root / "ground_truth/hole").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth/hole" / f"{index:03d}_mask.png")
    return root


def test_comparison_runs_end_to_end_and_writes_its_json(tmp_path: Path) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from fedinspect.data.images import read_image
    from fedinspect.study.synthesis import load_study_data
    from fedinspect.supervised import SupervisedDetector

    category = _write_category(tmp_path / "tiles")
    fed = replace(SETTINGS, rounds=2, per_client={}, n_synthetic=3)
    settings = ComparisonSettings(federation=fed, clients=2, real_defects=True)
    results = compare_local_federated_centralized(category, tmp_path / "out", settings, progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["split"]["good_per_client"] == [4, 4]
    assert results["split"]["synthetic_per_client"] == [3, 3]
    assert sum(results["split"]["defective_per_client"]) == 4  # half of the 8 real defects, split
    assert results["split"]["test_good"] == 6 and results["split"]["test_defective"] == 4
    assert set(results["local_only"]["clients"]) == {"client_0", "client_1"}
    assert results["centralized"]["train_images"] == 8 + 4 + 6
    for setting in (results["local_only"]["mean"], results["federated"], results["centralized"]):
        assert all(0 <= setting[key] <= 1 for key in ("ap", "precision", "recall", "f1", "auroc"))
        assert setting["seconds"] > 0
    mean_ap = np.mean([c["ap"] for c in results["local_only"]["clients"].values()])
    assert results["local_only"]["mean"]["ap"] == pytest.approx(mean_ap)
    # the federation's global model is a SupervisedDetector folder; its scores are the reported ones (sklearn)
    federated = json.loads((tmp_path / "out" / "federated" / "results.json").read_text())
    assert len(federated["history"]) == 2 and federated["final"]["ap"] == results["federated"]["ap"]
    detector = SupervisedDetector.load(tmp_path / "out" / "federated" / "model")
    data = load_study_data(category, fed.seed, 0.5)
    probabilities = detector.predict_proba([read_image(s.image_path) for s in data.test])
    labels = [s.label for s in data.test]
    assert results["federated"]["ap"] == pytest.approx(average_precision_score(labels, probabilities), abs=1e-9)
    assert results["federated"]["auroc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-9)


@pytest.mark.slow
def test_flower_simulation_gives_the_in_process_numbers(clients, test_split, tmp_path: Path) -> None:
    from fedinspect.federation.supervised_task import run_federation

    settings = replace(SETTINGS, rounds=2)
    flower = run_federation(clients, tmp_path / "flower", settings, test=test_split, engine="flower-sim",
                            progress=False)
    local = run_federation(clients, tmp_path / "local", settings, test=test_split, engine="in-process",
                           progress=False)
    assert not flower.results_["missing_clients"] and flower.results_["engine"] == "flower-sim"
    for key, value in local.final_state_.items():
        torch.testing.assert_close(flower.final_state_[key], value, rtol=1e-6, atol=1e-7)
    assert flower.results_["final"]["ap"] == pytest.approx(local.results_["final"]["ap"], abs=1e-9)
    assert flower.results_["clients"][1]["examples"] == {"": 6}
