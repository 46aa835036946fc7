"""The default classification recipe under DP-SGD, the target epsilon, and the recipe's parts
(letterbox, block pooling, per-sample standardization, class weights, lr schedule)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedinspect.classification.data import load_square
from fedinspect.classification.models import LinearHead, load_backbone, standardize
from fedinspect.classification.runner import ClassifyConfig, noise_for_epsilon, recipe, run_classification
from fedinspect.classification.training import TrainSettings, class_weights
from fedinspect.cli import main
from fedinspect.privacy.accounting import epsilon as accountant_epsilon
from tests.conftest import save_png

SIZE = 32


def write_separable(root: Path, per_class: int) -> Path:
    """A 3-class MVTec-layout category, 32 x 32 px: 2n plain, n bright-stripe, n dark-square images."""
    rng = np.random.default_rng(0)
    for folder, count, kind in (("train/good", per_class * 3 // 2, "good"), ("test/good", per_class // 2, "good"),
                                ("test/stripe", per_class, "stripe"), ("test/square", per_class, "square")):
        for i in range(count):
            image = (100 + 20 * rng.random((SIZE, SIZE))).astype(np.uint8)
            if kind == "stripe":
                image[14:18, 3:-3] = 240
            elif kind == "square":
                image[6:18, 8:20] = 10
            save_png(root / folder / f"{i:03d}.png", np.repeat(image[..., None], 3, axis=2))
            if kind != "good":
                save_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", np.full((SIZE, SIZE), 255, np.uint8))
    return root


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 images: 40 plain, 20 bright-stripe, 20 dark-square."""
    return write_separable(tmp_path_factory.mktemp("separable") / "tile", 20)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default recipe (3 IID clients, its rounds, model, features, head and training) at epsilon 3, on 240
    separable images (about 64 per client: a wide margin; with 21 per client the noise leaves less of one)."""
    separable = write_separable(tmp_path_factory.mktemp("separable_dp") / "tile", 60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored: a later module's in-process run must use the default, as its nodes do
    try:
        config = recipe(image_size=SIZE, dp_epsilon=3.0)
        return run_classification(separable, tmp_path_factory.mktemp("dp") / "run", config, progress=False,
                                  write_report=False)
    finally:
        torch.set_num_threads(threads)


def test_default_recipe_beats_the_majority_class_under_dp(dp_run: dict) -> None:
    test_counts = dp_run["split"]["test_counts"]
    n_test = sum(test_counts.values())
    majority = max(test_counts.values()) / n_test
    # all "good": F1 of that class 2p / (1 + p), 0 for the others
    majority_f1 = 2 * majority / (1 + majority) / len(test_counts)
    assert dp_run["accuracy"] > majority + 0.15
    assert dp_run["macro_f1"] > majority_f1 + 0.3
    assert dp_run["privacy"]["dp"] and dp_run["config"]["clients"] == 3


def test_target_epsilon_is_spent_within_tolerance(dp_run: dict) -> None:
    privacy = dp_run["privacy"]
    assert privacy["target_epsilon"] == 3.0
    spent = [client["epsilon"] for client in privacy["clients"].values()]
    assert max(spent) <= 3.0 + 1e-9
    assert max(spent) >= 3.0 * 0.99
    for name, client in privacy["clients"].items():  # the accountant's own figure for what the client did
        (center, center_rate, releases), (sigma, rate, steps) = client["accountant_history"]
        assert (center, center_rate, releases) == (privacy["center_noise"][name], 1.0, 1)
        assert sigma == privacy["noise_multiplier"] and (rate, steps) == (1.0, 50)  # 10 rounds x 5 full batches
        # at sample rate 1 both are Gaussian mechanisms: their RDP adds up to one Gaussian's of noise s with
        # 1/s^2 = 1/center^2 + steps/sigma^2, the mean's part being center_share
        assert (1 / center ** 2) / (1 / center ** 2 + steps / sigma ** 2) == pytest.approx(0.05)
        combined = (1 / center ** 2 + steps / sigma ** 2) ** -0.5
        assert client["epsilon"] == pytest.approx(accountant_epsilon(combined, client["delta"], 1.0, 1), rel=1e-6)


def test_noise_for_epsilon_lets_the_client_with_most_steps_decide() -> None:
    config = ClassifyConfig(rounds=4, train=TrainSettings(local_epochs=2, batch_size=16, accumulation_steps=2))
    sizes = [100, 31]  # 4 and 1 steps per epoch: sample rates 1/4 and 1
    sigma = noise_for_epsilon(config, sizes, 2.0)
    spent = [accountant_epsilon(sigma, 1e-5, 1 / math.ceil(n / 32), 8 * math.ceil(n / 32)) for n in sizes]
    assert max(spent) == pytest.approx(2.0, rel=2e-3) and max(spent) <= 2.0
    assert accountant_epsilon(sigma * 0.99, 1e-5, 1.0, 8) > 2.0  # the smallest noise that does it


def test_classify_cli_takes_a_target_epsilon_or_a_noise_not_both(separable: Path, tmp_path: Path) -> None:
    args = ["-q", "classify", "--data", str(separable), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--dp-epsilon", "3", "--dp-noise", "1"])
    assert stop.value.code == 2
    assert main([*args, "--dp-epsilon", "3", "--flip-augment"]) == 2  # mirrors would be two samples per image
    assert main([*args, "--dp-epsilon", "-1"]) == 2


def test_letterbox_keeps_the_aspect_ratio_on_mid_grey(tmp_path: Path) -> None:
    image = np.zeros((10, 40, 3), np.uint8)
    image[:, :20] = 200
    path = save_png(tmp_path / "wide.png", image)
    boxed = load_square(path, 20, "letterbox")
    assert boxed.shape == (20, 20, 3)
    assert (boxed[:7] == 128).all() and (boxed[-8:] == 128).all()  # 5 rows of content, centred at rows 7..11
    expected = np.asarray(Image.fromarray(image).resize((20, 5), Image.BILINEAR))
    np.testing.assert_array_equal(boxed[7:12], expected)
    assert load_square(path, 20).shape == (20, 20, 3)
    with pytest.raises(ValueError, match="resize"):
        load_square(path, 20, "crop")


def test_block_pooling_averages_the_last_stride16_and_stride32_blocks() -> None:
    backbone = load_backbone("mobile").freeze()
    pooled = backbone.with_pooling("blocks")
    images = torch.rand(2, 3, 64, 64)
    net = backbone.trunk.net
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem((images - 0.5) / 0.5)))
        maps = []
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
            maps.append(x)
        expected = torch.cat([maps[i].mean(dim=(2, 3)) for i in (10, 15)], dim=1)  # Lite0: 112 + 320 channels
        assert maps[10].shape[-1] == 4 and maps[11].shape[-1] == 2 and maps[15].shape[1] == 320
        torch.testing.assert_close(pooled(images), expected)
    assert pooled.out_features == 432 and backbone.with_pooling("avgmax").out_features == 2560


def test_heads_standardize_each_feature_vector_on_its_own() -> None:
    features = torch.tensor([[1.0, 2.0, 3.0, 6.0], [10.0, 10.0, 10.0, 14.0]])
    row = features[0]
    np.testing.assert_allclose(standardize(features)[0].numpy(), ((row - row.mean()) / row.std()).numpy(), rtol=1e-6)
    head = LinearHead(4, 2)
    torch.testing.assert_close(head(features[:1]), head(features[:1] * 3 + 5))  # per-sample affine invariance


def test_balanced_class_weights_and_cosine_schedule_by_hand() -> None:
    weights = class_weights(torch.tensor([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    settings = TrainSettings(lr=0.1, lr_schedule="cosine")
    assert [round(settings.lr_at(r, 4), 6) for r in (1, 2, 3, 4)] == [0.1, 0.085355, 0.05, 0.014645]
    assert TrainSettings(lr=0.1).lr_at(3, 4) == 0.1
    with pytest.raises(ValueError, match="DP-SGD"):
        TrainSettings(class_weight="balanced", noise_multiplier=1.0)


def test_results_record_the_recipe(dp_run: dict) -> None:
    config = json.loads(json.dumps(dp_run["config"]))
    assert ClassifyConfig.from_dict(config).dp_epsilon == 3.0
    assert {"resize", "pooling", "head", "flip_augment"} <= set(config)
