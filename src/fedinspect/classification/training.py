"""One client's local training: plain SGD, or DP-SGD with Opacus, and the evaluation of a model.

DP-SGD (Abadi et al., 2016), as the seed configures TensorFlow Privacy's DPKerasSGDOptimizer, run by
:func:`fedinspect.privacy.dp_sgd.train_dp_sgd` (shared with the trained anomaly detectors):

- every per-sample gradient is clipped to L2 norm ``max_grad_norm`` (1.0) and Gaussian noise of
  standard deviation ``noise_multiplier * max_grad_norm`` is added to their sum, divided by the
  expected logical batch size;
- gradient accumulation: a logical batch is ``accumulation_steps`` (4) physical batches of
  ``batch_size`` images; the optimizer steps (and the accountant counts a step) once per logical
  batch. Logical batches are drawn by Poisson sampling with rate ``batch_size * accumulation_steps
  / n`` (what the accountant assumes) and cut into physical batches by Opacus's
  ``BatchMemoryManager``;
- the privacy cost is tracked per client by Opacus's accountant (RDP by default). Its history
  (noise, sample rate, steps) is passed in and returned, so a client's epsilon is cumulative over
  all the rounds it trained in. The unit protected is one training image of that client.

Without DP the same logical batches (a seeded shuffle) and accumulation are used, with no clipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from torch.utils.data import TensorDataset

from fedinspect.privacy.dp_sgd import (
    ACCOUNTANTS,
    DEFAULT_DELTA,
    DPSGDSettings,
    epsilon_of,
    train_dp_sgd,
)

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class TrainSettings:
    """Local training of one round. ``noise_multiplier=None`` trains without DP-SGD.

    Defaults: Adam (lr 1e-3), 3 local epochs, logical batch 32 = 8 x 4 accumulation steps. The seed's
    SGD with lr 0.1 is ``optimizer="sgd", lr=0.1, momentum=0``; in 5 rounds on the magnetic-tile images
    SGD left the small CNN predicting "good" for everything, Adam did not.
    """

    local_epochs: int = 3
    batch_size: int = 8
    accumulation_steps: int = 4
    lr: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "adam"
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    poisson_sampling: bool = True
    lr_schedule: str = "constant"
    class_weight: str = "none"

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size", "accumulation_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose from {list(ACCOUNTANTS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose from {list(LR_SCHEDULES)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class weight {self.class_weight!r}; choose from {list(CLASS_WEIGHTS)}")
        if self.class_weight != "none" and self.noise_multiplier is not None:
            raise ValueError("class_weight 'balanced' weighs the loss by the client's class counts, which DP-SGD "
                             "does not protect: use it without DP")

    def lr_at(self, round_number: int, rounds: int) -> float:
        """The learning rate of round ``round_number`` (1-based) of ``rounds``: constant, or a cosine decay
        from ``lr`` in round 1 towards 0 (a round's local steps share its rate)."""
        if self.lr_schedule == "constant" or rounds <= 1:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (round_number - 1) / rounds))

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def logical_batch(self) -> int:
        return self.batch_size * self.accumulation_steps

    def delta_for(self, n: int) -> float:
        """``delta`` if set, else 1e-5 (or 1/n for a client with more than 1e5 images)."""
        return self.delta if self.delta is not None else min(DEFAULT_DELTA, 1.0 / max(n, 1))

    def sample_rate(self, n: int) -> float:
        """Opacus's Poisson rate: ``1 / ceil(n / logical batch)`` (expected batch at most the logical batch)."""
        return 1.0 / self.steps_per_epoch(n)

    def steps_per_epoch(self, n: int) -> int:
        """Optimizer steps per local epoch: ``ceil(n / logical batch)``, with or without Poisson sampling."""
        return math.ceil(n / self.logical_batch)

    def to_dict(self) -> dict:
        return asdict(self)

    def dp_sgd(self) -> DPSGDSettings:
        """The DP-SGD part of these settings (:mod:`fedinspect.privacy.dp_sgd`); only when ``dp``."""
        if self.noise_multiplier is None:
            raise ValueError("no noise multiplier: these settings train without DP-SGD")
        return DPSGDSettings(noise_multiplier=float(self.noise_multiplier), max_grad_norm=float(self.max_grad_norm),
                             delta=self.delta, accountant=self.accountant, batch_size=int(self.batch_size),
                             accumulation_steps=int(self.accumulation_steps),
                             poisson_sampling=bool(self.poisson_sampling))


