from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedinspect.detectors.coreset import greedy_coreset
from fedinspect.federation.client import FederatedClient, RoundSettings, derived_seed
from fedinspect.federation.server import SHARED, FederatedServer, allocate
from fedinspect.federation.strategies import (
    CoresetSettings,
    client_weights,
    concatenate,
    diversity_preserving,
    federated_coreset,
    get_strategy,
)
from fedinspect.federation.update import CategoryUpdate, ClientUpdate, UpdateError


def make_update(rng: np.random.Generator, n: int, samples: int, dim: int = 8, loc: float = 0.0) -> CategoryUpdate:
    return CategoryUpdate(rng.normal(loc=loc, size=(n, dim)).astype(np.float32), samples, n * 10)


# ---------------------------------------------------------------- wire format
def test_update_roundtrip_at_each_precision() -> None:
    rng = np.random.default_rng(0)
    update = ClientUpdate("factory_a", {"pipe_clip": make_update(rng, 50, 7), "tank_screw": make_update(rng, 20, 3)})
    for precision, tolerance in (("float32", 0.0), ("float16", 2e-3), ("int8", 3e-2)):
        received = ClientUpdate.from_bytes(update.to_bytes(precision))
        assert received.client_id == "factory_a"
        for name, part in update.categories.items():
            got = received.categories[name]
            assert (got.n_samples, got.n_patches) == (part.n_samples, part.n_patches)
            scale = np.abs(part.embeddings).max()
            np.testing.assert_allclose(got.embeddings, part.embeddings, atol=tolerance * scale)


def test_lower_precision_sends_fewer_bytes() -> None:
    update = ClientUpdate("a", {"c": make_update(np.random.default_rng(1), 1000, 5, dim=152)})
    sizes = {p: len(update.to_bytes(p)) for p in ("float32", "float16", "int8")}
    assert sizes["float16"] < 0.55 * sizes["float32"] and sizes["int8"] < 0.6 * sizes["float16"]
    assert sizes["float32"] >= 1000 * 152 * 4  # every embedding is there


