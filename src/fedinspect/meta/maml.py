"""MAML (Finn, Abbeel & Levine 2017; seed 002, Algorithm 1, Eq. 2-5) with ``torch.func``, and plain fine-tuning.

The inner loop is functional: the parameters are a dict of tensors, the model is evaluated with
``torch.func.functional_call`` and each SGD step (Eq. 4) builds new tensors ``theta - alpha * grad`` without touching
the module. Second order keeps the graph of the inner gradients (``create_graph=True``), so the meta-gradient
(Eq. 5) differentiates through them; first order (FOMAML) treats the inner gradients as constants, so the
meta-gradient is the query gradient at the adapted weights.

Losses are binary cross-entropy with logits, averaged over the pairs of a batch (Eq. 3, as a mean rather than a
sum so that the learning rates do not depend on the batch size) and over the tasks of a meta-batch (Eq. 2 sums;
a mean only rescales the gradient, which Adam normalises away).

Only the parameters that require grad are meta-learned: a frozen pretrained stem stays as it is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

if TYPE_CHECKING:
    from fedinspect.meta.pairs import PairBatch

Episode = tuple["PairBatch", "PairBatch"]  # (support, query) of one task
EpisodeSampler = Callable[[np.random.Generator], Sequence[Episode]]


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require grad, by name: the weights MAML learns (the module's own tensors)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params


def check_batch(batch: PairBatch, what: str = "batch") -> None:
    """Raise ValueError naming ``what`` unless ``batch`` is a non-empty PairBatch with finite images and 0/1 labels.

    Batches may come from another party (a federated client's tasks), so nothing is taken on trust.
    """
    from fedinspect.meta.pairs import PairBatch

    if not isinstance(batch, PairBatch):
        raise ValueError(f"{what}: expected a PairBatch, got {type(batch).__name__}")
    if len(batch) == 0:
        raise ValueError(f"{what}: the batch is empty")
    for name in ("reference", "test"):
        if not torch.isfinite(getattr(batch, name)).all():
            raise ValueError(f"{what}: {name} images contain NaN or infinite values")
    if not ((batch.label == 0) | (batch.label == 1)).all():
        raise ValueError(f"{what}: labels must be 0 (good) or 1 (defective), got {batch.label.unique().tolist()}")


def pair_loss(model: nn.Module, params: Mapping[str, torch.Tensor], batch: PairBatch) -> torch.Tensor:
    """Mean BCE-with-logits of ``model`` evaluated with ``params`` (others: the module's own) on ``batch``."""
    logits = functional_call(model, dict(params), (batch.reference, batch.test))
    return F.binary_cross_entropy_with_logits(logits, batch.label.to(logits.dtype))


def adapt(model: nn.Module, params: Mapping[str, torch.Tensor], support: PairBatch, steps: int, inner_lr: float,
          first_order: bool = False) -> dict[str, torch.Tensor]:
    """``steps`` functional SGD steps on ``support`` from ``params`` (Eq. 4): theta' = theta - alpha * grad.

    With ``first_order`` the gradients are detached (FOMAML); otherwise their graph is kept so that a loss of the
    returned parameters can be differentiated with respect to ``params`` through the adaptation.
    """
    if steps < 0:
        raise ValueError(f"adapt: steps must be >= 0, got {steps}")
    if not (math.isfinite(inner_lr) and inner_lr >= 0):
        raise ValueError(f"adapt: inner_lr must be a finite number >= 0, got {inner_lr}")
    check_batch(support, "support set")
    params = dict(params)
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"adapt: parameter {name!r} does not require grad; pass the trainable parameters")
    for _ in range(steps):
        loss = pair_loss(model, params, support)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order, allow_unused=True)
        params = {name: p if g is None else p - inner_lr * g
                  for (name, p), g in zip(params.items(), grads, strict=True)}
    return params


def meta_loss(model: nn.Module, params: Mapping[str, torch.Tensor], episodes: Sequence[Episode], inner_steps: int,
              inner_lr: float, first_order: bool = False) -> torch.Tensor:
    """Eq. 2: the query loss of each task after adapting on its support set, averaged over the tasks."""
    if not episodes:
        raise ValueError("meta_loss: no episodes")
    losses = [_episode_loss(model, params, episode, index, inner_steps, inner_lr, first_order)
              for index, episode in enumerate(episodes)]
    return torch.stack(losses).mean()


def _episode_loss(model: nn.Module, params: Mapping[str, torch.Tensor], episode: Episode, index: int,
                  inner_steps: int, inner_lr: float, first_order: bool) -> torch.Tensor:
    """Query loss of one (support, query) episode after adaptation on its support set."""
    if not isinstance(episode, (tuple, list)) or len(episode) != 2:
        raise ValueError(f"meta_loss: episode {index} must be a (support, query) pair of PairBatch")
    support, query = episode
    check_batch(support, f"support set of episode {index}")
    check_batch(query, f"query set of episode {index}")
    adapted = adapt(model, params, support, inner_steps, inner_lr, first_order)
    return pair_loss(model, adapted, query)


