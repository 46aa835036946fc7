"""DRAEM on tiny synthetic images: fit, exact save/load, seeded weights, the planted defect, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedinspect.detectors.draem import Draem, DraemNetwork, focal_loss
from fedinspect.detectors.registry import load_detector
from fedinspect.detectors.trained_detector import WEIGHTS_FILE
from fedinspect.errors import DataError, ModelFileError, SettingsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int, shape=(48, 48)) -> list[np.ndarray]:
    """Good images: vertical stripes with a little noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[1])
    base = 110 + 30 * np.sin(x / 3.0)[None, :, None] * np.ones((shape[0], 1, 3))
    return [np.clip(base + rng.normal(0, 6, (*shape, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _small(**params) -> Draem:
    settings = dict(image_size=64, epochs=1, batch_size=4, crop_size=None, sigma=0.0)
    settings.update(params)
    return Draem(**settings)


def test_fit_save_load_gives_the_same_scores_and_no_folder_in_the_settings(tmp_path):
    textures = tmp_path / "textures"
    textures.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(textures / "t.png")
    model = _small(texture_dir=str(textures), epochs=2, crop_size=32).fit(_images(8, 0) + _images(2, 1, (40, 72)))
    assert model.textures.names == ["t.png"] and len(model.history_) == 2
    test = _images(2, 2) + _images(1, 3, (40, 72))
    scores, maps = model.predict(test)
    assert [m.shape for m in maps] == [(48, 48), (48, 48), (40, 72)]
    assert all(0 <= m.min() and m.max() <= 1 for m in maps)  # softmax probabilities
    model.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "draem.json").read_text())
    assert config["format"] == "fedinspect.draem/1" and config["params"]["texture_dir"] is None
    assert config["params"]["base_width"] == 4 and config["params"]["crop_size"] == 32
    assert model.texture_dir == str(textures)  # saving did not change the estimator
    loaded = load_detector(tmp_path / "model")
    assert isinstance(loaded, Draem)
    assert loaded.get_params() == {**model.get_params(), "texture_dir": None}
    loaded_scores, loaded_maps = loaded.predict(test)
    np.testing.assert_array_equal(loaded_scores, scores)
    for a, b in zip(loaded_maps, maps, strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_weights_and_another_seed_differs():
    images = _images(6, 0)
    first, second = _small(seed=3).fit(images), _small(seed=3).fit(images)
    for a, b in zip(first.module_.state_dict().values(), second.module_.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _small(seed=4).fit(images)
    assert not torch.equal(other.module_.discriminative.head.weight, first.module_.discriminative.head.weight)


def test_architecture_widths_and_parameter_count():
    network = DraemNetwork(4)
    assert network.reconstructive.head.in_channels == 8  # the paper's 2:1 ratio of the two widths
    assert network.discriminative.head.in_channels == 4
    assert sum(p.numel() for p in network.parameters()) == 417_881
    logits, reconstruction = network.eval()(torch.rand(2, 3, 64, 96))
    assert logits.shape == (2, 2, 64, 96) and reconstruction.shape == (2, 3, 64, 96)


def test_focal_loss_and_image_score_against_hand_computed_cases():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    assert float(focal_loss(logits, target)) == pytest.approx(0.25 * math.log(2))  # p = 1/2: (1/2)^2 * ln 2
    logits = torch.randn(2, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 2, (2, 5, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    # one hot pixel of 441 in a 64-pixel map at image_size 64: the 21x21 mean filter gives exactly 1
    score_map = np.zeros((64, 80), np.float32)
    score_map[30, 40] = 441.0
    assert Draem(image_size=64)._image_score(score_map) == pytest.approx(1.0)
    # the window follows the map's size: a 64-pixel map of an image read at 192 pixels averages over 7x7
    assert Draem(image_size=192)._image_score(score_map) == pytest.approx(441.0 / 49)


def test_bad_settings_are_refused_and_a_bad_texture_folder_is_named(tmp_path):
    for params, match in [({"base_width": 0}, "base_width"), ({"crop_size": 48}, "multiple of 32"),
                          ({"crop_size": 16}, "crop_size"), ({"texture_dir": 5}, "texture_dir"),
                          ({"epochs": 0}, "epochs")]:
        with pytest.raises(SettingsError, match=match):
            Draem(**params)
    with pytest.raises(DataError, match="not found") as error:
        Draem(texture_dir=str(tmp_path / "dtd"))
    assert str(tmp_path / "dtd") in str(error.value)
    with pytest.raises(DataError, match="holds no image"):
        Draem(texture_dir=str(tmp_path))


def test_a_corrupt_or_mismatched_weights_file_is_refused(tmp_path):
    _small().fit(_images(4, 0)).save(tmp_path)
    config_path = tmp_path / "draem.json"
    config = json.loads(config_path.read_text())
    config["params"]["base_width"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="shape"):
        Draem.load(tmp_path)
    config["params"]["base_width"] = 4
    config["params"]["texture_dir"] = str(tmp_path)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="invalid settings"):  # a model file may not name a folder to read
        Draem.load(tmp_path)
    config["params"]["texture_dir"] = None
    config_path.write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="corrupt weights"):
        Draem.load(tmp_path)


@pytest.mark.slow
def test_a_planted_defect_scores_above_the_good_images_and_is_located():
    model = _small(epochs=40, learning_rate=3e-3, patience=0, validation_fraction=0.1).fit(_images(16, 0))
    test = _images(4, 1)
    defect = test[0].copy()
    defect[16:30, 18:32] = (230, 40, 40)
    scores, maps = model.predict([*test, defect])
    assert scores[4] > scores[:4].max() + 0.05
    inside = np.zeros((48, 48), bool)
    inside[16:30, 18:32] = True
    assert maps[4][inside].mean() > maps[4][~inside].mean() + 0.1  # 0.42 against 0.25 when written
