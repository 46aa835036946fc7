"""Poisoning attacks by f of n clients, and the robust strategy that screens them out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedinspect.federation.client import RoundSettings
from fedinspect.federation.poisoning import (
    DEFAULT_STRENGTH,
    DefectSource,
    Poisoning,
    add_noise,
    mix_in_defects,
    scale_embeddings,
)
from fedinspect.federation.strategies import (
    STRATEGIES,
    CoresetSettings,
    federated_coreset,
    leave_one_out_scores,
    robust_coreset,
    screen_updates,
)
from fedinspect.federation.update import CategoryUpdate, ClientUpdate

DIM = 16
SETTINGS = CoresetSettings(projection_dim=8, seed=0)


def normal_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    """'Normal' patch embeddings: a mixture of 8 clusters every honest client samples from."""
    centres = np.random.default_rng(123).normal(scale=3.0, size=(8, DIM))
    labels = rng.integers(8, size=count)
    return (centres[labels] + rng.normal(scale=0.5, size=(count, DIM))).astype(np.float32)


def honest_clients(count: int = 5, rows: int = 200, seed: int = 0) -> list[CategoryUpdate]:
    rng = np.random.default_rng(seed)
    return [CategoryUpdate(normal_rows(rng, rows), n_samples=10, n_patches=10 * rows) for _ in range(count)]


def client_update(client: str, seed: int = 0) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    update = ClientUpdate(client)
    for category in ("bolt", "nut"):
        update.categories[category] = CategoryUpdate(normal_rows(rng, 50), n_samples=5, n_patches=500)
    return update


class FixedDefects(DefectSource):
    """The attacker's defect rows, given by the test instead of embedded from images."""

    def __init__(self, rows: np.ndarray) -> None:
        super().__init__({}, detector=None, settings=None)  # type: ignore[arg-type]
        self.fixed = rows
        self.asked: list[tuple[str, int]] = []

    def rows(self, category: str, count: int) -> np.ndarray:
        self.asked.append((category, count))
        return self.fixed[:count]


# ---------------------------------------------------------------------- attacks


def test_noise_has_the_asked_spread_relative_to_the_embeddings_own() -> None:
    rng = np.random.default_rng(0)
    spread = np.linspace(0.5, 4.0, DIM)
    part = CategoryUpdate((rng.normal(size=(4000, DIM)) * spread).astype(np.float32), 7, 9000)
    noisy = add_noise(part, 2.0, seed=1)
    added = noisy.embeddings - part.embeddings
    np.testing.assert_allclose(added.std(axis=0), 2.0 * part.embeddings.std(axis=0), rtol=0.06)
    assert np.abs(added.mean(axis=0)).max() < 0.2 * spread.max()
    assert (noisy.n_samples, noisy.n_patches) == (7, 9000) and noisy.embeddings.dtype == np.float32
    np.testing.assert_array_equal(add_noise(part, 2.0, seed=1).embeddings, noisy.embeddings)
    assert not np.array_equal(add_noise(part, 2.0, seed=2).embeddings, noisy.embeddings)


def test_scale_multiplies_every_embedding() -> None:
    part = CategoryUpdate(np.arange(12, dtype=np.float32).reshape(4, 3), 2, 40)
    scaled = scale_embeddings(part, -3.0)
    np.testing.assert_array_equal(scaled.embeddings, -3.0 * part.embeddings)
    assert (scaled.n_samples, scaled.n_patches) == (2, 40)


def test_defect_rows_replace_honest_rows_and_keep_the_counts() -> None:
    rng = np.random.default_rng(0)
    part = CategoryUpdate(normal_rows(rng, 40), 4, 1300)
    defects = np.arange(10 * DIM, dtype=np.float32).reshape(10, DIM) + 100
    poisoned = mix_in_defects(part, defects, seed=1)
    assert poisoned.embeddings.shape == part.embeddings.shape  # same rows, same counts: passes validation
    assert (poisoned.n_samples, poisoned.n_patches) == (4, 1300)
    is_defect = (poisoned.embeddings[:, None] == defects[None]).all(axis=2).any(axis=1)
    is_honest = (poisoned.embeddings[:, None] == part.embeddings[None]).all(axis=2).any(axis=1)
    assert is_defect.sum() == 10 and is_honest.sum() == 30 and (is_defect ^ is_honest).all()
    assert len(np.unique(poisoned.embeddings, axis=0)) == 40
    assert mix_in_defects(part, defects[:0], seed=1) is part


