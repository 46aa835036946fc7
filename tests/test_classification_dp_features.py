"""The DP recipe's parts: dihedral view averaging, the random projection to the sphere, the centered head,
its DP mean round, and the noise search over a whole history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fedinspect.classification.features import (
    dihedral_views,
    random_projection,
    to_sphere,
    view_averaged_features,
)
from fedinspect.classification.models import CenteredLinearHead, standardize
from fedinspect.classification.runner import (
    ClassifyConfig,
    center_noise,
    model_inputs,
    noise_for_epsilon,
    planned_history,
    recipe,
)
from fedinspect.classification.task import ClassificationTask
from fedinspect.cli import main
from fedinspect.privacy.dp_sgd import epsilon_of, smallest_noise
from tests.test_classification_task import _write_category


class _PositionalFeatures(nn.Module):
    """A stand-in backbone whose features depend on where things are: a fixed conv, then a 2 x 2 average grid."""

    out_features = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(self.conv(images), 2).flatten(1)


def test_dihedral_views_are_the_flips_and_quarter_turns() -> None:
    image = torch.rand(1, 3, 5, 5)
    views = [view(image) for view in dihedral_views(8)]
    turns = [torch.rot90(image, k, dims=(2, 3)) for k in range(4)]
    expected = turns + [turn.flip(3) for turn in turns]  # the 4 turns and their mirrors: the dihedral group
    for candidate in expected:
        assert sum(torch.equal(candidate, view) for view in views) == 1
    assert all(torch.equal(v(image), w(image)) for v, w in zip(dihedral_views(2), dihedral_views(8), strict=False))
    torch.testing.assert_close(dihedral_views(4)[3](image), torch.rot90(image, 2, dims=(2, 3)))
    with pytest.raises(ValueError, match="views"):
        dihedral_views(3)


def test_view_averaged_features_do_not_change_when_the_image_turns() -> None:
    backbone = _PositionalFeatures().eval()
    images = torch.rand(3, 3, 8, 8)
    turned = torch.rot90(images, 1, dims=(2, 3))
    mirrored = images.flip(3)
    eight, two = view_averaged_features(backbone, images, 8), view_averaged_features(backbone, images, 2)
    torch.testing.assert_close(view_averaged_features(backbone, turned, 8), eight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view_averaged_features(backbone, mirrored, 2), two, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(view_averaged_features(backbone, turned, 2), two, atol=1e-3)  # not closed under turns
    with torch.no_grad():  # one view: the standardized features themselves
        torch.testing.assert_close(view_averaged_features(backbone, images, 1), standardize(backbone(images)))
    with pytest.raises(ValueError, match="square"):
        view_averaged_features(backbone, torch.rand(1, 3, 8, 6), 8)


def test_random_projection_is_orthonormal_seeded_and_lands_on_the_sphere() -> None:
    p = random_projection(40, 8, seed=3)
    torch.testing.assert_close(p.T @ p, torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(p, random_projection(40, 8, seed=3)) and not torch.equal(p, random_projection(40, 8, seed=4))
    x = torch.randn(5, 40)
    rows = to_sphere(x, p)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(rows, (x @ p) / (x @ p).norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="project"):
        random_projection(8, 9, seed=0)


def test_centered_head_by_hand() -> None:
    head = CenteredLinearHead(2, 2)
    assert torch.equal(head(torch.ones(3, 2)), torch.zeros(3, 2))  # zero-initialised
    with torch.no_grad():
        head.center.copy_(torch.tensor([0.6, 0.0]))
        head.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.out.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # centred on (0.6, 0), scaled by 1 / sqrt(1 - 0.36) = 1.25
    expected = torch.tensor([[0.4 * 1.25 + 0.5, 0.0], [-0.6 * 1.25 + 0.5, 2 * 1.25]])
    torch.testing.assert_close(head(x), expected)
    assert "center" in head.state_dict()  # federated with the weights


@pytest.mark.parametrize("changes, message", [
    ({"head": "centered"}, "centered head needs unit-norm features"),
    ({"model": "cnn", "views": 8}, "frozen backbone"),
    ({"views": 8, "flip_augment": True}, "flip_augment adds nothing"),
    ({"views": 3}, "views must be one of"),
    ({"project": -1}, "project must be"),
    ({"head": "centered", "project": 8, "center_share": 1.0}, "center_share"),
])
def test_bad_feature_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifyConfig(**{"model": "mobile", **changes})


def test_smallest_noise_matches_opacus_search_on_one_mechanism() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    for eps, rate, steps in ((8.0, 1.0, 100), (3.0, 0.25, 40), (1.0, 0.1, 300)):
        ours = smallest_noise(lambda s, q=rate, t=steps: [(s, q, t)], eps, 1e-5)
        theirs = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=rate, steps=steps,
                                      accountant="rdp", epsilon_tolerance=eps * 1e-3)
        assert ours == pytest.approx(theirs, rel=5e-3)
        assert eps * 0.999 <= epsilon_of([(ours, rate, steps)], 1e-5) <= eps


def test_noise_for_epsilon_spends_the_target_over_the_mean_and_the_steps() -> None:
    config = recipe(dp=True, dp_epsilon=8.0)
    sizes = [260, 260, 259]
    sigma = noise_for_epsilon(config, sizes, 8.0)
    history = planned_history(config, 260, sigma)
    assert [(q, t) for _, q, t in history] == [(1.0, 1), (1.0, 50)]  # the mean, then 10 x 5 full batches
    assert 8.0 * 0.999 <= epsilon_of(history, 1e-5) <= 8.0
    # at sample rate 1 the mean takes 5 % of the RDP: the steps get 95 %, i.e. sigma = sigma_50 / sqrt(0.95)
    alone = smallest_noise(lambda s: [(s, 1.0, 50)], 8.0, 1e-5)
    assert sigma == pytest.approx(alone / math.sqrt(0.95), rel=3e-3)
    assert center_noise(config, 260, sigma) == pytest.approx(sigma * math.sqrt(0.95 / (0.05 * 50)))
    assert center_noise(config, 260, sigma) == pytest.approx(2.85, abs=0.01)  # the session note on issue 19:
    assert sigma == pytest.approx(4.63, abs=0.01)  # history (2.85, 1, 1), (4.63, 1, 50) -> epsilon 7.994


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_category(tmp_path_factory.mktemp("dp_features") / "tile")


def _centered(noise: float | None) -> ClassifyConfig:
    return recipe(image_size=24, clients=2, rounds=1, views=2, project=16, head="centered", pooling="avgmax",
                  train={"local_epochs": 1, "noise_multiplier": noise, "optimizer": "sgd", "lr": 1.0})


def test_the_first_round_of_the_centered_head_is_the_clients_mean(category: Path, one_torch_thread) -> None:
    task = ClassificationTask(_centered(None), category)
    assert task.rounds == 2  # the mean round, then one training round
    state = task.initial_state()
    results = {f"client_{i}": task.client_update(i, state, 1, {}) for i in range(2)}
    for result in results.values():
        assert all(torch.equal(result.arrays[k], v) for k, v in state.items() if k != "center")
    center = task.aggregate(results)["center"]
    features = torch.cat([task.client_inputs(i)[0] for i in range(2)])
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(features)))
    torch.testing.assert_close(center, features.mean(dim=0))
    assert results["client_0"].memory["privacy_history"] == []


def test_under_dp_the_mean_is_a_gaussian_release_in_the_history(category: Path, one_torch_thread) -> None:
    task = ClassificationTask(_centered(2.0), category)
    state = task.initial_state()
    x, _ = task.client_inputs(0)
    sigma = center_noise(task.config, len(x), 2.0)
    result = task.client_update(0, state, 1, {"privacy_history": []})
    assert result.memory["privacy_history"] == [[sigma, 1.0, 1]]
    noise = result.arrays["center"] * len(x) - x.sum(dim=0)  # what was added to the client's feature sum
    assert noise.std().item() == pytest.approx(sigma, rel=0.5)  # 16 draws of N(0, sigma^2)
    again = task.client_update(0, state, 1, {"privacy_history": []})
    assert torch.equal(again.arrays["center"], result.arrays["center"])  # seeded
    trained = task.client_update(0, task.aggregate({"client_0": result}), 2, result.memory)
    assert [h[2] for h in trained.memory["privacy_history"]] == [1, 1]  # the mean, then one full-batch step
    assert trained.arrays["out.weight"].abs().sum() > 0


def test_inputs_are_the_projected_view_averages_on_the_sphere(category: Path) -> None:
    task = ClassificationTask(_centered(None), category)
    x, y = model_inputs(task.split.test, task.config, task.cache)
    assert x.shape == (len(y), 16)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(len(y)))


def test_classify_cli_defaults_to_the_dp_recipe(category: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["-q", "classify", "--data", str(category), "--out", str(out), "--clients", "2", "--rounds", "2",
                 "--image-size", "24", "--dp-epsilon", "8"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["views"], config["project"], config["head"], config["pooling"]) == (8, 512, "centered", "avgmax")
    assert (config["train"]["max_grad_norm"], config["train"]["lr"], config["train"]["optimizer"]) == (0.25, 80.0,
                                                                                                         "sgd")
    assert [r["round"] for r in results["history"]] == [1, 2, 3]  # the mean round and the two training rounds
    assert max(results["epsilon"].values()) <= 8.0


def test_features_are_cached_per_image_whatever_the_view(category: Path, monkeypatch) -> None:
    from fedinspect.classification import runner
    from fedinspect.classification.runner import InputCache, prepare_split

    config = _centered(None)
    cache = InputCache()
    split = prepare_split(category, config)
    everything, _ = model_inputs(split.view, config, cache)
    calls = []
    monkeypatch.setattr(runner, "view_averaged_features", lambda *a, **k: calls.append(a) or None)
    for part in (split.test, *split.clients):  # every image is known: no backbone pass
        x, _ = model_inputs(part, config, cache)
        rows = [split.view.items.index(item) for item in part.items]
        torch.testing.assert_close(x, everything[rows])
    assert calls == []


def test_validation_runs_never_read_the_test_split(category: Path) -> None:
    from fedinspect.classification.runner import prepare_split

    plain = prepare_split(category, _centered(None))
    tuned = prepare_split(category, recipe(image_size=24, clients=2, validation=True))
    train = set(plain.train.items)
    assert set(tuned.view.items) == train and set(tuned.test.items) <= train
    assert not set(tuned.train.items) & set(tuned.test.items)
    assert sum(len(c.items) for c in tuned.clients) == len(tuned.train.items)
    assert not set(plain.test.items) & (set(tuned.train.items) | set(tuned.test.items))
    assert tuned == prepare_split(category, recipe(image_size=24, clients=2, validation=True))  # seeded
    other = prepare_split(category, recipe(image_size=24, clients=2, validation=True, seed=5, split_seed=0))
    assert set(other.view.items) == train and other.test != tuned.test  # one test split, another validation split


def test_the_dp_recipe_takes_smaller_steps_at_smaller_epsilons() -> None:
    assert (recipe(dp_epsilon=8.0).train.lr, recipe(dp_epsilon=8.0).project) == (80.0, 512)
    assert (recipe(dp=True).train.lr, recipe(train={"noise_multiplier": 1.0}).project) == (80.0, 512)
    assert (recipe(dp_epsilon=3.0).train.lr, recipe(dp_epsilon=3.0).project) == (20.0, 512)
    assert (recipe(dp_epsilon=1.0).train.lr, recipe(dp_epsilon=1.0).project) == (20.0, 128)
    assert recipe(dp_epsilon=1.0, project=64, train={"lr": 5.0}).project == 64  # what the user sets wins
    assert recipe(dp_epsilon=1.0, project=64, train={"lr": 5.0}).train.lr == 5.0
    assert recipe(dp_epsilon=1.0, model="cnn").train.lr == 1e-2  # the CNN keeps its DP-SGD settings


def test_obfuscated_images_default_to_the_cnn_without_dp() -> None:
    obfuscated = ("average", "shuffle", "switch_row")
    assert (recipe().model, recipe().image_size) == ("mobile", 224)
    assert (recipe(obfuscate=obfuscated).model, recipe(obfuscate=obfuscated).image_size) == ("cnn", 64)
    assert recipe(obfuscate=obfuscated).train.optimizer == "adam"  # the non-private training settings
    assert recipe(obfuscate=obfuscated, dp_epsilon=8.0).model == "mobile"  # DP-SGD: the frozen-feature recipe
    assert recipe(obfuscate=obfuscated, model="mobile").model == "mobile"  # what the user sets wins
    assert (recipe(model="cnn").image_size, recipe(model="cnn", image_size=32).image_size) == (64, 32)


def test_classify_cli_trains_the_cnn_on_obfuscated_images(category: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["-q", "classify", "--data", str(category), "--out", str(out), "--clients", "2", "--rounds", "1",
                 "--local-epochs", "1", "--obfuscate", "shuffle"])
    assert code == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["model"], config["image_size"], config["obfuscate"]) == ("cnn", 64, ["shuffle"])


def test_a_projection_wider_than_the_features_is_refused_before_any_image_is_read(category: Path,
                                                                                     monkeypatch) -> None:
    from fedinspect.classification import runner
    from fedinspect.errors import FedinspectError

    monkeypatch.setattr(runner, "image_tensor", lambda *a, **k: pytest.fail("an image was read"))
    with pytest.raises(FedinspectError, match="project 3000 is more than the 2560 features"):
        ClassificationTask(recipe(image_size=24, clients=2, dp_epsilon=8.0, project=3000), category)


def test_a_train_fraction_shrinks_the_clients_shares_and_the_cli_passes_it_on(category: Path, tmp_path: Path) -> None:
    from fedinspect.classification.runner import prepare_split

    full = prepare_split(category, recipe(image_size=24, clients=2))
    half = prepare_split(category, recipe(image_size=24, clients=2, train_fraction=0.5))
    assert half.test == full.test and set(half.train.items) < set(full.train.items)
    assert sum(len(c.items) for c in half.clients) == len(half.train.items)
    reseeded = prepare_split(category, recipe(image_size=24, clients=2, train_fraction=0.5, seed=7, split_seed=0))
    assert reseeded.test == full.test and reseeded.train != half.train  # the seed draws the subsample
    with pytest.raises(ValueError, match="train_fraction"):
        recipe(train_fraction=0.0)
    assert ClassifyConfig.from_dict(recipe(train_fraction=0.25).to_dict()).train_fraction == 0.25
    out = tmp_path / "run"
    assert main(["-q", "classify", "--data", str(category), "--out", str(out), "--clients", "2", "--rounds", "1",
                 "--local-epochs", "1", "--obfuscate", "shuffle", "--train-fraction", "0.5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train_fraction"] == 0.5
    assert results["split"]["train"] == len(half.train.items) and results["split"]["test"] == len(full.test.items)
