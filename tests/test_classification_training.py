"""FedAvg, DP-SGD's per-sample clipping, the privacy accounting and the seeded local training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedinspect.classification.training import TrainSettings, epsilon_of, train_local
from fedinspect.federation.fedavg import fedavg


def test_fedavg_is_the_mean_weighted_by_client_images() -> None:
    a = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([[3.0, -2.0]]), "b": torch.tensor([4.0]), "n": torch.tensor(5)}
    c = {"w": torch.tensor([[0.0, 1.0]]), "b": torch.tensor([1.0]), "n": torch.tensor(4)}
    out = fedavg([a, b, c], [10, 30, 60])
    # by hand: w = (10*[1,2] + 30*[3,-2] + 60*[0,1]) / 100 = [1.0, 0.2]; b = (0 + 120 + 60) / 100 = 1.8
    assert torch.allclose(out["w"], torch.tensor([[1.0, 0.2]]))
    assert torch.allclose(out["b"], torch.tensor([1.8]))
    assert out["w"].dtype == torch.float32 and int(out["n"]) == 5  # integer buffers: the largest


def test_fedavg_of_one_round_equals_weighted_mean_of_trained_clients() -> None:
    torch.manual_seed(0)
    states, sizes = [], [7, 13]
    for k, n in enumerate(sizes):
        model = nn.Linear(4, 3)
        result = train_local(model, torch.randn(n, 4), torch.randint(0, 3, (n,)), TrainSettings(local_epochs=1),
                             seed=k)
        states.append(result.state)
        assert result.n_examples == n
    averaged = fedavg(states, sizes)
    for key in averaged:
        expected = (7 * states[0][key] + 13 * states[1][key]) / 20
        assert torch.allclose(averaged[key], expected, atol=1e-6)


def test_fedavg_refuses_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])
    with pytest.raises(ValueError, match="weights"):
        fedavg([{"w": torch.zeros(1)}], [1, 2])
    with pytest.raises(ValueError, match="other parameters"):
        fedavg([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([{"w": torch.zeros(1)}], [0])


def _per_sample_gradients(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(softmax(W x_i), y_i) / dW = (p_i - onehot(y_i)) x_i^T, one per sample."""
    p = torch.softmax(x @ weight.T, dim=1)
    return torch.einsum("nc,nd->ncd", p - nn.functional.one_hot(y, weight.shape[0]).float(), x)


def test_dp_sgd_clips_each_sample_gradient_then_averages() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 2, bias=False)
    before = model.weight.detach().clone()
    x = torch.randn(6, 4) * 3.0  # large inputs: most per-sample gradients exceed the bound
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    settings = TrainSettings(local_epochs=1, batch_size=6, accumulation_steps=1, lr=1.0, momentum=0.0, optimizer="sgd",
                             noise_multiplier=0.0, max_grad_norm=0.5, poisson_sampling=False)
    result = train_local(model, x, y, settings, seed=0)
    grads = _per_sample_gradients(before, x, y)
    norms = grads.flatten(1).norm(dim=1)
    assert (norms > 0.5).sum() >= 2 and (norms < 0.5).sum() >= 2  # some clipped, some not
    clipped = grads * torch.clamp(0.5 / norms, max=1.0)[:, None, None]
    assert torch.allclose(result.state["weight"], before - clipped.mean(dim=0), atol=1e-6)
    # plain SGD (no DP) takes the unclipped mean: a different step
    plain = nn.Linear(4, 2, bias=False)
    plain.weight.data.copy_(before)
    unclipped = train_local(plain, x, y, TrainSettings(local_epochs=1, batch_size=6, accumulation_steps=1, lr=1.0,
                                                       momentum=0.0, optimizer="sgd"), seed=0)
    assert torch.allclose(unclipped.state["weight"], before - grads.mean(dim=0), atol=1e-6)


def test_gradient_accumulation_makes_one_step_per_logical_batch() -> None:
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    settings = TrainSettings(local_epochs=1, batch_size=3, accumulation_steps=4, lr=1.0, momentum=0.0, optimizer="sgd",
                             noise_multiplier=0.0, poisson_sampling=False)
    model = nn.Linear(4, 2, bias=False)
    before = model.weight.detach().clone()
    result = train_local(model, x, y, settings, seed=0)
    assert result.steps == 1  # 4 physical batches of 3, one logical batch of 12
    grads = _per_sample_gradients(before, x, y)
    clipped = grads * torch.clamp(1.0 / grads.flatten(1).norm(dim=1), max=1.0)[:, None, None]
    assert torch.allclose(result.state["weight"], before - clipped.mean(dim=0), atol=1e-6)


def test_epsilon_is_cumulative_and_matches_the_accountant() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    n, sigma = 70, 1.1
    settings = TrainSettings(local_epochs=2, batch_size=4, accumulation_steps=4, noise_multiplier=sigma)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    first = train_local(model, x, y, settings, seed=0)
    second = train_local(model, x, y, settings, seed=1, privacy_history=first.privacy_history)
    q = 1 / 5  # Opacus: 1 / ceil(70 / 16) Poisson rate, 5 steps per epoch
    assert settings.sample_rate(n) == q and settings.steps_per_epoch(n) == 5
    assert first.privacy_history == [(sigma, q, 10)] and first.steps == 10
    assert second.privacy_history == [(sigma, q, 20)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=20, orders=orders)
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert second.epsilon == pytest.approx(independent, rel=1e-9)
    assert first.epsilon < second.epsilon
    assert epsilon_of(second.privacy_history, 1e-5) == pytest.approx(independent, rel=1e-9)


def test_epsilon_of_the_seed_noise_is_astronomic_and_zero_noise_infinite() -> None:
    history = [(0.01, 32 / 260, 5 * 2 * 8)]
    assert epsilon_of(history, 1e-5) > 1e4
    assert epsilon_of([(0.0, 0.1, 10)], 1e-5) == math.inf
    assert epsilon_of([], 1e-5) == 0.0


def test_same_seed_same_model_and_settings_are_checked() -> None:
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
        runs.append(train_local(model, x, y, TrainSettings(noise_multiplier=0.7), seed=11).state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    with pytest.raises(ValueError, match="noise multiplier"):
        TrainSettings(noise_multiplier=-1)
    with pytest.raises(ValueError, match="accountant"):
        TrainSettings(accountant="moments")