class KnownPatches(DefectSource):
    """A defect source whose patches are given (no images, no backbone)."""

    def __init__(self, patches: dict[str, np.ndarray]) -> None:
        super().__init__({}, detector=None, settings=RoundSettings(projection_dim=8))  # type: ignore[arg-type]
        self.known = patches

    def patches(self, category: str) -> np.ndarray:
        return self.known.get(category, np.zeros((0, 0), np.float32))


def test_defect_source_sends_the_defects_first() -> None:
    """Greedy selection of the defective images' patches takes the far-away (defect) patches first."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(12, DIM))
    defect = (40.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    source = KnownPatches({"bolt": np.concatenate([normal_rows(rng, 500), defect])})
    rows = source.rows("bolt", 12)
    assert (rows[:, None] == defect[None]).all(axis=2).any(axis=1).sum() >= 11
    assert source.rows("bolt", 12) is rows and len(source.rows("bolt", 10_000)) == 512
    assert len(source.rows("nut", 5)) == 0


def test_poisoned_clients_are_the_last_f_and_inactive_settings_change_nothing() -> None:
    assert Poisoning("noise", 2).poisoned(5) == [3, 4]
    assert Poisoning("scale", 5).poisoned(5) == [0, 1, 2, 3, 4]
    assert Poisoning("noise", 0).poisoned(5) == [] and Poisoning("", 3).poisoned(5) == []
    update = client_update("client_0")
    assert Poisoning("", 3).apply(update) is update
    assert Poisoning("noise").level == DEFAULT_STRENGTH["noise"] and Poisoning("scale", 1, 0.5).level == 0.5
    with pytest.raises(ValueError, match="exceeds the number of clients"):
        Poisoning("noise", 6).poisoned(5)


@pytest.mark.parametrize("attack", ["noise", "scale", "defects"])
def test_each_attack_changes_the_update_reproducibly_and_leaves_the_original(attack: str) -> None:
    update = client_update("client_4")
    before = {name: part.embeddings.copy() for name, part in update.categories.items()}
    far = np.full((3, DIM), 50.0, dtype=np.float32)
    poisoning = Poisoning(attack, clients=1, seed=7)
    first = poisoning.apply(update, FixedDefects(far))
    second = poisoning.apply(update, FixedDefects(far))
    for name, part in update.categories.items():
        np.testing.assert_array_equal(part.embeddings, before[name])  # the honest update is not modified
        sent = first.categories[name].embeddings
        assert sent.shape == part.embeddings.shape and not np.allclose(sent, part.embeddings, atol=0.1)
        if attack == "defects":  # 0.5 of 50 rows asked for, the 3 the attacker has sent
            assert (sent == 50.0).all(axis=1).sum() == 3
        np.testing.assert_array_equal(sent, second.categories[name].embeddings)
    assert first.client_id == "client_4"
    if attack == "noise":  # another seed, other noise; another client, other noise
        other_seed = Poisoning(attack, 1, seed=8).apply(update)
        assert not np.array_equal(other_seed.categories["bolt"].embeddings, first.categories["bolt"].embeddings)
        renamed = client_update("client_3")
        other_client = poisoning.apply(renamed)
        assert not np.array_equal(other_client.categories["bolt"].embeddings - renamed.categories["bolt"].embeddings,
                                  first.categories["bolt"].embeddings - update.categories["bolt"].embeddings)
    # the poisoned update still goes through the wire format's own checks
    parsed = ClientUpdate.from_bytes(first.to_bytes("float32"), source="client_4")
    np.testing.assert_array_equal(parsed.categories["nut"].embeddings, first.categories["nut"].embeddings)


def test_defects_attack_needs_a_source_and_asks_it_per_category() -> None:
    update = client_update("client_1")
    with pytest.raises(ValueError, match="DefectSource"):
        Poisoning("defects", 1).apply(update)
    source = FixedDefects(np.ones((2, DIM), np.float32))
    Poisoning("defects", 1, 0.5).apply(update, source)
    assert source.asked == [("bolt", 25), ("nut", 25)]


@pytest.mark.parametrize(("options", "message"), [
    ({"poison": "flood", "poisoned_clients": 1}, "poison must be one of"),
    ({"poison": "noise", "poisoned_clients": -1}, "poisoned_clients must be >= 0"),
    ({"poison": "noise", "poisoned_clients": 1, "poison_strength": -1.0}, "finite number >= 0"),
    ({"poison": "noise", "poisoned_clients": 1, "poison_strength": float("nan")}, "finite number >= 0"),
    ({"poison": "defects", "poisoned_clients": 1, "poison_strength": 2.0}, "fraction of rows replaced"),
    ({"poison": "scale", "poisoned_clients": 6, "clients": 5}, "exceeds the number of clients"),
])
def test_bad_poisoning_options_fail_when_the_config_is_made(options: dict, message: str) -> None:
    from fedinspect.federation.runner import FederationConfig

    with pytest.raises(ValueError, match=message):
        FederationConfig(**options)


def test_study_options_accept_the_poisoning_axes_and_the_robust_strategy() -> None:
    from fedinspect.study.config import build_config

    config = build_config({"poison": "defects", "poisoned_clients": 2, "poison_strength": 1,
                           "strategy": "robust_coreset"}, seed=3)
    assert (config.poison, config.poisoned_clients, config.poison_strength) == ("defects", 2, 1.0)
    assert config.poisoning() == Poisoning("defects", 2, 1.0, seed=3)
    assert config.to_dict()["poison"] == "defects" and config.to_dict()["poisoned_clients"] == 2
    with pytest.raises(ValueError, match="'poison' must be one of"):
        build_config({"poison": "flood"}, seed=0)
    assert STRATEGIES["robust_coreset"] is robust_coreset


# ---------------------------------------------------------------------- robust strategy


def test_leave_one_out_score_is_the_lower_median_of_the_distances_to_the_others() -> None:
    banks = [np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[3.0, 0.0]]), np.array([[0.0, 7.0]]),
             np.array([[0.0, -2.0]])]
    scores = leave_one_out_scores([CategoryUpdate(b.astype(np.float32), 1, 1) for b in banks])
    # client 0: distances 1, 3, 7, 2 to the others -> sorted 1, 2, 3, 7 -> 2nd smallest = 2
    assert scores[0][0] == pytest.approx(2.0)
    # client 2 at (3, 0): distances 3, 2, sqrt(58), sqrt(13) -> 2nd smallest = 3
    assert scores[2][0] == pytest.approx(3.0)


def test_robust_keeps_what_federated_coreset_keeps_on_clean_clients() -> None:
    updates = honest_clients()
    screening = screen_updates(updates)
    assert screening.dropped_clients == [] and screening.suspects == []
    assert screening.dropped_rows == [0, 0, 0, 0, 0]  # each client's rarest rows are outlying, but not suspect
    assert sum(s > screening.cut for scores in screening.row_scores for s in scores) > 0
    robust = robust_coreset(updates, 300, SETTINGS)
    plain = federated_coreset(updates, 300, SETTINGS)
    np.testing.assert_array_equal(robust, plain)


@pytest.mark.parametrize("attack", [Poisoning("noise", 1, 1.0), Poisoning("scale", 1, 10.0),
                                    Poisoning("scale", 1, 0.2), Poisoning("noise", 2, 1.0)])
def test_robust_drops_a_noise_or_scale_client(attack: Poisoning) -> None:
    updates = honest_clients()
    for i in attack.poisoned(5):
        wrapped = ClientUpdate(f"client_{i}", {"c": updates[i]})
        updates[i] = attack.apply(wrapped).categories["c"]
    screening = screen_updates(updates)
    assert screening.dropped_clients == attack.poisoned(5)
    honest = [i for i in range(5) if i not in attack.poisoned(5)]
    assert sum(screening.dropped_rows[i] for i in honest) <= 0.01 * 200 * len(honest)
    recorded: list = []
    bank = robust_coreset(updates, 300, SETTINGS, screening=recorded)
    assert recorded[0].dropped_clients == attack.poisoned(5)
    poisoned_rows = np.concatenate([updates[i].embeddings for i in attack.poisoned(5)])
    assert not (bank[:, None, :] == poisoned_rows[None, :, :]).all(axis=2).any()  # none of their rows kept


@pytest.mark.parametrize("poisoned", [[4], [3, 4]])
def test_robust_drops_far_rows_injected_by_one_or_two_colluding_clients(poisoned: list[int]) -> None:
    updates = honest_clients()
    far = (np.random.default_rng(5).normal(size=(20, DIM)) + 12.0).astype(np.float32)  # the same rows in each
    for i in poisoned:
        updates[i] = CategoryUpdate(np.concatenate([updates[i].embeddings, far]), 10, 2200)
    screening = screen_updates(updates)
    assert screening.suspects == poisoned and screening.dropped_clients == poisoned  # a suspect goes whole
    for i in range(5):
        if i in poisoned:
            assert not screening.kept[i].any(), f"client {i} kept rows"
        else:
            assert (~screening.kept[i]).sum() <= 2, f"client {i} lost honest rows"
    plain = federated_coreset(updates, 300, SETTINGS)
    robust = robust_coreset(updates, 300, SETTINGS)
    assert (np.linalg.norm(plain[:, None] - far[None], axis=2).min(axis=1) == 0).any()  # plain keeps them
    assert np.linalg.norm(robust[:, None] - far[None], axis=2).min() > 1.0  # robust does not


@pytest.mark.parametrize("count", [1, 2])
def test_robust_keeps_everything_with_one_or_two_clients(count: int) -> None:
    updates = honest_clients(count)
    updates[-1] = scale_embeddings(updates[-1], 10.0)
    screening = screen_updates(updates)
    assert all(mask.all() for mask in screening.kept) and screening.dropped_clients == []
    assert "nothing to compare" in screening.note
    np.testing.assert_array_equal(robust_coreset(updates, 150, SETTINGS), federated_coreset(updates, 150, SETTINGS))


def test_screening_rejects_meaningless_thresholds() -> None:
    for threshold in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold must be positive"):
            screen_updates(honest_clients(), threshold=threshold)
    with pytest.raises(ValueError, match="suspicion at least 1"):
        screen_updates(honest_clients(), suspicion=0.5)


def test_a_client_without_rows_for_a_category_is_skipped() -> None:
    updates = honest_clients(4)
    updates.append(CategoryUpdate(np.zeros((0, DIM), np.float32), 0, 0))
    screening = screen_updates(updates)
    assert len(screening.kept[4]) == 0 and screening.dropped_clients == []
    assert sum(screening.dropped_rows) <= 0.01 * 800
    assert robust_coreset(updates, 200, SETTINGS).shape == (200, DIM)
    # with only two clients holding rows there is nothing to compare
    pair = [*honest_clients(2), CategoryUpdate(np.zeros((0, DIM), np.float32), 0, 0)]
    assert "nothing to compare" in screen_updates(pair).note


# ---------------------------------------------------------------------- in the runner


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MVTec-layout texture category with enough good images (25) for every client to hold several.

    (The synthetic ``tiny`` dataset has 4 training images per category: with 5 clients each holds at
    most one, and the clients' banks are too sparse to vouch for one another.) Defects are bright
    squares; the attacker's defect rows therefore come from exactly the kind of patch the test scores.
    """
    from .conftest import save_png, textured_image

    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("poisoning") / "data" / "tiles"
    for i in range(25):
        save_png(root / "train" / "good" / f"{i:03d}.png", textured_image(rng, 64, 64))
    for i in range(6):
        save_png(root / "test" / "good" / f"{i:03d}.png", textured_image(rng, 64, 64))
        image = textured_image(rng, 64, 64)
        mask = np.zeros((64, 64), np.uint8)
        top, left = rng.integers(4, 44, size=2)
        mask[top:top + 14, left:left + 14] = 255
        image[mask > 0] = 255
        save_png(root / "test" / "spot" / f"{i:03d}.png", image)
        save_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root.parent