@dataclass
class LocalResult:
    """What a client sends back (``state``, ``n_examples``) and what it keeps (``privacy_history``)."""

    state: dict[str, torch.Tensor]
    n_examples: int
    train_loss: float
    steps: int
    privacy_history: list[tuple[float, float, int]] = field(default_factory=list)
    epsilon: float | None = None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Balanced class weights ``n / (k * count)`` of the labels ``y`` (a class absent from ``y`` gets 0)."""
    counts = torch.bincount(y, minlength=n_classes).float()
    weights = len(y) / (n_classes * counts.clamp_min(1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, *, seed: int,
                privacy_history: Sequence[Sequence[float]] = (), lr: float | None = None,
                n_classes: int | None = None) -> LocalResult:
    """Train ``model`` in place on (x, y) for ``settings.local_epochs``; DP-SGD if a noise multiplier is set.

    ``seed`` fixes the batches, dropout and DP noise; ``privacy_history`` is the client's accountant
    history from earlier rounds (returned extended by this round). ``lr``: this round's learning rate
    (:meth:`TrainSettings.lr_at`; default ``settings.lr``). ``n_classes`` (default: from ``y``) sizes
    the balanced class weights.
    """
    n = len(y)
    if n == 0:
        raise ValueError("a client with no training image cannot train")
    torch.manual_seed(int(seed))  # dropout
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    rate = settings.lr if lr is None else float(lr)
    optimizer = (torch.optim.SGD(parameters, lr=rate, momentum=settings.momentum)
                 if settings.optimizer == "sgd" else torch.optim.Adam(parameters, lr=rate))
    weight = (class_weights(y, n_classes or int(y.max()) + 1) if settings.class_weight == "balanced" else None)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    if settings.dp:
        loss_sum, steps, history = _train_dp(model, optimizer, x, y, settings, seed, privacy_history, loss_fn)
        epsilon = epsilon_of(history, settings.delta_for(n), settings.accountant)
    else:
        loss_sum, steps = _train_plain(model, optimizer, x, y, settings, seed, loss_fn)
        history, epsilon = [], None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return LocalResult(state, n, loss_sum / max(1, n * settings.local_epochs), steps, history, epsilon)


def _train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 settings: TrainSettings, seed: int, loss_fn: nn.Module) -> tuple[float, int]:
    generator = _generator(seed)
    loss_sum, steps = 0.0, 0
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), settings.logical_batch):
            logical = order[start:start + settings.logical_batch]
            optimizer.zero_grad(set_to_none=True)
            for part in logical.split(settings.batch_size):  # gradient accumulation over physical batches
                loss = loss_fn(model(x[part]), y[part])
                (loss * len(part) / len(logical)).backward()
                loss_sum += loss.item() * len(part)
            optimizer.step()
            steps += 1
    return loss_sum, steps


def _train_dp(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              settings: TrainSettings, seed: int, privacy_history: Sequence[Sequence[float]],
              loss_fn: nn.Module) -> tuple[float, int, list[tuple[float, float, int]]]:
    run = train_dp_sgd(model, optimizer, TensorDataset(x, y), lambda net, xb, yb: loss_fn(net(xb), yb),
                       settings.dp_sgd(), epochs=settings.local_epochs, seed=seed, privacy_history=privacy_history)
    return run.loss_sum, run.steps, run.history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int, batch_size: int = 256) -> dict:
    """Accuracy, macro-F1, mean cross-entropy loss, predictions and the confusion matrix on (x, y)."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(y), batch_size)]) if len(y) else (
        torch.empty(0, n_classes))
    loss = float(nn.functional.cross_entropy(logits, y)) if len(y) else math.nan
    predicted = logits.argmax(dim=1).numpy()
    truth = y.numpy()
    labels = list(range(n_classes))
    return {
        "accuracy": float(np.mean(predicted == truth)) if len(y) else math.nan,
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "loss": loss,
        "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
        "predicted": predicted.tolist(),
    }