def accumulate_meta_gradient(model: nn.Module, params: Mapping[str, torch.Tensor], episodes: Sequence[Episode],
                              inner_steps: int, inner_lr: float, first_order: bool) -> float:
    """Add the gradient of :func:`meta_loss` to the parameters' ``.grad``, one task at a time; return the loss.

    The same gradient as ``meta_loss(...).backward()``, but each task's graph (with second order, the graph of its
    inner gradients, several times the size of a forward pass) is freed before the next task is adapted.
    """
    if not episodes:
        raise ValueError("meta_train: sample_episodes returned no episodes")
    total = 0.0
    for index, episode in enumerate(episodes):
        loss = _episode_loss(model, params, episode, index, inner_steps, inner_lr, first_order) / len(episodes)
        loss.backward()
        total += float(loss.detach())
    return total


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns. ``state`` is also loaded into the model."""

    state: dict[str, torch.Tensor]  # the model's state_dict at the best meta-step
    history: list[float]  # query loss (Eq. 2, after adaptation) of every meta-step, before its update
    best_step: int  # index into history of the weights kept
    stopped_early: bool


def meta_train(model: nn.Module, sample_episodes: EpisodeSampler, *, meta_steps: int = 1000, inner_steps: int = 1,
               inner_lr: float = 1e-5, outer_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
               first_order: bool = False, patience: int | None = 50, seed: int = 0,
               progress: bool = True) -> MetaTrainResult:
    """Meta-train ``model`` with MAML (Algorithm 1): Adam on the mean query loss of the sampled tasks (Eq. 5).

    ``sample_episodes(rng)`` draws a meta-batch of (support, query) episodes; ``rng`` is a numpy Generator seeded
    with ``seed``, so the same seed and initial weights give the same trained weights. Defaults are the seed's:
    inner lr 1e-5, outer lr 1e-3, Adam betas (0.5, 0.999).

    Early stopping: the query loss of a meta-step is that of the weights before its update; the weights with the
    lowest query loss so far are kept, and training stops after ``patience`` meta-steps without a new lowest
    (None: never). The query loss is that of freshly drawn tasks, so it is noisy; the kept weights are the best
    draw, not a smoothed optimum.
    """
    if meta_steps < 1:
        raise ValueError(f"meta_train: meta_steps must be >= 1, got {meta_steps}")
    if patience is not None and patience < 1:
        raise ValueError(f"meta_train: patience must be >= 1 or None, got {patience}")
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params.values(), lr=outer_lr, betas=betas)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    best_loss, best_step, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    stopped_early = False
    bar = _progress(meta_steps, "meta-train", progress)
    try:
        for step in range(meta_steps):
            optimizer.zero_grad(set_to_none=True)
            value = accumulate_meta_gradient(model, params, sample_episodes(rng), inner_steps, inner_lr, first_order)
            if not math.isfinite(value):
                raise FloatingPointError(f"meta_train: query loss became {value} at meta-step {step}")
            history.append(value)
            if value < best_loss:
                best_loss, best_step, best_state = value, step, copy.deepcopy(model.state_dict())
            elif patience is not None and step - best_step >= patience:
                stopped_early = True
                break
            optimizer.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(query_loss=f"{value:.4f}", best=f"{best_loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    model.load_state_dict(best_state)
    return MetaTrainResult(state=best_state, history=history, best_step=best_step, stopped_early=stopped_early)


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` returns. ``state`` is also loaded into the model.

    ``epochs_to_converge`` (1-based): with a validation set, the epoch of the lowest validation loss (the weights
    kept); without one, the first epoch from which the training loss stays within 5% of its final value.
    """

    state: dict[str, torch.Tensor]
    train_loss: list[float] = field(default_factory=list)  # mean training loss of each epoch
    validation_loss: list[float] = field(default_factory=list)  # after each epoch (empty without validation)
    epochs_to_converge: int = 0
    stopped_early: bool = False


def fine_tune(model: nn.Module, train: PairBatch, validation: PairBatch | None = None, *, lr: float = 1e-4,
              epochs: int = 100, batch_size: int = 64, patience: int | None = 10,
              betas: tuple[float, float] = (0.5, 0.999), seed: int = 0, progress: bool = False) -> FineTuneResult:
    """Adam training of ``model`` from its current weights on ``train`` (the target task; seed: lr 1e-4).

    Mini-batches are shuffled with a generator seeded by ``seed``. With ``validation``, training stops after
    ``patience`` epochs without a lower validation loss and the best weights are kept; without it, all ``epochs``
    run and the last weights are kept. See :class:`FineTuneResult` for "epochs to converge".
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"fine_tune: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if patience is not None and patience < 1:
        raise ValueError(f"fine_tune: patience must be >= 1 or None, got {patience}")
    check_batch(train, "fine-tuning training set")
    if validation is not None:
        check_batch(validation, "fine-tuning validation set")
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params.values(), lr=lr, betas=betas)
    generator = torch.Generator().manual_seed(seed)
    result = FineTuneResult(state={})
    best_loss, best_epoch, best_state = math.inf, 0, None
    bar = _progress(epochs, "fine-tune", progress)
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            total = 0.0
            for start in range(0, len(train), batch_size):
                index = order[start:start + batch_size]
                logits = model(train.reference[index], train.test[index])
                loss = F.binary_cross_entropy_with_logits(logits, train.label[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            result.train_loss.append(total / len(train))
            if bar is not None:
                bar.update(1)
            if validation is None:
                continue
            with torch.no_grad():
                value = float(pair_loss(model, params, validation))
            result.validation_loss.append(value)
            if value < best_loss:
                best_loss, best_epoch, best_state = value, epoch, copy.deepcopy(model.state_dict())
            elif patience is not None and epoch - best_epoch >= patience:
                result.stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
        result.epochs_to_converge = best_epoch + 1
    else:
        result.epochs_to_converge = converged_epoch(result.train_loss)
    result.state = copy.deepcopy(model.state_dict())
    return result


def converged_epoch(losses: Sequence[float], tolerance: float = 0.05) -> int:
    """First epoch (1-based) from which every loss stays within ``tolerance`` (relative) of the final loss."""
    if not losses:
        raise ValueError("converged_epoch: no losses")
    final = losses[-1]
    epoch = len(losses)
    for i in range(len(losses) - 1, -1, -1):
        if abs(losses[i] - final) > tolerance * abs(final):
            break
        epoch = i + 1
    return epoch


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False)