def tiles_config(**options):
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig

    return FederationConfig(clients=5, global_size=100_000, centralized=False, compare_shared=False,
                            write_maps=False, settings=RoundSettings(image_size=64, local_coreset_ratio=0.25),
                            **options)


@pytest.fixture(scope="module")
def tiles_embeddings() -> tuple[dict, dict]:
    """Training and test embedding caches shared by the runs on ``tiles`` (the same feature settings)."""
    return {}, {}


@pytest.mark.parametrize("attack", ["noise", "scale", "defects"])
def test_runner_poisons_exactly_the_last_f_clients_reproducibly(tiles: Path, tiles_embeddings, attack: str) -> None:
    from fedinspect.federation.runner import PatchCoreTask, _payload

    cache = tiles_embeddings[0]

    def updates(config) -> list[ClientUpdate]:  # what every client sends (the engine's client_update)
        task = PatchCoreTask(tiles, config, cache=cache)
        return [ClientUpdate.from_bytes(_payload(task.client_update(i, {}, 1, {}))) for i in range(config.clients)]

    clean = updates(tiles_config())
    first = updates(tiles_config(poison=attack, poisoned_clients=2))
    again = updates(tiles_config(poison=attack, poisoned_clients=2))

    def sent(sent_updates: list[ClientUpdate]) -> list[CategoryUpdate]:
        return [update.categories["tiles"] for update in sent_updates]

    assert [u.client_id for u in first] == [f"client_{i}" for i in range(5)]
    changed = [not np.array_equal(p.embeddings, c.embeddings) for p, c in zip(sent(first), sent(clean), strict=True)]
    assert changed == [False, False, False, True, True]
    for p, q in zip(sent(first), sent(again), strict=True):
        np.testing.assert_array_equal(p.embeddings, q.embeddings)
    for p, c in zip(sent(first), sent(clean), strict=True):
        assert p.embeddings.shape == c.embeddings.shape and (p.n_samples, p.n_patches) == (c.n_samples, c.n_patches)


