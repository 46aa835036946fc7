"""MAML with torch.func against hand-unrolled SGD and hand-derived meta-gradients; meta-training and fine-tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.meta.maml import adapt, converged_epoch, fine_tune, meta_loss, meta_train, pair_loss
from fedinspect.meta.model import MeDetectionNet
from fedinspect.meta.pairs import PairBatch


class LinearOnTest(nn.Module):
    """A logistic regression on the flattened test image (the reference is ignored)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        return self.linear(test.flatten(1)).squeeze(1)


class ScaledMean(nn.Module):
    """One parameter: logit = w * mean(test image)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        return self.w * test.double().mean(dim=(1, 2, 3))


def random_batch(n: int, seed: int, size: int = 2) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g),
                     (torch.arange(n) % 2).float())


def scalar_batch(values: list[float], labels: list[int]) -> PairBatch:
    """Test images whose mean is ``values[i]``."""
    test = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    return PairBatch(torch.zeros_like(test), test, torch.tensor(labels, dtype=torch.float32))


@pytest.mark.parametrize("first_order", [True, False])
def test_adapt_equals_hand_unrolled_sgd(first_order):
    torch.manual_seed(0)
    model = LinearOnTest(12)
    support = random_batch(6, seed=1)
    lr, steps = 0.3, 2
    params = {k: p for k, p in model.named_parameters()}
    adapted = adapt(model, params, support, steps=steps, inner_lr=lr, first_order=first_order)
    # by hand: a copy of the layer, plain autograd, w <- w - lr * grad twice
    weight, bias = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    for _ in range(steps):
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        logits = (support.test.flatten(1) @ weight.T + bias).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, support.label)
        g_weight, g_bias = torch.autograd.grad(loss, [weight, bias])
        weight, bias = (weight - lr * g_weight).detach(), (bias - lr * g_bias).detach()
    torch.testing.assert_close(adapted["linear.weight"].detach(), weight)
    torch.testing.assert_close(adapted["linear.bias"].detach(), bias)
    assert model.linear.weight.grad is None  # the module itself is untouched
    # first order: the meta-gradient is the query gradient at the adapted weights; second order differs from it
    query = random_batch(4, seed=2)
    (g_meta,) = torch.autograd.grad(pair_loss(model, adapted, query), [params["linear.weight"]])
    leaves = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
    (g_at_adapted,) = torch.autograd.grad(pair_loss(model, leaves, query), [leaves["linear.weight"]])
    if first_order:
        torch.testing.assert_close(g_meta, g_at_adapted)
    else:
        assert (g_meta - g_at_adapted).abs().max() > 1e-4


def _hand_meta_gradient(w: float, support: tuple[list[float], list[int]], query: tuple[list[float], list[int]],
                        lr: float, first_order: bool) -> float:
    """d/dw of the mean query BCE at w' = w - lr * L_s'(w) for logit = w * a (one inner step), in numpy."""
    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    # the images are float32: the same rounded values here, in float64 like the model
    a_s, y_s = np.float32(support[0]).astype(np.float64), np.array(support[1])
    a_q, y_q = np.float32(query[0]).astype(np.float64), np.array(query[1])
    d_support = np.mean((sigmoid(w * a_s) - y_s) * a_s)  # L_s'(w)
    dd_support = np.mean(sigmoid(w * a_s) * (1 - sigmoid(w * a_s)) * a_s ** 2)  # L_s''(w)
    w_adapted = w - lr * d_support
    d_query = np.mean((sigmoid(w_adapted * a_q) - y_q) * a_q)  # L_q'(w')
    return float(d_query if first_order else d_query * (1 - lr * dd_support))


def test_second_order_meta_gradient_matches_hand_derivation_and_differs_from_first_order():
    support = ([0.5, -1.0, 2.0, 1.5], [1, 0, 1, 0])
    query = ([1.0, -0.5, 0.3], [1, 0, 0])
    w, lr = 0.8, 0.9
    grads = {}
    for first_order in (True, False):
        model = ScaledMean(w)
        params = dict(model.named_parameters())
        episodes = [(scalar_batch(*support), scalar_batch(*query))]
        loss = meta_loss(model, params, episodes, inner_steps=1, inner_lr=lr, first_order=first_order)
        (grads[first_order],) = torch.autograd.grad(loss, [params["w"]])
        expected = _hand_meta_gradient(w, support, query, lr, first_order)
        assert float(grads[first_order]) == pytest.approx(expected, rel=1e-9)
    assert abs(float(grads[False]) - float(grads[True])) > 1e-3


def test_second_order_meta_gradient_matches_finite_differences_over_two_steps():
    support = scalar_batch([0.5, -1.0, 2.0, 1.5], [1, 0, 1, 0])
    query = scalar_batch([1.0, -0.5, 0.3], [1, 0, 0])

    def loss_at(w: float, create_graph: bool) -> tuple[torch.Tensor, dict]:
        model = ScaledMean(w)
        params = dict(model.named_parameters())
        return meta_loss(model, params, [(support, query)], 2, 0.7, first_order=not create_graph), params

    loss, params = loss_at(0.3, True)
    (gradient,) = torch.autograd.grad(loss, [params["w"]])
    h = 1e-6
    numeric = (float(loss_at(0.3 + h, True)[0].detach()) - float(loss_at(0.3 - h, True)[0].detach())) / (2 * h)
    assert float(gradient) == pytest.approx(numeric, rel=1e-6)


def test_adapt_and_meta_loss_refuse_bad_input():
    model = LinearOnTest(12)
    params = dict(model.named_parameters())
    good = random_batch(4, seed=0)
    with pytest.raises(ValueError, match="support set: labels must be 0"):
        adapt(model, params, PairBatch(good.reference, good.test, torch.full((4,), 2.0)), 1, 0.1)
    nan = good.test.clone()
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="support set: test images contain NaN"):
        adapt(model, params, PairBatch(good.reference, nan, good.label), 1, 0.1)
    with pytest.raises(ValueError, match="expected a PairBatch"):
        adapt(model, params, (good.reference, good.test, good.label), 1, 0.1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adapt(model, params, good, -1, 0.1)
    with pytest.raises(ValueError, match="does not require grad"):
        adapt(model, {k: p.detach() for k, p in params.items()}, good, 1, 0.1)
    with pytest.raises(ValueError, match="no episodes"):
        meta_loss(model, params, [], 1, 0.1)
    with pytest.raises(ValueError, match="query set of episode 0"):
        meta_loss(model, params, [(good, PairBatch(good.reference, nan, good.label))], 1, 0.1)


def square_sampler(tasks: int = 3, support: int = 8, query: int = 4, size: int = 32):
    """Tasks = products of one colour with texture; defective test images carry a bright square somewhere."""
    def episode(rng: np.random.Generator, n: int) -> PairBatch:
        base = torch.tensor(rng.uniform(-1.5, 1.5, size=(1, 3, 1, 1)), dtype=torch.float32)
        reference = base + 0.2 * torch.tensor(rng.normal(size=(n, 3, size, size)), dtype=torch.float32)
        test = base + 0.2 * torch.tensor(rng.normal(size=(n, 3, size, size)), dtype=torch.float32)
        label = torch.tensor(rng.permutation(np.arange(n) % 2), dtype=torch.float32)
        for i in np.flatnonzero(label.numpy()):
            top, left = rng.integers(0, size - 8, size=2)
            test[i, :, top:top + 8, left:left + 8] += 2.5
        return PairBatch(reference, test, label)

    def sample(rng: np.random.Generator) -> list[tuple[PairBatch, PairBatch]]:
        return [(episode(rng, support), episode(rng, query)) for _ in range(tasks)]

    return sample


def test_meta_training_lowers_the_query_loss_and_is_reproducible(one_torch_thread):
    def run(seed: int) -> tuple[dict, list[float]]:
        torch.manual_seed(0)
        model = MeDetectionNet("low", width=8)
        result = meta_train(model, square_sampler(), meta_steps=30, inner_steps=1, inner_lr=0.05, outer_lr=1e-2,
                            first_order=False, patience=None, seed=seed, progress=False)
        assert result.state.keys() == model.state_dict().keys()
        return {k: v.clone() for k, v in model.state_dict().items()}, result.history

    state, history = run(seed=5)
    assert len(history) == 30
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5])
    again, history_again = run(seed=5)
    assert history_again == history
    for key in state:
        torch.testing.assert_close(again[key], state[key], rtol=0, atol=0)
    other, _ = run(seed=6)
    assert any(not torch.equal(other[key], state[key]) for key in state)


def test_meta_training_stops_early_and_keeps_the_best_weights():
    model = LinearOnTest(12)
    fixed = [(random_batch(4, seed=0), random_batch(4, seed=1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # outer lr 0: the query loss never improves after the first step, which is the one kept
    result = meta_train(model, lambda rng: fixed, meta_steps=20, inner_lr=0.1, outer_lr=0.0, patience=3,
                        progress=False)
    assert result.stopped_early and result.best_step == 0 and len(result.history) == 4
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    with pytest.raises(ValueError, match="patience"):
        meta_train(model, lambda rng: fixed, meta_steps=2, patience=0, progress=False)


def test_converged_epoch_by_hand():
    assert converged_epoch([1.0, 0.5, 0.31, 0.3, 0.3]) == 3  # 0.31 is within 5% of 0.3, 0.5 is not
    assert converged_epoch([1.0, 0.5, 0.2, 0.4]) == 4  # the loss went up at the end: only the last epoch counts
    assert converged_epoch([0.7, 0.7]) == 1
    with pytest.raises(ValueError):
        converged_epoch([])


def test_fine_tune_learns_keeps_the_best_validation_weights_and_is_seeded(one_torch_thread):
    sample = square_sampler(tasks=1, support=32, query=16)
    train, validation = sample(np.random.default_rng(0))[0]

    def run(seed: int):
        torch.manual_seed(1)
        model = MeDetectionNet("none", width=8)
        result = fine_tune(model, train, validation, lr=1e-2, epochs=15, batch_size=8, patience=5, seed=seed)
        return model, result

    model, result = run(0)
    best = int(np.argmin(result.validation_loss))
    assert result.epochs_to_converge == best + 1
    assert result.train_loss[-1] < result.train_loss[0]
    with torch.no_grad():
        assert float(pair_loss(model, dict(model.named_parameters()), validation)) == pytest.approx(
            result.validation_loss[best], rel=1e-5)
    _, again = run(0)
    assert again.train_loss == result.train_loss
    _, other = run(1)
    assert other.train_loss != result.train_loss
    no_validation = fine_tune(MeDetectionNet("none", width=8), train, None, lr=1e-2, epochs=4, batch_size=16)
    assert no_validation.epochs_to_converge == converged_epoch(no_validation.train_loss)
    assert no_validation.validation_loss == []
    with pytest.raises(ValueError, match="fine-tuning training set: labels"):
        fine_tune(model, PairBatch(train.reference, train.test, train.label * 3), epochs=1)


def test_meta_training_gradient_task_by_task_equals_the_meta_loss_gradient():
    from fedinspect.meta.maml import accumulate_meta_gradient

    torch.manual_seed(3)
    model = LinearOnTest(12)
    episodes = [(random_batch(6, seed=i), random_batch(4, seed=10 + i)) for i in range(3)]
    params = dict(model.named_parameters())
    loss = meta_loss(model, params, episodes, inner_steps=2, inner_lr=0.5)
    expected = torch.autograd.grad(loss, list(params.values()))
    value = accumulate_meta_gradient(model, params, episodes, inner_steps=2, inner_lr=0.5, first_order=False)
    assert value == pytest.approx(float(loss.detach()), rel=1e-6)
    for p, g in zip(params.values(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)
