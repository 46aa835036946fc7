"""The shared DP-SGD (fedinspect.privacy.dp_sgd) and the trained detectors' private partial_fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedinspect.detectors.autoencoder import AutoencoderMSE
from fedinspect.detectors.cflow import Cflow
from fedinspect.detectors.draem import Draem
from fedinspect.detectors.trained_detector import TrainedDetector, TrainingError
from fedinspect.errors import SettingsError
from fedinspect.privacy.dp_sgd import DPSGDSettings, check_history, epsilon_of, train_dp_sgd


def _squared_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((net(x)[:, 0] - y) ** 2).mean()


def test_each_sample_gradient_is_clipped_before_the_mean(one_torch_thread: None) -> None:
    # four samples, one logical batch (2 physical batches of 2), no noise, SGD with lr 1: the step must be
    # minus the mean of the per-sample gradients, each clipped to norm 0.5 (computed here with torch.func)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.1, 0.1, 0.0], [30.0, -40.0, 0.0], [0.0, 0.2, 0.1]])
    y = torch.tensor([1.0, 0.0, 5.0, -0.1])
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
    start = model.weight.detach().clone()

    def one_loss(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return (xi @ w[0] - yi) ** 2

    per_sample = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))(start, x, y)  # (4, 1, 3)
    norms = per_sample.flatten(1).norm(dim=1)
    assert (norms > 0.5).sum() >= 2 and (norms < 0.5).sum() >= 1  # some clipped, some not
    clipped = per_sample * (0.5 / (norms + 1e-6)).clamp(max=1.0)[:, None, None]
    settings = DPSGDSettings(noise_multiplier=0.0, max_grad_norm=0.5, batch_size=2, accumulation_steps=2,
                             poisson_sampling=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    run = train_dp_sgd(model, optimizer, TensorDataset(x, y), _squared_error, settings, epochs=1, seed=0)
    assert run.steps == 1
    assert torch.allclose(model.weight.detach(), start - clipped.mean(0), atol=1e-5)
    # the outlier (sample 2, gradient norm ~ 1e4) moved the weights by at most max_grad_norm / 4
    assert float((clipped[2] / 4).norm()) <= 0.5 / 4 + 1e-6
    assert not hasattr(model.weight, "grad_sample")  # Opacus's hooks and attributes are gone


def test_epsilon_is_opacus_rdp_accountant_epsilon() -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(120):
        accountant.step(noise_multiplier=1.1, sample_rate=0.05)
    expected = accountant.get_epsilon(delta=1e-5)
    assert epsilon_of([(1.1, 0.05, 120)], 1e-5) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 10
    assert epsilon_of([], 1e-5) == 0.0
    assert math.isinf(epsilon_of([(0.0, 0.05, 3)], 1e-5))


def test_history_accumulates_over_two_calls(one_torch_thread: None) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(24, 3), torch.randn(24)
    model = nn.Linear(3, 1)
    settings = DPSGDSettings(noise_multiplier=1.3, batch_size=3, accumulation_steps=2)  # logical 6: q = 1/4
    first = train_dp_sgd(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(x, y), _squared_error,
                         settings, epochs=2, seed=1)
    assert first.history == [(1.3, 0.25, 8)] and first.steps == 8
    second = train_dp_sgd(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(x, y), _squared_error,
                          settings, epochs=1, seed=2, privacy_history=first.history)
    assert second.history == [(1.3, 0.25, 12)] and second.steps == 4
    assert epsilon_of(second.history, 1e-5) > epsilon_of(first.history, 1e-5)
    other = DPSGDSettings(noise_multiplier=2.0, batch_size=3, accumulation_steps=2)
    third = train_dp_sgd(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(x, y), _squared_error,
                         other, epochs=1, seed=3, privacy_history=second.history)
    assert third.history == [(1.3, 0.25, 12), (2.0, 0.25, 4)]


def test_bad_settings_and_histories_are_refused() -> None:
    with pytest.raises(SettingsError, match="noise multiplier"):
        DPSGDSettings(noise_multiplier=-1.0)
    with pytest.raises(SettingsError, match="unknown DP-SGD setting"):
        DPSGDSettings.from_dict({"noise_multiplier": 1.0, "clip": 2})
    with pytest.raises(SettingsError, match="noise_multiplier"):
        DPSGDSettings.from_dict({"max_grad_norm": 1.0})
    with pytest.raises(SettingsError, match="accountant"):
        DPSGDSettings(noise_multiplier=1.0, accountant="moments")
    with pytest.raises(SettingsError, match="entry 1"):
        check_history([(1.0, 0.5, 3), (1.0, 1.5, 3)])
    with pytest.raises(SettingsError, match="entry 0"):
        check_history([("1.0", 0.5, 3)])
    assert check_history([[1, 0.5, 3.0]]) == [(1.0, 0.5, 3)]


def _images(n: int, seed: int, size: tuple[int, int] = (32, 32)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def test_partial_fit_with_privacy_trains_ae_mse_and_accumulates_epsilon(one_torch_thread: None) -> None:
    privacy = {"noise_multiplier": 1.0, "batch_size": 2, "accumulation_steps": 2}  # logical 4 of 8: q = 1/2
    model = AutoencoderMSE(latent_dim=8, image_size=32, epochs=2, seed=3).initialize()
    start = model.trainable_state()
    model.partial_fit(_images(8, 0), privacy=privacy)
    assert model.privacy_history_ == [(1.0, 0.5, 4)]
    assert model.epsilon_ == pytest.approx(epsilon_of([(1.0, 0.5, 4)], 1e-5))
    after = model.trainable_state()
    assert set(after) == set(start) and any(not torch.equal(after[k], start[k]) for k in start)
    assert len(model.history_) == 2 and all(math.isfinite(r["train_loss"]) for r in model.history_)
    first_epsilon = model.epsilon_
    # a second round, with FedProx's term added after the noise: the history goes on
    model.partial_fit(_images(8, 1), privacy=privacy, privacy_history=model.privacy_history_, proximal_mu=0.1)
    assert model.privacy_history_ == [(1.0, 0.5, 8)] and model.epsilon_ > first_epsilon
    scores = model.score_samples(_images(2, 2))
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_partial_fit_with_privacy_is_seeded(one_torch_thread: None) -> None:
    privacy = DPSGDSettings(noise_multiplier=0.8, batch_size=2, accumulation_steps=2)
    states = []
    for seed in (5, 5, 6):
        model = AutoencoderMSE(latent_dim=4, image_size=32, epochs=1, seed=0).initialize()
        model.seed = seed  # the same initial weights, then the seed of sampling and noise
        states.append(model.partial_fit(_images(6, 0), privacy=privacy).trainable_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_detectors_that_cannot_do_dp_sgd_are_refused(one_torch_thread: None) -> None:
    with pytest.raises(SettingsError, match=r"cflow cannot be trained with DP-SGD: .*fiber"):
        Cflow(image_size=32).partial_fit(_images(2, 0), privacy={"noise_multiplier": 1.0})
    with pytest.raises(SettingsError, match=r"BatchNorm.*normalization='group'"):
        Draem(base_width=2, crop_size=None, image_size=32, epochs=1).partial_fit(
            _images(2, 0), privacy={"noise_multiplier": 1.0})
    with pytest.raises(SettingsError, match="privacy_history given without"):
        AutoencoderMSE(image_size=32).partial_fit(_images(2, 0), privacy_history=[(1.0, 0.5, 2)])
    with pytest.raises(SettingsError, match="normalization"):
        Draem(normalization="layer")
    mixed = _images(2, 0) + _images(2, 1, size=(32, 64))
    with pytest.raises(TrainingError, match="one padded image shape"):
        AutoencoderMSE(latent_dim=4, image_size=32, epochs=1).partial_fit(mixed, privacy={"noise_multiplier": 1.0})


def test_group_normalization_is_the_same_architecture_everywhere(one_torch_thread: None, tmp_path) -> None:
    # the switch is a constructor parameter: every party building the detector gets the same keys, without
    # BatchNorm's running statistics, and a saved model rebuilds them
    def build(seed: int) -> TrainedDetector:
        return Draem(base_width=2, crop_size=None, image_size=32, epochs=1, normalization="group", seed=seed)

    server, client = build(0).initialize(), build(1).initialize()
    keys = set(server.trainable_state())
    assert keys == set(client.trainable_state())
    assert not any("running_mean" in key or "num_batches_tracked" in key for key in keys)
    assert keys != set(Draem(base_width=2, crop_size=None, image_size=32).initialize().trainable_state())
    client.load_trainable_state(server.trainable_state())
    client.partial_fit(_images(4, 0), privacy={"noise_multiplier": 1.0, "batch_size": 2, "accumulation_steps": 1})
    assert client.privacy_history_ == [(1.0, 0.5, 2)]
    loaded = Draem.load(client.save(tmp_path / "draem"))
    assert loaded.normalization == "group"
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in client.trainable_state().items())