def test_defects_attack_hurts_federated_coreset_and_robust_coreset_recovers(tiles: Path, tiles_embeddings,
                                                                            tmp_path: Path) -> None:
    """The CI form of benchmarks/bench_poisoning.py: clean, then 1 and 2 of 5 clients sending defect rows."""
    from fedinspect.federation.runner import run_federation

    cache, test_cache = tiles_embeddings

    screenings: dict[str, dict] = {}

    def metrics(name: str, **options) -> tuple[float, float]:
        results = run_federation(tiles, tmp_path / name, tiles_config(**options), progress=False, cache=cache,
                                 test_cache=test_cache, report=False)
        assert results["config"]["poison"] == options.get("poison", "")
        assert results["config"]["poisoned_clients"] == options.get("poisoned_clients", 0)
        assert results["missing_clients"] == []  # the poisoned updates pass the server's validation
        assert ("screening" in results) == (options.get("strategy") == "robust_coreset")
        screenings[name] = results.get("screening", {}).get("tiles", {})
        return results["mean"]["image_auroc"], results["mean"]["auc_spro"]["0.05"]

    clean_auroc, clean_spro = metrics("clean")
    assert clean_auroc > 0.95 and clean_spro > 0.8
    robust_auroc, robust_spro = metrics("robust-clean", strategy="robust_coreset")
    assert robust_auroc >= clean_auroc - 0.03 and robust_spro >= clean_spro - 0.05
    for f in (1, 2):
        attack = {"poison": "defects", "poisoned_clients": f, "poison_strength": 1.0}
        attacked_auroc, attacked_spro = metrics(f"plain-{f}", **attack)
        defended_auroc, defended_spro = metrics(f"robust-{f}", strategy="robust_coreset", **attack)
        assert attacked_auroc < clean_auroc - 0.2 and attacked_spro < 0.5 * clean_spro, f"{f} client(s): no harm"
        assert defended_auroc >= clean_auroc - 0.05, f"{f} client(s): robust AUROC {defended_auroc} vs {clean_auroc}"
        assert defended_spro >= 0.8 * clean_spro, f"{f} client(s): robust sPRO {defended_spro} vs {clean_spro}"
        # results.json names the suspects, and the honest clients lose nothing
        poisoned = [f"client_{i}" for i in range(5 - f, 5)]
        assert screenings[f"robust-{f}"]["suspects"] == poisoned
        assert all(screenings[f"robust-{f}"]["dropped_rows"][c] == 0 for c in ("client_0", "client_1", "client_2"))
        assert all(screenings[f"robust-{f}"]["dropped_rows"][c] > 0 for c in poisoned)


def test_the_command_line_refuses_more_poisoned_clients_than_clients(tmp_path: Path, capsys) -> None:
    from fedinspect.cli import main

    base = ["-q", "federate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--clients", "3"]
    assert main([*base, "--poison", "noise", "--poisoned-clients", "4"]) == 2
    assert "poisoned_clients (4) exceeds the number of clients (3)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
