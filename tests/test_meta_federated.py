"""Federated meta-learning: one client equals centralized MAML, FedAvg by hand, refused updates, the spec, Flower,
and the federated-against-centralized comparison on tiny generated tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.rounds import ClientResult, run_rounds, task_from_spec
from fedinspect.meta.federated import (
    WEIGHTS_FILE,
    ClientTasks,
    MetaFederationSettings,
    MetaLearningTask,
    client_seed,
    compare_federated_centralized,
    initial_meta_state,
    load_meta_state,
    run_federation,
)
from fedinspect.meta.maml import meta_train
from fedinspect.meta.tasks import MetaTask, TaskImages, sample_episode, split_task

SIZE = 32


def blob_task(name: str, n_good: int = 10, n_defective: int = 8, seed: int = 0, level: int = 100) -> TaskImages:
    """A product drawn here: good images are noisy flat grey ``level``; a defective one has a bright 6x6 square."""
    rng = np.random.default_rng(seed)
    n = n_good + n_defective
    images = np.clip(rng.normal(level, 6, size=(n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    for i in range(n_good, n):
        y, x = rng.integers(0, SIZE - 6, size=2)
        images[i, y:y + 6, x:x + 6] = 230
    task = MetaTask(name, "folder", Path(f"/nowhere/{name}"),
                    tuple(Path(f"/nowhere/{name}/good/{i}.png") for i in range(n_good)),
                    tuple(Path(f"/nowhere/{name}/bad/{i}.png") for i in range(n_defective)))
    return TaskImages(task, images, task.labels)


def settings(**changes) -> MetaFederationSettings:
    base = dict(image_size=SIZE, width=8, n_support=8, n_query=4, inner_lr=0.05, outer_lr=0.01, rounds=1,
                local_steps=2, shots=12, fine_tune_epochs=3, fine_tune_patience=None)
    return MetaFederationSettings(**(base | changes))


@pytest.fixture(scope="module")
def products() -> dict[str, TaskImages]:
    return {name: blob_task(name, seed=i, level=60 + 30 * i) for i, name in enumerate(["a", "b", "c"])}


def states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0)


@pytest.mark.parametrize("first_order", [True, False])
def test_one_client_one_round_is_centralized_meta_training(products, first_order, one_torch_thread) -> None:
    k = 3
    config = settings(local_steps=k, first_order=first_order)
    own = [products["a"], products["b"]]
    outcome = run_rounds(MetaLearningTask([own], config), progress=False)

    # centralized MAML on the same tasks, same initial weights and episode seed (a sampler written out here)
    splits = [split_task(t, config.seed) for t in own]
    model = load_meta_state(config.build_model(), initial_meta_state(config), "initial weights")
    central = meta_train(model, lambda rng: [sample_episode(s, rng, 8, 4, "nearest") for s in splits],
                         meta_steps=k + 1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, betas=(0.5, 0.999),
                         first_order=first_order, patience=None, seed=client_seed(config.seed, 0, 1), progress=False)
    record = outcome.history[0]
    assert record["client_query_loss"]["client_0"] == pytest.approx(central.history[0], abs=1e-6)
    assert record["train_loss"] == pytest.approx(np.mean(central.history[:k]), abs=1e-6)
    # meta_train keeps its lowest-loss weights; the loss fell at every step, so they are those after k updates
    assert central.best_step == k, central.history
    states_close(outcome.state, {name: p.detach() for name, p in model.named_parameters()})


@pytest.mark.parametrize("weighting", ["tasks", "images"])
def test_fedavg_of_two_clients_is_their_weighted_mean(products, weighting, one_torch_thread) -> None:
    small = blob_task("small", n_good=6, n_defective=4, seed=7)
    clients = [[products["a"]], [products["b"], small]]
    task = MetaLearningTask(clients, settings(weighting=weighting))
    outcome = run_rounds(task, progress=False)
    start = task.initial_state()
    first, second = task.client_update(0, start, 1, {}), task.client_update(1, start, 1, {})
    w1, w2 = (1, 2) if weighting == "tasks" else (18, 18 + 10)
    assert (first.examples, second.examples) == ({"": w1}, {"": w2})
    by_hand = {key: (w1 * first.arrays[key].double() + w2 * second.arrays[key].double()) / (w1 + w2)
               for key in start}
    states_close(outcome.state, {k: v.float() for k, v in by_hand.items()})
    assert not torch.equal(first.arrays["head.weight"], second.arrays["head.weight"])  # the clients did differ
    record = outcome.history[0]
    assert set(record["client_query_loss"]) == {"client_0", "client_1"}
    assert set(record["tasks"]) == {"a", "b", "small"} and 0 <= record["query_auroc"] <= 1


class Faulty(MetaLearningTask):
    """Client 1 sends NaN, client 2 an array of the wrong shape; client 0 is honest."""

    def client_update(self, index, state, round_number, memory):
        result = super().client_update(index, state, round_number, memory)
        if index == 1:
            result.arrays["head.bias"] = torch.full_like(result.arrays["head.bias"], float("nan"))
        if index == 2:
            result.arrays["head.weight"] = torch.zeros(3, 3)
        return result


def test_nan_or_misshapen_updates_are_dropped_naming_the_client(products, one_torch_thread, capsys) -> None:
    task = Faulty([[products["a"]], [products["b"]], [products["c"]]], settings(local_steps=1))
    outcome = run_rounds(task, progress=False)
    reasons = {m["client"]: m["reason"] for m in outcome.missing}
    assert reasons == {"client_1": "client_1: head.bias holds non-finite values",
                       "client_2": "client_2: head.weight is torch.float32 (3, 3), expected torch.float32 (1, 8)"}
    honest = MetaLearningTask([[products["a"]], [products["b"]], [products["c"]]], settings(local_steps=1))
    states_close(outcome.state, honest.client_update(0, honest.initial_state(), 1, {}).arrays)  # client_0 alone
    # a client claiming more tasks than it holds, to weigh more, is refused too
    good = honest.client_update(0, honest.initial_state(), 1, {})
    with pytest.raises(FedinspectError, match=r"client_0: claims a weight of 5, its tasks count is 1"):
        honest.check_update("client_0", ClientResult(good.arrays, {"": 5}, good.metrics), honest.initial_state())


def test_spec_round_trips_and_carries_no_path(products) -> None:
    clients = [[products["a"]], [products["b"], products["c"]]]
    task = MetaLearningTask(clients, settings(first_order=False, meta_batch=1))
    spec = json.loads(json.dumps(task.spec()))
    assert "/nowhere" not in json.dumps(spec)
    assert spec["clients"] == [[{"name": "a", "good": 10, "defective": 8}],
                               [{"name": "b", "good": 10, "defective": 8}, {"name": "c", "good": 10, "defective": 8}]]
    rebuilt = task_from_spec(spec)  # through the registry of kinds, as a ClientApp does
    assert isinstance(rebuilt, MetaLearningTask) and rebuilt.spec() == task.spec()
    assert rebuilt.settings == task.settings and rebuilt.n_clients == 2
    with pytest.raises(FedinspectError, match=r"client_1: this process holds no images of its tasks \(b, c\)"):
        rebuilt.client_update(1, rebuilt.initial_state(), 1, {})
    on_node = ClientTasks([list(c) for c in clients])(spec, {})
    assert on_node.client_splits(1)[1].name == "c"
    with pytest.raises(FedinspectError, match="describes other tasks"):
        ClientTasks([[products["a"]], [products["b"]]])(spec, {})
    with pytest.raises(SettingsError, match="unknown setting"):
        MetaLearningTask.from_spec({**spec, "settings": {**spec["settings"], "data_dir": "/etc"}}, {})
    with pytest.raises(FedinspectError, match="malformed task description"):
        MetaLearningTask.from_spec({**spec, "clients": [[{"name": "a", "good": -1, "defective": 2}]]}, {})


@pytest.mark.slow
def test_flower_simulation_gives_the_in_process_numbers(products, tmp_path: Path) -> None:
    clients = [[products["a"]], [products["b"], products["c"]]]
    config = settings()
    flower = run_federation(clients, tmp_path / "flower", config, engine="flower-sim", progress=False)
    local = run_federation(clients, tmp_path / "local", config, engine="in-process", progress=False)
    states_close(flower.final_state_, local.final_state_)
    got, want = flower.results_["history"][0], local.results_["history"][0]
    assert got["query_loss"] == pytest.approx(want["query_loss"], abs=1e-6)
    assert got["client_query_loss"] == pytest.approx(want["client_query_loss"], abs=1e-6)
    assert flower.results_["engine"] == "flower-sim" and (tmp_path / "flower" / WEIGHTS_FILE).is_file()


def test_comparison_runs_end_to_end_and_writes_its_json(products, tmp_path: Path, one_torch_thread) -> None:
    target = blob_task("new", n_good=20, n_defective=14, seed=11, level=140)
    clients = [[products["a"]], [products["b"], products["c"]]]
    results = compare_federated_centralized(clients, target, settings(rounds=2), tmp_path / "cmp")
    written = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert written["difference_points"] == pytest.approx(results["difference_points"])
    assert results["difference_points"] == pytest.approx(
        100 * (results["federated"]["auroc"] - results["centralized"]["auroc"]))
    assert results["within_target"] == (results["difference_points"] >= -2)
    assert results["meta_steps"] == 4 and len(results["centralized"]["query_loss"]) == 4
    assert results["target"]["fit"] + results["target"]["validation"] == 12  # the shots, and only those
    assert results["target"]["test"] == 6 + 4  # the 30% share of 20 good and 14 defective
    for name in ("centralized", "federated", "random_init"):
        assert 0 <= results[name]["auroc"] <= 1 and results[name]["epochs_run"] == 3
    assert (tmp_path / "cmp" / "in-process" / WEIGHTS_FILE).is_file()
    with pytest.raises(ValueError, match="appears 2 times"):  # the new product may not be one of the clients'
        compare_federated_centralized([[products["a"]], [target]], target, settings(), tmp_path / "bad")
