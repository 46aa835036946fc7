"""The shared training loop, scoring and model files of the trained detectors, on a toy subclass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedinspect.detectors.trained_detector import WEIGHTS_FILE, TrainedDetector, TrainingError
from fedinspect.errors import ModelFileError, SettingsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ToyAutoencoder(TrainedDetector):
    """A two-layer convolutional autoencoder: the smallest detector the base can drive."""

    name = "toy"
    model_format = "fedinspect.toy/1"
    input_multiple = 4

    def __init__(self, width: int = 4, image_size: int = 32, epochs: int = 3, learning_rate: float = 1e-2,
                 batch_size: int = 4, patience: int = 2, validation_fraction: float = 0.25, sigma: float = 0.0,
                 seed: int = 0, progress: bool = False) -> None:
        super().__init__(image_size=image_size, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         patience=patience, validation_fraction=validation_fraction, sigma=sigma, seed=seed,
                         progress=progress)
        self.width = width

    def _build_module(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, self.width, 4, stride=2, padding=1), nn.ReLU(),
                             nn.ConvTranspose2d(self.width, 3, 4, stride=2, padding=1), nn.Sigmoid())

    def _training_loss(self, module, images, generator):
        return ((module(images) - images) ** 2).mean()

    def _anomaly_maps(self, module, images):
        return ((module(images) - images) ** 2).mean(1)


def _images(n: int, seed: int, shape=(40, 48)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = np.full((*shape, 3), 120, np.uint8)
    return [np.clip(base + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_fit_predict_save_load_gives_the_same_scores(tmp_path):
    train = _images(8, 0)
    test = _images(3, 1)
    defect = test[0].copy()
    defect[10:20, 10:20] = 255
    model = ToyAutoencoder(epochs=30, patience=0).fit(train)
    scores, maps = model.predict([*test, defect])
    assert [m.shape for m in maps] == [(40, 48)] * 4
    assert scores[3] > scores[:3].max()  # the planted bright square is reconstructed worst
    assert len(model.history_) == 30 and model.n_train_images_ == 8 and model.n_validation_images_ == 2
    model.save(tmp_path)
    config = json.loads((tmp_path / "toy.json").read_text())
    assert config["format"] == "fedinspect.toy/1" and config["params"]["width"] == 4
    loaded = ToyAutoencoder.load(tmp_path)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict([*test, defect])[0], scores)


def test_same_seed_same_weights_and_early_stopping_keeps_the_best_epoch():
    first = ToyAutoencoder(epochs=4, seed=3).fit(_images(8, 0))
    second = ToyAutoencoder(epochs=4, seed=3).fit(_images(8, 0))
    for a, b in zip(first.module_.state_dict().values(), second.module_.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a learning rate that makes the validation loss climb stops after `patience` epochs without progress
    model = ToyAutoencoder(epochs=50, learning_rate=0.5, patience=2, seed=1).fit(_images(8, 0))
    losses = [record["validation_loss"] for record in model.history_]
    best = int(np.argmin(losses))
    assert model.best_epoch_ == best + 1
    assert len(losses) == min(50, best + 1 + 2)


def test_images_of_different_shapes_are_batched_by_shape_and_mapped_back():
    images = _images(4, 0, (40, 48)) + _images(4, 1, (64, 32))
    model = ToyAutoencoder(epochs=1, validation_fraction=0.0).fit(images)
    assert model.best_epoch_ == 1
    _, maps = model.predict([images[0], images[5], images[1]])
    assert [m.shape for m in maps] == [(40, 48), (64, 32), (40, 48)]


def test_bad_settings_and_too_few_images_are_refused():
    with pytest.raises(SettingsError, match="epochs"):
        ToyAutoencoder(epochs=0)
    with pytest.raises(SettingsError, match="validation_fraction"):
        ToyAutoencoder(validation_fraction=1.0)
    with pytest.raises(TrainingError, match="at least one training and one validation"):
        ToyAutoencoder().fit(_images(1, 0))
    with pytest.raises(RuntimeError, match="not trained"):
        ToyAutoencoder().predict(_images(1, 0))


def test_a_corrupt_or_mismatched_weights_file_is_refused(tmp_path):
    ToyAutoencoder(epochs=1).fit(_images(4, 0)).save(tmp_path)
    with pytest.raises(ModelFileError, match="shape"):  # the file fits another width
        config = json.loads((tmp_path / "toy.json").read_text())
        config["params"]["width"] = 5
        (tmp_path / "toy.json").write_text(json.dumps(config))
        ToyAutoencoder.load(tmp_path)
    config["params"]["width"] = 4
    (tmp_path / "toy.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="corrupt weights"):
        ToyAutoencoder.load(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFileError, match="missing"):
        ToyAutoencoder.load(tmp_path)


def test_device_is_checked_and_only_trained_detectors_have_one(tmp_path, capsys) -> None:
    import torch

    from fedinspect.cli import main
    from fedinspect.detectors.registry import get_detector, set_device
    from fedinspect.detectors.trained_detector import resolve_device
    from fedinspect.errors import SettingsError
    from fedinspect.federation.detector_task import DetectorFederationConfig

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingsError, match="device must be one of"):
        resolve_device("gpu")
    model = set_device(get_detector("ae_mse"), "cpu")
    assert model.device == "cpu" and "device" not in model.get_params()  # not a model parameter: never saved
    with pytest.raises(SettingsError, match="patchcore has no device to choose"):
        set_device(get_detector("patchcore"), "cpu")
    assert set_device(get_detector("padim"), "auto") is not None
    with pytest.raises(SettingsError, match="only the trained detectors"):
        DetectorFederationConfig(detector="padim", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
        assert main(["-q", "fit", "--detector", "ae_mse", "--device", "cuda", "--data", str(tmp_path / "none"),
                     "--out", str(tmp_path / "m")]) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
