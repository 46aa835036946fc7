"""CFLOW: the flow's log-likelihood against closed forms, the positional encoding, and the detector end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from fedinspect.detectors.cflow import Cflow, ConditionalCoupling, ConditionalFlow, positional_encoding_2d
from fedinspect.detectors.registry import get_detector
from fedinspect.detectors.trained_detector import WEIGHTS_FILE
from fedinspect.errors import ModelFileError, SettingsError

from .conftest import textured_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(image_size=64, coupling_blocks=2, condition_vector=16, fiber_batch=256, batch_size=4,
             learning_rate=2e-3, sigma=1.0, validation_fraction=0.25)


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng, 64, 64) for _ in range(n)]


def test_positional_encoding_is_sine_and_cosine_of_column_and_row():
    encoding = positional_encoding_2d(8, 3, 5)
    assert encoding.shape == (8, 3, 5)
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    # 8 channels: 4 for the column, 4 for the row, frequencies 1 and 10000^(-2/4) = 0.01
    for offset, position in ((0, cols), (4, rows)):
        for k, frequency in enumerate((1.0, 0.01)):
            torch.testing.assert_close(encoding[offset + 2 * k], torch.sin(position * frequency))
            torch.testing.assert_close(encoding[offset + 2 * k + 1], torch.cos(position * frequency))
    with pytest.raises(SettingsError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_flow_log_likelihood_matches_closed_forms():
    torch.manual_seed(0)
    x, condition = torch.randn(50, 6) * 2 + 1, torch.randn(50, 4)
    flow = ConditionalFlow(6, 4, blocks=3, clamp=1.9)
    # at initialisation every block is a permutation: log p is the standard normal's
    expected = Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_likelihood(x, condition), expected)
    # one block with only its global affine set: y = x * exp(a) + b, so x ~ N(-b exp(-a), exp(-a))
    block = ConditionalCoupling(6, 4, clamp=1.9)
    a, b = torch.linspace(-1, 1, 6), torch.linspace(2, -2, 6)
    with torch.no_grad():
        block.log_scale.copy_(a)
        block.shift.copy_(b)
    single = ConditionalFlow(6, 4, blocks=1, clamp=1.9)
    single.blocks[0] = block
    expected = Normal(-b * torch.exp(-a), torch.exp(-a)).log_prob(x).sum(1)
    torch.testing.assert_close(single.log_likelihood(x, condition), expected)


def test_coupling_log_determinant_equals_the_jacobians():
    torch.manual_seed(1)
    flow = ConditionalFlow(5, 3, blocks=4, clamp=1.9)
    for parameter in flow.parameters():  # leave the identity start: every part of the block acts
        torch.nn.init.normal_(parameter, std=0.5)
    x, condition = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    flow = flow.double()
    _, log_det = flow(x, condition)
    for i in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda row, i=i: flow(row[None], condition[i:i + 1])[0][0], x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jacobian)[1])


@pytest.fixture(scope="module")
def fitted() -> Cflow:
    return Cflow(**SMALL, epochs=8, patience=0, seed=0).fit(_images(8, 0))


@pytest.mark.slow  # trains 8 epochs (~10 s on 2 busy cores)
def test_fit_save_load_same_scores_and_a_planted_defect_scores_highest(fitted, tmp_path):
    test = _images(3, 1)
    defect = test[0].copy()
    defect[20:36, 24:40] = 250
    scores, maps = fitted.predict([*test, defect])
    assert [m.shape for m in maps] == [(64, 64)] * 4
    assert scores[3] > scores[:3].max()
    assert maps[3][20:36, 24:40].mean() > maps[3][48:, 48:].mean()  # and the map points at it
    assert len(fitted.history_) == 8 and fitted.n_train_images_ == 8 and fitted.n_validation_images_ == 2
    # one image alone scores as within a batch: the reference is fixed by the good images, not the batch
    np.testing.assert_allclose(fitted.predict([defect])[0], scores[3:], rtol=1e-5)
    fitted.save(tmp_path)
    config = json.loads((tmp_path / "cflow.json").read_text())
    assert config["format"] == "fedinspect.cflow/1" and config["params"]["layers"] == ["stride8", "stride16"]
    assert config["weights_sha256"] and "weights" not in config["params"]
    loaded = get_detector("cflow").load(tmp_path)
    assert loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.predict([*test, defect])[0], scores)


def test_good_images_map_to_at_least_zero_before_smoothing(fitted):
    module = fitted.module_
    images = torch.stack([fitted.letterbox(image) for image in _images(8, 0)])
    with torch.no_grad():
        maps = fitted._anomaly_maps(module, images)
        best = torch.stack([m.amax(dim=(1, 2)) for m in module.log_likelihood_maps(images)], dim=1)
    assert maps.min() >= -1e-5  # the reference is the likeliest position among these images
    torch.testing.assert_close(best.max(0).values, module.reference)
    assert torch.isfinite(module.reference).all() and not math.isclose(float(module.reference[0]), 0.0)


@pytest.mark.slow  # two trainings
def test_same_seed_same_weights():
    first = Cflow(**SMALL, epochs=1, seed=4).fit(_images(4, 0))
    second = Cflow(**SMALL, epochs=1, seed=4).fit(_images(4, 0))
    state = first.module_.state_dict()
    assert state.keys() == second.module_.state_dict().keys()
    for key, value in second.module_.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_corrupt_or_mismatched_weights_file_is_refused(fitted, tmp_path):
    fitted.save(tmp_path)
    config_path = tmp_path / "cflow.json"
    config = json.loads(config_path.read_text())
    config["params"]["condition_vector"] = 32  # the file's subnetworks expect 16 condition channels
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="shape"):
        Cflow.load(tmp_path)
    config["params"]["condition_vector"] = 16
    config["params"]["coupling_blocks"] = 3  # a block the file does not have
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError):
        Cflow.load(tmp_path)
    config["params"]["coupling_blocks"] = 2
    config["weights_sha256"] = "0" * 64  # saved against another teacher
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError):
        Cflow.load(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError):
        Cflow.load(tmp_path)


@pytest.mark.parametrize("params, message", [
    (dict(condition_vector=30), "multiple of 4"),
    (dict(coupling_blocks=0), "coupling_blocks"),
    (dict(clamp_alpha=-1.0), "clamp_alpha"),
    (dict(fiber_batch=1.5), "fiber_batch"),
    (dict(layers="stride8"), "layers"),
    (dict(layers=[]), "layers"),
    (dict(learning_rate=0), "learning_rate"),
])
def test_bad_parameters_are_settings_errors(params, message):
    with pytest.raises(SettingsError, match=message):
        Cflow(**params)


def test_an_unknown_layer_is_a_settings_error():
    with pytest.raises(SettingsError, match="stride3"):
        Cflow(**{**SMALL, "layers": ["stride3"]}).fit(_images(4, 0))
