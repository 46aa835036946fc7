"""Bergmann et al.'s autoencoder (ae_mse, ae_ssim) and the torch SSIM it trains with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from fedinspect.detectors.autoencoder import AutoencoderMSE, AutoencoderSSIM, ConvAutoencoder
from fedinspect.detectors.registry import get_detector, load_detector
from fedinspect.detectors.ssim import ssim_map
from fedinspect.detectors.trained_detector import WEIGHTS_FILE
from fedinspect.errors import ModelFileError, SettingsError

DETECTORS = [AutoencoderMSE, AutoencoderSSIM]


def _textures(n: int, seed: int, size: int = 32) -> list[np.ndarray]:
    """Diagonal stripes at a random phase plus noise: a texture the autoencoder can learn in seconds."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        stripes = 128 + 60 * np.sin((rows + cols + rng.uniform(0, 8)) * np.pi / 4)
        gray = stripes + rng.normal(0, 4, (size, size))
        images.append(np.clip(np.repeat(gray[..., None], 3, axis=2), 0, 255).astype(np.uint8))
    return images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fast(cls, **params):
    settings = dict(latent_dim=16, image_size=32, epochs=50, learning_rate=1e-3, batch_size=4, patience=0,
                    validation_fraction=0.25, sigma=1.0, seed=0)
    return cls(**{**settings, **params})


@pytest.mark.parametrize("shape", [(1, 3, 24, 24), (2, 3, 17, 30)])
def test_ssim_map_matches_skimage(shape):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, shape)
    y = np.clip(x + rng.normal(0, 0.2, shape), 0, 1)
    ours = ssim_map(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for b in range(shape[0]):
        mean, full = structural_similarity(x[b].transpose(1, 2, 0), y[b].transpose(1, 2, 0), win_size=11,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=-1, full=True)
        np.testing.assert_allclose(ours[b].transpose(1, 2, 0), full, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours[b, :, 5:-5, 5:-5].mean(), mean, rtol=1e-9)  # skimage crops the border
    same = ssim_map(torch.from_numpy(x), torch.from_numpy(x))
    torch.testing.assert_close(same, torch.ones(shape, dtype=torch.float64))


def test_ssim_is_differentiable_and_refuses_bad_shapes():
    x = torch.rand(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim_map(a, y).mean(), (x,))
    with pytest.raises(ValueError, match="one shape"):
        ssim_map(x, y[:, :, :6])
    with pytest.raises(ValueError, match="at least 5 pixels"):
        ssim_map(torch.rand(1, 3, 4, 16), torch.rand(1, 3, 4, 16))


def test_encoder_follows_the_seeds_table_2_and_decoder_mirrors_it():
    model = ConvAutoencoder(latent_dim=100)
    shapes = []
    x = torch.rand(1, 3, 128, 128)
    for layer in model.encoder:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            shapes.append((tuple(x.shape[1:]), layer.kernel_size, layer.stride, layer.padding))
    assert shapes == [((32, 64, 64), (4, 4), (2, 2), (1, 1)), ((32, 32, 32), (4, 4), (2, 2), (1, 1)),
                      ((32, 32, 32), (3, 3), (1, 1), (1, 1)), ((64, 16, 16), (4, 4), (2, 2), (1, 1)),
                      ((64, 16, 16), (3, 3), (1, 1), (1, 1)), ((128, 8, 8), (4, 4), (2, 2), (1, 1)),
                      ((64, 8, 8), (3, 3), (1, 1), (1, 1)), ((100, 8, 8), (3, 3), (1, 1), (1, 1))]
    leaky = [m for m in model.encoder if isinstance(m, torch.nn.LeakyReLU)]
    assert len(leaky) == 7 and all(m.negative_slope == 0.2 for m in leaky)
    encoder_convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    decoder_convs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    for conv, mirror in zip(encoder_convs, decoder_convs[::-1], strict=True):
        assert (mirror.in_channels, mirror.out_channels) == (conv.out_channels, conv.in_channels)
        assert (mirror.kernel_size, mirror.stride, mirror.padding) == (conv.kernel_size, conv.stride, conv.padding)
    output = model(torch.rand(2, 3, 48, 80))
    assert output.shape == (2, 3, 48, 80) and 0 <= float(output.detach().min()) and float(output.detach().max()) <= 1


@pytest.mark.parametrize("cls", DETECTORS)
def test_fit_finds_a_planted_defect_and_reloads_to_the_same_scores(cls, tmp_path):
    train, test = _textures(16, 0), _textures(4, 1)
    defect = test[0].copy()
    defect[10:18, 12:20] = 10  # a dark square breaks the stripes
    model = _fast(cls).fit(train)
    scores, maps = model.predict([*test, defect])
    assert [m.shape for m in maps] == [(32, 32)] * 5
    assert scores[4] > scores[:4].max()
    peak = np.unravel_index(np.argmax(maps[4]), maps[4].shape)
    assert 8 <= peak[0] < 20 and 10 <= peak[1] < 22  # the map's peak is on the square
    assert model.n_train_images_ == 16 and model.n_validation_images_ == 4 and len(model.history_) == 50
    losses = [record["validation_loss"] for record in model.history_]
    assert min(losses) < 0.6 * losses[0]  # it learnt the stripes, not only their mean colour
    model.save(tmp_path)
    config = json.loads((tmp_path / f"{cls.name}.json").read_text())
    assert config["format"] == f"fedinspect.{cls.name}/1" and config["params"]["latent_dim"] == 16
    loaded = load_detector(tmp_path)
    assert type(loaded) is cls and loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict([*test, defect])[0], scores)


