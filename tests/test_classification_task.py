"""Classification as a task of the shared round engine: spec, client round, evaluation, aggregation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinspect.classification import task as task_module
from fedinspect.classification.models import SmallCNN
from fedinspect.classification.runner import ClassifyConfig, build_model, client_seed, run_classification
from fedinspect.classification.task import ClassificationTask, checked_privacy_history
from fedinspect.classification.training import TrainSettings, epsilon_of, evaluate, train_local
from fedinspect.errors import FedinspectError
from fedinspect.federation.rounds import ClientResult, run_rounds, task_from_spec
from tests.conftest import save_png

DP = ClassifyConfig(model="cnn", clients=2, rounds=2, image_size=16, obfuscate=("shuffle",), obfuscation_key=4321,
                    train=TrainSettings(local_epochs=1, noise_multiplier=1.0))


def _write_category(root: Path) -> Path:
    """An MVTec-layout category of 24 x 24 px images: 10 + 4 good, 6 scratch, 6 dent."""
    rng = np.random.default_rng(1)
    for folder, count, kind in (("train/good", 10, "good"), ("test/good", 4, "good"), ("test/scratch", 6, "scratch"),
                                ("test/dent", 6, "dent")):
        for i in range(count):
            image = (90 + 20 * rng.random((24, 24))).astype(np.uint8)
            if kind == "scratch":
                image[11:13, 2:-2] = 230
            elif kind == "dent":
                image[6:14, 6:14] = 20
            save_png(root / folder / f"{i:03d}.png", np.repeat(image[..., None], 3, axis=2))
            if kind != "good":
                save_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", np.full((24, 24), 255, np.uint8))
    return root


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_category(tmp_path_factory.mktemp("task") / "tile")


def test_spec_rebuilds_the_task_and_keeps_the_key_out(category: Path) -> None:
    task = ClassificationTask(DP, category)
    spec = json.loads(json.dumps(task.spec()))
    assert spec["kind"] == "classify" and "4321" not in json.dumps(spec)
    assert task.secrets() == {"obfuscation_key": 4321}
    rebuilt = task_from_spec(spec, task.secrets())  # through the engine's registry, as a ClientApp does
    assert isinstance(rebuilt, ClassificationTask) and rebuilt.config == DP
    assert (rebuilt.rounds, rebuilt.n_clients) == (2, 2)
    assert [v.items for v in rebuilt.split.clients] == [v.items for v in task.split.clients]


@pytest.mark.parametrize(("spec", "secrets", "message"), [
    ({"kind": "detector"}, {}, "spec of kind 'detector'"),
    ({"kind": "classify", "data_dir": "x"}, {}, "'config' object"),
    ({"kind": "classify", "config": {"clients": 0}, "data_dir": "x"}, {}, "clients and rounds must be >= 1"),
    ({"kind": "classify", "config": {"nonsense": 1}, "data_dir": "x"}, {}, "invalid config"),
    ({"kind": "classify", "config": {}, "data_dir": "x"}, {"obfuscation_key": "1"}, "must be an integer"),
])
def test_a_bad_spec_is_refused(spec: dict, secrets: dict, message: str) -> None:
    with pytest.raises(FedinspectError, match=message):
        ClassificationTask.from_spec(spec, secrets)


def test_a_client_computes_its_own_inputs_only(category: Path, monkeypatch, one_torch_thread) -> None:
    seen = []
    original = task_module.model_inputs

    def spy(view, *args, **kwargs):
        seen.append(view)
        return original(view, *args, **kwargs)

    monkeypatch.setattr(task_module, "model_inputs", spy)
    server = ClassificationTask(DP, category)
    client = ClassificationTask.from_spec(server.spec(), server.secrets())
    client.client_update(1, server.initial_state(), 1, {})
    assert seen == [client.split.clients[1]]  # neither the test split nor client 0's share


def test_client_update_is_local_training_from_the_global_model(category: Path, one_torch_thread) -> None:
    task = ClassificationTask(DP, category)
    state = task.initial_state()
    first = task.client_update(0, state, 1, {})
    second = task.client_update(0, state, 2, first.memory)
    # the same by hand: the global model, the client's share, the seed of (seed, round, client)
    x, y = task.client_inputs(0)
    model = build_model(DP, 3, task.cache)
    model.load_state_dict(state)
    local = train_local(model, x, y, DP.train, seed=client_seed(DP.seed, 1, 0))
    assert all(torch.equal(first.arrays[k], local.state[k]) for k in local.state)
    n = len(task.split.clients[0].items)
    assert first.examples == {"": n} and first.metrics["train_loss"] == pytest.approx(local.train_loss)
    steps = DP.train.steps_per_epoch(n)
    assert first.memory["privacy_history"] == [[1.0, DP.train.sample_rate(n), steps]]
    assert second.memory["privacy_history"] == [[1.0, DP.train.sample_rate(n), 2 * steps]]  # cumulative
    epsilon = task.round_metrics(2, {"client_0": second})["epsilon"]["client_0"]
    assert epsilon == epsilon_of([(1.0, DP.train.sample_rate(n), 2 * steps)], 1e-5)


def test_one_round_is_fedavg_weighted_by_images_then_evaluated(category: Path, tmp_path: Path,
                                                                one_torch_thread) -> None:
    config = ClassifyConfig(model="cnn", clients=2, rounds=1, image_size=16, train=TrainSettings(local_epochs=1))
    task = ClassificationTask(config, category)
    state = task.initial_state()
    updates = [task.client_update(i, state, 1, {}) for i in range(2)]
    outcome = run_rounds(ClassificationTask(config, category), progress=False)
    weights = np.array([len(v.items) for v in task.split.clients], dtype=float)
    for key, value in outcome.state.items():
        if value.is_floating_point():
            stacked = np.stack([u.arrays[key].double().numpy() for u in updates])
            expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
            np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    record = outcome.history[0]
    model = build_model(config, 3, task.cache)
    model.load_state_dict(outcome.state)
    metrics = evaluate(model, *task.test_inputs(), 3)
    assert (record["accuracy"], record["loss"]) == (metrics["accuracy"], metrics["loss"])
    assert record["epsilon"] == {}  # no DP-SGD
    n_bytes = sum(t.numel() * t.element_size() for t in SmallCNN(3, 16).state_dict().values())
    assert record["bytes_per_client"] == {"client_0": n_bytes, "client_1": n_bytes}
    # a task that did not evaluate the final state itself (a fresh instance) evaluates it to conclude
    results = ClassificationTask(config, category, write_report=False).conclude(outcome, tmp_path, "in-process")
    assert (results["accuracy"], results["confusion_matrix"]) == (metrics["accuracy"], metrics["confusion_matrix"])
    assert json.loads((tmp_path / "results.json").read_text())["history"][0]["bytes_per_client"] == {
        "client_0": n_bytes, "client_1": n_bytes}


def test_a_malformed_privacy_history_is_refused_naming_the_client(category: Path) -> None:
    task = ClassificationTask(DP, category)
    answer = ClientResult({}, {"": 1}, {}, {"privacy_history": [[1.0, 0.5, 3], [1.0, 2.0, 1]]})
    with pytest.raises(FedinspectError, match=r"client_1: bad privacy history entry \[1.0, 2.0, 1\]"):
        task.round_metrics(1, {"client_1": answer})
    with pytest.raises(FedinspectError, match="client_0: privacy history must be a list"):
        task.round_metrics(1, {"client_0": ClientResult({}, {"": 1}, {}, {})})
    assert checked_privacy_history("c", [(0.5, 0.25, 4)]) == [[0.5, 0.25, 4]]
    for bad in ([[-1, 0.5, 1]], [[1, 0.5, 1.5]], [[1, 0.5]], [[1, 0.5, True]]):
        with pytest.raises(FedinspectError, match="c: bad privacy history"):
            checked_privacy_history("c", bad)


def test_a_client_with_a_corrupt_image_is_missing_and_the_run_goes_on(tmp_path: Path, one_torch_thread) -> None:
    root = _write_category(tmp_path / "tile")
    config = ClassifyConfig(model="cnn", clients=2, rounds=2, image_size=16, train=TrainSettings(local_epochs=1))
    broken = ClassificationTask(config, root).split.clients[1].items[0].path
    broken.write_bytes(b"not a png")
    results = run_classification(root, tmp_path / "run", config, progress=False)
    assert [(m["client"], m["round"]) for m in results["missing_clients"]] == [("client_1", 1), ("client_1", 2)]
    assert broken.name in results["missing_clients"][0]["reason"]
    assert [h["clients"] for h in results["history"]] == [1, 1]
    assert list(results["history"][0]["bytes_per_client"]) == ["client_0"]
    assert "client_1 in round 1" in (tmp_path / "run" / "report.md").read_text()