def test_corrupt_update_names_its_sender() -> None:
    payload = ClientUpdate("a", {"c": make_update(np.random.default_rng(2), 5, 1)}).to_bytes()
    with pytest.raises(UpdateError, match="client_7: corrupt update"):
        ClientUpdate.from_bytes(payload[: len(payload) // 2], source="client_7")
    with pytest.raises(UpdateError, match="client_7"):
        ClientUpdate.from_bytes(b"garbage!" * 4, source="client_7")


# ---------------------------------------------------------------- strategies
def test_client_weights_are_sample_shares() -> None:
    rng = np.random.default_rng(3)
    weights = client_weights([make_update(rng, 5, 30), make_update(rng, 5, 10)])
    np.testing.assert_allclose(weights, [0.75, 0.25])
    with pytest.raises(ValueError, match="positive total"):
        client_weights([make_update(rng, 5, 0)])


def test_concatenate_is_the_union() -> None:
    rng = np.random.default_rng(4)
    updates = [make_update(rng, 30, 3), make_update(rng, 12, 1)]
    bank = concatenate(updates, None)
    assert bank.shape == (42, 8)
    np.testing.assert_array_equal(bank[:30], updates[0].embeddings)


def test_federated_coreset_hits_target_and_weights_clients() -> None:
    rng = np.random.default_rng(5)
    big = make_update(rng, 400, 300, loc=-5.0)
    small = make_update(rng, 400, 100, loc=5.0)
    settings = CoresetSettings(projection_dim=0)
    bank = federated_coreset([big, small], 60, settings)
    assert bank.shape == (60, 8)
    # oversampling: each client contributes at most 2x its weighted share to the pool
    from_small = int((bank[:, 0] > 0).sum())
    assert 0 < from_small <= int(np.ceil(2 * 0.25 * 60))
    # equivalent to: draw 2x shares by greedy within each client, then global greedy
    pool = np.concatenate([
        big.embeddings[greedy_coreset(big.embeddings, 90, 0, settings.seed + 0)],
        small.embeddings[greedy_coreset(small.embeddings, 30, 0, settings.seed + 1)],
    ])
    expected = pool[greedy_coreset(pool, 60, 0, settings.seed + 10_007)]
    np.testing.assert_array_equal(bank, expected)


def test_diversity_preserving_guarantees_every_client() -> None:
    rng = np.random.default_rng(6)
    updates = [make_update(rng, 500, 500, loc=0.0), make_update(rng, 500, 500, loc=0.3),
               make_update(rng, 200, 5, loc=20.0)]
    settings = CoresetSettings(projection_dim=0)
    bank = diversity_preserving(updates, 150, settings, min_per_client=20)
    assert bank.shape == (150, 8)
    tiny_client_rows = int((bank[:, 0] > 10).sum())
    assert tiny_client_rows >= 20  # its guaranteed share survives the global coreset
    plain = federated_coreset(updates, 150, settings)
    assert tiny_client_rows >= int((plain[:, 0] > 10).sum())


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="available"):
        get_strategy("fedavg")


# ---------------------------------------------------------------- server
def test_allocate_is_proportional_and_exact() -> None:
    assert allocate(10, [1, 1]) == [5, 5]
    assert allocate(10, [3, 1]) == [8, 2] or allocate(10, [3, 1]) == [7, 3]
    sizes = allocate(10_000, [298_508 * w for w in (0.19, 0.13, 0.12, 0.21, 0.11, 0.24)])
    assert sum(sizes) == 10_000
    assert allocate(3, [1000, 1, 1]) == [1, 1, 1]
    with pytest.raises(ValueError):
        allocate(2, [1, 1, 1])


def test_server_per_category_and_shared_banks() -> None:
    rng = np.random.default_rng(7)
    updates = [ClientUpdate(f"c{i}", {"a": make_update(rng, 100, 10), "b": make_update(rng, 50, 5)})
               for i in range(3)]
    banks = FederatedServer(global_size=90, coreset=CoresetSettings(projection_dim=0)).aggregate(updates)
    assert set(banks) == {"a", "b"}
    # targets follow the raw patch counts: a has twice b's patches
    assert (len(banks["a"]), len(banks["b"])) == (60, 30)
    shared = FederatedServer(global_size=90, bank="shared").aggregate(updates)
    assert set(shared) == {SHARED} and len(shared[SHARED]) == 90
    ratio = FederatedServer(global_ratio=0.01, strategy="concatenate").aggregate(updates)
    assert len(ratio["a"]) == 300  # concatenate ignores the target
    with pytest.raises(ValueError, match="bank"):
        FederatedServer(bank="per_client")
    with pytest.raises(ValueError, match="no client update"):
        FederatedServer().aggregate([])


# ---------------------------------------------------------------- client
def test_client_update_holds_only_coreset_embeddings(mvtec_category: Path) -> None:
    images = {"widget": sorted((mvtec_category / "train" / "good").glob("*.png"))}
    settings = RoundSettings(image_size=48, local_coreset_ratio=0.25)
    update, stats = FederatedClient("client_0", images).fit(settings)
    part = update.categories["widget"]
    assert part.n_samples == 3 and part.n_patches == 3 * 6 * 8
    assert len(part.embeddings) == round(0.25 * part.n_patches)
    assert stats.feature_extraction_s > 0
    again, _ = FederatedClient("client_0", images).fit(settings)
    np.testing.assert_array_equal(again.categories["widget"].embeddings, part.embeddings)
    other, _ = FederatedClient("client_1", images).fit(settings)
    assert not np.array_equal(other.categories["widget"].embeddings, part.embeddings)


def test_derived_seed_is_stable() -> None:
    assert derived_seed(0, "client_0", "pipe_clip") == derived_seed(0, "client_0", "pipe_clip")
    assert derived_seed(0, "client_0", "pipe_clip") != derived_seed(0, "client_1", "pipe_clip")
    assert RoundSettings.from_dict(RoundSettings(layers=("stride8",)).to_dict()).layers == ("stride8",)
    with pytest.raises(ValueError, match="unknown round settings"):
        RoundSettings.from_dict({"lr": 0.1})


# ---------------------------------------------------------------- runner
@pytest.mark.slow
def test_federate_on_tiny_data_writes_everything(tiny_dataset: Path, tmp_path: Path) -> None:
    from fedinspect.cli import main

    out = tmp_path / "run"
    assert main(["-q", "federate", "--data", str(tiny_dataset), "--out", str(out), "--clients", "3",
                 "--global-size", "500"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["categories"]) == {"engine_wiring", "pipe_clip", "pipe_staple", "tank_screw",
                                          "underbody_pipes", "underbody_screw"}
    assert len(results["clients"]) == 3 and sum(c["samples"] for c in results["clients"]) == 24
    assert sum(c["weight"] for c in results["clients"]) == pytest.approx(1.0)
    stages = results["stages"]
    assert stages["raw_patches"] > stages["local_coreset"] >= stages["global_bank"] == 500
    assert sum(c["bytes_sent"] for c in results["clients"]) > 2 * stages["local_coreset"] * 152
    for block in (results, results["centralized"], results["shared_bank"]):
        assert set(block["mean"]["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
    assert {"feature_extraction_s", "local_coreset_s", "aggregation_s", "evaluation_s", "total_s"} <= set(
        results["timing"])
    maps = list((out / "maps").rglob("*.png"))
    assert len(maps) == 6 * 4
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    partition = json.loads((out / "partition.json").read_text())
    assert len(partition["items"]) == 24


@pytest.mark.slow
def test_same_seed_same_global_bank(tiny_dataset: Path, tmp_path: Path) -> None:
    from fedinspect.federation.runner import FederationConfig, run_federation

    config = FederationConfig(clients=2, global_size=2000, centralized=False, compare_shared=False,
                              write_maps=False)
    first = run_federation(tiny_dataset, tmp_path / "a", config, progress=False)
    second = run_federation(tiny_dataset, tmp_path / "b", config, progress=False)
    assert first["categories"] == second["categories"]


@pytest.fixture
def two_category_dataset(tmp_path: Path) -> Path:
    from .conftest import save_png, textured_image

    rng = np.random.default_rng(11)
    root = tmp_path / "factory_data"
    for name in ("bolt", "nut"):
        for i in range(4):
            save_png(root / name / "train" / "good" / f"{i:03d}.png", textured_image(rng, 48, 64))
        save_png(root / name / "test" / "good" / "000.png", textured_image(rng, 48, 64))
        image = textured_image(rng, 48, 64)
        mask = np.zeros((48, 64), np.uint8)
        mask[10:20, 10:20] = 255
        image[mask > 0] = 255
        save_png(root / name / "test" / "dent" / "000.png", image)
        save_png(root / name / "ground_truth" / "dent" / "000_mask.png", mask)
    return root


def test_a_client_with_a_corrupt_image_drops_out_and_is_recorded(two_category_dataset: Path, tmp_path: Path,
                                                                  capsys) -> None:
    from fedinspect.errors import FedinspectError
    from fedinspect.federation.runner import FederationConfig, run_federation

    corrupt = two_category_dataset / "bolt" / "train" / "good" / "002.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    config = FederationConfig(clients=2, global_size=200, settings=RoundSettings(image_size=48))
    results = run_federation(two_category_dataset, tmp_path / "run", config, progress=False)
    assert len(results["missing_clients"]) == 1
    missing = results["missing_clients"][0]
    assert "002.png" in missing["reason"] and missing["client"].startswith("client_")
    assert len(results["clients"]) == 1
    assert "dropped out" in capsys.readouterr().err
    assert results["centralized"]["skipped_images"] == [str(corrupt)]
    assert set(results["categories"]) == {"bolt", "nut"}
    with pytest.raises(FedinspectError, match="only 1 of 2 clients answered"):
        run_federation(two_category_dataset, tmp_path / "run2",
                       FederationConfig(clients=2, min_clients=2, settings=RoundSettings(image_size=48)),
                       progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("obfuscation", ["", "shuffle"])
def test_streamed_category_scoring_equals_scoring_all_maps_at_once(tiny_dataset: Path, tmp_path: Path,
                                                                    obfuscation: str) -> None:
    """The federation scores a category one map at a time; everything it reports equals what the whole list of
    maps gives: metrics and curves, each client's share, the PNG maps and the report's examples."""
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.data.images import read_image
    from fedinspect.evaluation.anomaly_maps import read_map, score_range, write_maps
    from fedinspect.evaluation.protocol import score_with_curves
    from fedinspect.federation.client_evaluation import ClientEvaluation, client_test_shares
    from fedinspect.federation.runner import FederationConfig, _score_category, _test_grids
    from fedinspect.pipeline import load_ground_truth

    config = FederationConfig(settings=RoundSettings(obfuscation=obfuscation))
    dataset = CategoryDataset(tiny_dataset / "engine_wiring")
    detector = config.settings.detector().fit(config.settings.load(read_image(s.image_path)) for s in dataset.train)
    detector.batch_size = 3  # several batches of maps
    grids = _test_grids(dataset, detector, config, {})
    shapes, regions = load_ground_truth(dataset, progress=False)
    labels = np.array([s.label for s in dataset.test])
    assert 0 < labels.sum() < len(labels) and any(regions)

    scores, maps = detector.predict_embedded(grids)
    obfuscator = config.settings.obfuscator()
    if obfuscator is not None:
        maps = [obfuscator.restore_map(m, shape) for m, shape in zip(maps, shapes, strict=True)]
    expected, expected_curves = score_with_curves(labels, scores, maps, regions)
    shares = client_test_shares({"c": labels}, {"client_0": {"c": 2}, "client_1": {"c": 1}}, seed=0)
    per_client = ClientEvaluation(shares)
    entry, curves, chosen = _score_category(dataset, detector, grids, labels, regions, shapes, config,
                                            clients=per_client.stream("c"), maps_dir=tmp_path / "maps", examples=2)

    for key in ("image_auroc", "pixel_auroc", "auc_spro"):
        assert entry[key] == expected[key]
    for name in ("roc_fpr", "roc_tpr", "spro_fpr", "spro"):
        np.testing.assert_array_equal(getattr(curves, name), getattr(expected_curves, name))
    for client, indices in shares["c"].items():
        direct, _ = score_with_curves(labels[indices], scores[indices], [maps[i] for i in indices],
                                      [regions[i] for i in indices])
        got = per_client.results(client)["test_categories"]["c"]
        assert (got["image_auroc"], got["auc_spro"]) == (direct["image_auroc"], direct["auc_spro"])
    low, high = score_range(maps)
    assert entry["map_score_range"] == [low, high]
    write_maps([(tmp_path / "direct" / f"{i}.png", m) for i, m in enumerate(maps)], low, high)
    for i, sample in enumerate(dataset.test):
        assert np.array_equal(read_map(tmp_path / "maps" / sample.defect / f"{sample.stem}.png"),
                              read_map(tmp_path / "direct" / f"{i}.png"))
    order = np.argsort(-scores, kind="stable")
    wanted = [i for i in order if labels[i] == 1][:1] + [i for i in order if labels[i] == 0][:1]
    assert [example.name for example in chosen] == [dataset.test[i].stem for i in wanted]
    for example, i in zip(chosen, wanted, strict=True):
        assert example.score == scores[i] and np.array_equal(example.anomaly_map, maps[i])