def test_maps_are_the_reconstruction_error_of_the_network():
    images = _textures(3, 0)
    x = torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images])
    for cls in DETECTORS:
        model = _fast(cls, epochs=1, sigma=0.0, validation_fraction=0.0).fit(images)
        with torch.no_grad():
            reconstruction = model.module_(x)
        expected = (((reconstruction - x) ** 2).mean(1) if cls is AutoencoderMSE
                    else 1 - ssim_map(reconstruction, x).mean(1))
        scores, maps = model.predict(images)
        np.testing.assert_allclose(np.stack(maps), expected.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(scores, expected.amax((1, 2)).numpy(), rtol=1e-5)


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    images = _textures(6, 0)
    first, second, other = (_fast(AutoencoderSSIM, epochs=2, seed=s).fit(images).module_.state_dict()
                            for s in (3, 3, 4))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert not torch.equal(first["encoder.0.weight"], other["encoder.0.weight"])


def test_a_corrupt_or_mismatched_weights_file_is_refused(tmp_path):
    _fast(AutoencoderMSE, epochs=1).fit(_textures(4, 0)).save(tmp_path)
    config_path = tmp_path / "ae_mse.json"
    config = json.loads(config_path.read_text())
    config["params"]["latent_dim"] = 8  # the weights were trained with 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="shape"):
        AutoencoderMSE.load(tmp_path)
    config["params"]["latent_dim"] = 0
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="latent_dim"):
        AutoencoderMSE.load(tmp_path)
    config["params"]["latent_dim"] = 16
    config_path.write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFileError, match="corrupt weights"):
        AutoencoderMSE.load(tmp_path)
    with pytest.raises(ModelFileError, match=r"ae_ssim\.json"):  # an ae_mse folder is not an ae_ssim model
        AutoencoderSSIM.load(tmp_path)


@pytest.mark.parametrize("params, match", [({"latent_dim": 0}, "latent_dim"), ({"latent_dim": 2.5}, "latent_dim"),
                                           ({"latent_dim": True}, "latent_dim"), ({"epochs": -1}, "epochs"),
                                           ({"learning_rate": 0}, "learning_rate"), ({"sigma": -1}, "sigma")])
def test_bad_parameters_are_refused(params, match):
    for name in ("ae_mse", "ae_ssim"):
        with pytest.raises(SettingsError, match=match):
            get_detector(name, **params)
