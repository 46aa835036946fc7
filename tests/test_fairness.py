"""Fairness metrics, per-client test shares and evaluation, and the fair_coreset strategy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedinspect.data.regions import Region
from fedinspect.evaluation.fairness import (
    coefficient_of_variation,
    fairness_summary,
    gap,
    jain_index,
    run_fairness,
    worst,
)
from fedinspect.evaluation.protocol import score_with_curves
from fedinspect.federation.client_evaluation import ClientEvaluation, apportion, client_test_shares
from fedinspect.federation.strategies import (
    CoresetSettings,
    fair_coreset,
    federated_coreset,
    get_strategy,
    tempered_weights,
)
from fedinspect.federation.update import CategoryUpdate


# ---------------------------------------------------------------- metrics on hand-made inputs
def test_jain_index_known_values() -> None:
    assert jain_index([0.7, 0.7, 0.7]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(1 / 4)
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / (3 * 14))  # (1+2+3)^2 / (3 (1+4+9))
    assert jain_index([0.0, 0.0]) == 1.0  # all equal
    assert math.isnan(jain_index([]))
    with pytest.raises(ValueError, match="non-negative"):
        jain_index([0.5, -0.1])


def test_coefficient_of_variation_population_and_sample() -> None:
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)  # population std 1, mean 2
    assert coefficient_of_variation([1.0, 3.0], ddof=1) == pytest.approx(math.sqrt(2) / 2)
    assert coefficient_of_variation([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0 / 5.0)
    assert coefficient_of_variation([0.4]) == 0.0
    assert math.isnan(coefficient_of_variation([0.4], ddof=1))
    assert math.isnan(coefficient_of_variation([-1.0, 1.0]))  # zero mean
    with pytest.raises(ValueError, match="ddof"):
        coefficient_of_variation([1.0], ddof=2)


def test_worst_and_gap_ignore_undefined_values() -> None:
    values = [0.9, None, float("nan"), 0.6, 0.8]
    assert worst(values) == 0.6
    assert gap(values) == pytest.approx(0.3)
    assert math.isnan(worst([None, float("nan")]))
    assert gap([0.5]) == 0.0


def test_fairness_summary_is_json_safe_and_names_the_worst() -> None:
    summary = fairness_summary({"client_0": 0.9, "client_1": None, "client_2": 0.5})
    assert summary["worst"] == 0.5 and summary["best"] == 0.9 and summary["gap"] == pytest.approx(0.4)
    assert summary["worst_of"] == "client_2" and summary["best_of"] == "client_0"
    assert (summary["n"], summary["n_undefined"]) == (2, 1)
    assert summary["jain"] == pytest.approx(1.4 ** 2 / (2 * (0.81 + 0.25)))
    empty = fairness_summary([None])
    assert empty["worst"] is None and empty["jain"] is None and empty["n"] == 0
    json.dumps(empty, allow_nan=False)  # no NaN in results.json


def test_run_fairness_block_over_clients_and_categories() -> None:
    categories = {"a": {"image_auroc": 1.0, "auc_spro": {"0.05": 0.8}}, "b": {"image_auroc": 0.5, "auc_spro": None}}
    clients = [{"client": "client_0", "image_auroc": 0.75, "auc_spro": {"0.05": 0.4}},
               {"client": "client_1", "image_auroc": None, "auc_spro": {"0.05": None}}]
    block = run_fairness(categories, clients, limits=[0.05])
    assert block["image_auroc"]["categories"]["worst_of"] == "b"
    assert block["image_auroc"]["clients"]["n_undefined"] == 1
    assert block["auc_spro"]["0.05"]["categories"]["worst"] == 0.8
    assert block["auc_spro"]["0.05"]["clients"]["worst_of"] == "client_0"


# ---------------------------------------------------------------- test shares
def test_apportion_is_proportional_and_exact() -> None:
    np.testing.assert_array_equal(apportion(10, [3, 1, 1], [0, 1, 2]), [6, 2, 2])
    np.testing.assert_array_equal(apportion(2, [1, 1, 1, 1], [3, 2, 1, 0]), [0, 0, 1, 1])  # ties by priority
    assert apportion(7, [0.2, 0.5, 0.3], [0, 1, 2]).sum() == 7
    with pytest.raises(ValueError, match="positive sum"):
        apportion(3, [0, 0], [0, 1])


def test_test_shares_follow_the_training_shares() -> None:
    labels = {"a": [0] * 6 + [1] * 6, "b": [0] * 4 + [1] * 4, "c": [0, 1]}
    training = {"client_0": {"a": 10}, "client_1": {"b": 3, "a": 10}, "client_2": {"b": 1}}
    shares = client_test_shares(labels, training, seed=3)
    assert "c" not in shares  # nobody holds category c
    assert set(shares["a"]) == {"client_0", "client_1"}
    for category, per_client in shares.items():  # every test image exactly once
        indices = sorted(i for idx in per_client.values() for i in idx)
        assert indices == list(range(len(labels[category])))
    # a: equal training shares -> 3 good + 3 defective each (stratified)
    for client in ("client_0", "client_1"):
        share = np.asarray(labels["a"])[shares["a"][client]]
        assert (share == 0).sum() == 3 and (share == 1).sum() == 3
    # b: 3:1 -> 3 good + 3 defective for client_1, 1 + 1 for client_2
    assert len(shares["b"]["client_1"]) == 6 and len(shares["b"]["client_2"]) == 2
    assert client_test_shares(labels, training, seed=3) == shares  # deterministic
    assert client_test_shares(labels, training, seed=4) != shares  # and seeded


def _region(mask: np.ndarray) -> Region:
    return Region(mask=mask, saturation_area=int(mask.sum()))


def _fake_category(rng: np.random.Generator, n_good: int, n_bad: int):
    labels = np.array([0] * n_good + [1] * n_bad)
    maps, regions = [], []
    for label in labels:
        anomaly_map = rng.random((12, 12)).astype(np.float32)
        if label:
            mask = np.zeros((12, 12), dtype=bool)
            mask[2:6, 3:8] = True
            anomaly_map[mask] += rng.random()
            regions.append([_region(mask)])
        else:
            regions.append([])
        maps.append(anomaly_map)
    scores = np.array([m.max() for m in maps])
    return labels, scores, maps, regions


def test_client_evaluation_equals_scoring_the_subset_directly() -> None:
    rng = np.random.default_rng(0)
    labels, scores, maps, regions = _fake_category(rng, 6, 6)
    shares = client_test_shares({"a": labels}, {"client_0": {"a": 2}, "client_1": {"a": 1}}, seed=0)
    evaluation = ClientEvaluation(shares)
    evaluation.add_category("a", labels, scores, maps, regions)
    for client, indices in shares["a"].items():
        direct, _ = score_with_curves(labels[indices], scores[indices], [maps[i] for i in indices],
                                      [regions[i] for i in indices])
        got = evaluation.results(client)
        assert got["image_auroc"] == pytest.approx(direct["image_auroc"])
        assert got["auc_spro"] == pytest.approx(direct["auc_spro"])
        assert got["test_counts"]["test"] == len(indices)


def test_single_class_share_gets_no_auroc_and_a_reason() -> None:
    rng = np.random.default_rng(1)
    labels, scores, maps, regions = _fake_category(rng, 2, 1)
    shares = {"a": {"client_0": [0, 1], "client_1": [2]}}
    evaluation = ClientEvaluation(shares)
    evaluation.add_category("a", labels, scores, maps, regions)
    rows = [{"client": "client_0"}, {"client": "client_1"}]
    evaluation.attach(rows)
    assert rows[0]["image_auroc"] is None and "only 2 good" in rows[0]["notes"]["image_auroc"]
    assert rows[1]["image_auroc"] is None and "only 1 defective" in rows[1]["notes"]["image_auroc"]
    assert rows[0]["auc_spro"]["0.05"] is None and rows[1]["auc_spro"]["0.05"] is not None
    fairness = run_fairness({}, rows)
    assert fairness["image_auroc"]["clients"]["n_undefined"] == 2


# ---------------------------------------------------------------- fair_coreset
def _update(rng: np.random.Generator, n: int, samples: int, loc: float) -> CategoryUpdate:
    return CategoryUpdate(rng.normal(loc=loc, size=(n, 6)).astype(np.float32), samples, n * 10)


def test_tempered_weights_flatten_sample_shares() -> None:
    rng = np.random.default_rng(2)
    updates = [_update(rng, 5, 400, 0), _update(rng, 5, 100, 0), _update(rng, 5, 0, 0)]
    np.testing.assert_allclose(tempered_weights(updates, 1.0), [0.8, 0.2, 0.0])
    np.testing.assert_allclose(tempered_weights(updates, 0.5), [2 / 3, 1 / 3, 0.0])  # 4x the images, 2x the weight
    np.testing.assert_allclose(tempered_weights(updates, 0.0), [0.5, 0.5, 0.0])  # no images, no weight
    with pytest.raises(ValueError, match="power"):
        tempered_weights(updates, 1.5)


def test_fair_coreset_reduces_to_federated_coreset() -> None:
    rng = np.random.default_rng(3)
    updates = [_update(rng, 300, 90, -2.0), _update(rng, 120, 10, 3.0)]
    settings = CoresetSettings(projection_dim=0)
    np.testing.assert_array_equal(fair_coreset(updates, 50, settings, power=1.0, floor=0.0),
                                  federated_coreset(updates, 50, settings))
    assert get_strategy("fair_coreset") is fair_coreset


def test_fair_coreset_guarantees_every_client_its_floor() -> None:
    rng = np.random.default_rng(4)
    # one big client and three small ones in a tight cluster that greedy k-center would mostly skip
    updates = [_update(rng, 600, 400, 0.0)] + [
        CategoryUpdate((rng.normal(size=(40, 6)) * 0.01 + 0.5).astype(np.float32), 4, 400) for _ in range(3)]
    settings = CoresetSettings(projection_dim=0)
    target, floor = 80, 0.5
    bank = fair_coreset(updates, target, settings, floor=floor)
    assert len(bank) == target
    guarantee = math.floor(floor * target / len(updates))

    def kept_from(update: CategoryUpdate, bank: np.ndarray) -> int:
        rows = {row.tobytes() for row in update.embeddings}
        return sum(row.tobytes() in rows for row in bank)

    for update in updates:
        assert kept_from(update, bank) >= guarantee
    baseline = federated_coreset(updates, target, settings)
    small_fair = sum(kept_from(u, bank) for u in updates[1:])
    small_base = sum(kept_from(u, baseline) for u in updates[1:])
    assert small_fair > small_base  # the small clients get more of the bank than under federated_coreset


def test_fair_coreset_rejects_bad_parameters() -> None:
    updates = [_update(np.random.default_rng(5), 10, 3, 0)]
    with pytest.raises(ValueError, match="floor"):
        fair_coreset(updates, 5, floor=2.0)


# ---------------------------------------------------------------- end to end on the tiny data
def test_federated_run_has_per_client_metrics_and_fairness(tiny_dataset, tmp_path) -> None:
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig, run_federation

    config = FederationConfig(clients=3, partition="category", strategy="fair_coreset", global_ratio=0.05,
                              centralized=False, compare_shared=False, write_maps=False, examples_per_category=0,
                              settings=RoundSettings(image_size=64))
    results = run_federation(tiny_dataset, tmp_path / "run", config, progress=False)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["fairness"] == results["fairness"]
    held = {}
    for client in results["clients"]:
        assert set(client["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
        assert "image_auroc" in client
        # category partition: a client's share is the whole test split of its categories, so its
        # per-category metrics are the run's per-category metrics
        assert set(client["test_categories"]) == set(client["categories"])
        for name, entry in client["test_categories"].items():
            assert entry["image_auroc"] == pytest.approx(results["categories"][name]["image_auroc"])
            assert entry["auc_spro"] == pytest.approx(results["categories"][name]["auc_spro"])
            held[name] = client["client"]
    assert set(held) == set(results["categories"])
    for metric in ("image_auroc",):
        for over in ("clients", "categories"):
            assert set(results["fairness"][metric][over]) >= {"worst", "gap", "cv", "jain"}
    assert set(results["fairness"]["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Results per client" in report and "Jain" in report
    assert (tmp_path / "run" / "figures" / "metrics_per_client.png").is_file()
