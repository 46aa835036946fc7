"""DP-SGD with Opacus, shared by the PIDS classifiers and the trained anomaly detectors.

DP-SGD (Abadi et al., 2016) as Opacus 1.6 runs it:

- every per-sample gradient is clipped to L2 norm ``max_grad_norm`` and Gaussian noise of standard
  deviation ``noise_multiplier * max_grad_norm`` is added to their sum, divided by the expected logical
  batch size;
- a logical batch is ``accumulation_steps`` physical batches of at most ``batch_size`` samples: logical
  batches are drawn by Poisson sampling with rate ``1 / ceil(n / logical batch)`` (what the accountant
  assumes) and cut into physical ones by Opacus's ``BatchMemoryManager``; the optimizer steps, and the
  accountant counts a step, once per logical batch;
- the privacy cost is tracked by an Opacus accountant (RDP by default) whose history, a list of
  (noise multiplier, sample rate, steps), is passed in and returned extended, so that a party's epsilon
  is cumulative over every call (every federated round) it trained in.

The unit protected is one sample of the dataset given (one training image of a client). The loss given
to :func:`train_dp_sgd` must be the *mean* over the batch of per-sample losses and must not mix samples
(no BatchNorm, no contrastive term): Opacus then recovers each sample's gradient exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedinspect.errors import SettingsError
from fedinspect.quiet_warnings import ignoring

ACCOUNTANTS = ("rdp", "prv", "gdp")
DEFAULT_DELTA = 1e-5

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class DPSGDSettings:
    """What DP-SGD needs besides the model and the data (see the module docstring).

    ``delta=None``: 1e-5, or 1/n for a party with more than 1e5 samples. ``batch_size`` is the physical
    batch (what fits in memory), ``batch_size * accumulation_steps`` the expected logical batch.
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    batch_size: int = 8
    accumulation_steps: int = 4
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        number = (int, float)
        if isinstance(self.noise_multiplier, bool) or not isinstance(self.noise_multiplier, number) \
                or not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise SettingsError(f"noise multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, number) \
                or not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise SettingsError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.delta is not None and (isinstance(self.delta, bool) or not isinstance(self.delta, number)
                                       or not 0 < self.delta < 1):
            raise SettingsError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise SettingsError(f"unknown accountant {self.accountant!r}; choose from {list(ACCOUNTANTS)}")
        for name in ("batch_size", "accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.poisson_sampling, bool):
            raise SettingsError(f"poisson_sampling must be true or false, got {self.poisson_sampling!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DPSGDSettings:
        """Settings from a mapping (a configuration file); an unknown or missing key is a SettingsError."""
        if not isinstance(values, Mapping):
            raise SettingsError(f"DP-SGD settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown DP-SGD setting(s) {unknown}; known: {sorted(known)}")
        if "noise_multiplier" not in values:
            raise SettingsError("DP-SGD settings need a noise_multiplier")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def logical_batch(self) -> int:
        return self.batch_size * self.accumulation_steps

    def delta_for(self, n: int) -> float:
        """``delta`` if set, else 1e-5 (or 1/n for a party with more than 1e5 samples)."""
        return self.delta if self.delta is not None else min(DEFAULT_DELTA, 1.0 / max(n, 1))

    def steps_per_epoch(self, n: int) -> int:
        """Optimizer steps per epoch: ``ceil(n / logical batch)``, with or without Poisson sampling."""
        return math.ceil(n / self.logical_batch)

    def sample_rate(self, n: int) -> float:
        """Opacus's Poisson rate: ``1 / ceil(n / logical batch)`` (expected batch at most the logical batch)."""
        return 1.0 / self.steps_per_epoch(n)


@dataclass
class DPSGDRun:
    """What :func:`train_dp_sgd` did: the extended accountant ``history``, optimizer ``steps`` taken in this
    call, per epoch the sum of the batch losses times their sizes with the number of samples seen, and the
    seconds from the start of the call to the end of each epoch."""

    history: History
    steps: int
    epoch_losses: list[tuple[float, int]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def loss_sum(self) -> float:
        return sum(total for total, _ in self.epoch_losses)


def check_history(history: Sequence[Sequence[float]], source: str = "privacy history") -> History:
    """``history`` as (noise multiplier, sample rate, steps) tuples, or SettingsError naming ``source``.

    A history comes back from a party's memory between rounds: each entry must be a finite noise >= 0,
    a rate in (0, 1] and a whole number of steps >= 0.
    """
    if isinstance(history, str | bytes) or not isinstance(history, Sequence):
        raise SettingsError(f"{source}: must be a list of (noise multiplier, sample rate, steps), got "
                            f"{type(history).__name__}")
    checked: History = []
    for i, entry in enumerate(history):
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 3:
            raise SettingsError(f"{source}: entry {i} must be (noise multiplier, sample rate, steps), got {entry!r}")
        sigma, rate, steps = entry
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in entry):
            raise SettingsError(f"{source}: entry {i} holds a non-number: {entry!r}")
        if not (math.isfinite(sigma) and sigma >= 0 and math.isfinite(rate) and 0 < rate <= 1
                and float(steps).is_integer() and steps >= 0):
            raise SettingsError(f"{source}: entry {i} {entry!r} is out of range (noise >= 0, rate in (0, 1], "
                                f"steps a whole number >= 0)")
        checked.append((float(sigma), float(rate), int(steps)))
    return checked


def make_accountant(kind: str, history: Sequence[Sequence[float]] = ()) -> Any:
    """An Opacus accountant of ``kind`` (rdp, prv, gdp) holding ``history``."""
    from opacus.accountants import create_accountant

    if kind not in ACCOUNTANTS:
        raise SettingsError(f"unknown accountant {kind!r}; choose from {list(ACCOUNTANTS)}")
    accountant = create_accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def epsilon_of(history: Sequence[Sequence[float]], delta: float, kind: str = "rdp") -> float:
    """The accountant's epsilon for ``history`` at ``delta`` (inf with zero noise; 0 before any step)."""
    if not history:
        return 0.0
    if any(float(entry[0]) == 0.0 for entry in history):
        return math.inf
    with ignoring(UserWarning, message="Optimal order"):  # "... is the smallest alpha": tiny noise, huge epsilon
        return float(make_accountant(kind, history).get_epsilon(delta))


def smallest_noise(plan: Callable[[float], Sequence[Sequence[float]]], target_epsilon: float, delta: float,
                   kind: str = "rdp", tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier ``sigma`` whose planned history ``plan(sigma)`` spends at most
    ``target_epsilon`` at ``delta``, to ``tolerance`` of the target (the bisection of Opacus's
    ``get_noise_multiplier``, over a whole history: several releases whose noises all scale with ``sigma``).
    """
    if not (0 < target_epsilon < math.inf):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")

    def spent(sigma: float) -> float:
        return epsilon_of(plan(sigma), delta, kind)

    high = 1.0
    while spent(high) > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 spends at most epsilon {target_epsilon}")
    low = high / 2.0
    while low > 1e-6 and spent(low) <= target_epsilon:
        high, low = low, low / 2.0
    while target_epsilon - spent(high) > target_epsilon * tolerance and high - low > 1e-9 * high:
        middle = (low + high) / 2.0
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def compact_history(history: Sequence[Sequence[float]]) -> History:
    """Merge consecutive entries with the same noise and sample rate (Opacus already does; kept exact)."""
    merged: History = []
    for sigma, rate, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def train_dp_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                 loss_fn: Callable[..., torch.Tensor], settings: DPSGDSettings, *, epochs: int, seed: int,
                 privacy_history: Sequence[Sequence[float]] = (),
                 after_noise: Callable[[], None] | None = None) -> DPSGDRun:
    """Run ``epochs`` epochs of DP-SGD on ``model`` (in place, in train mode) over ``dataset``.

    ``loss_fn(model, *batch)`` returns the mean over the batch of per-sample losses; it receives ``model``
    itself (Opacus's hooks sit on its layers), so it may call any of its methods. Only parameters with
    ``requires_grad`` get per-sample gradients: a frozen part (a pretrained teacher) costs no more than
    its forward pass. ``optimizer`` holds the trained parameters. ``seed`` fixes the Poisson sampling
    (seed) and the noise (seed + 1). ``after_noise``, if given, runs after the noise is added and before
    the optimizer's update: a data-independent gradient term (FedProx's proximal term) added there is
    post-processing and costs no privacy. Returns the accountant's history extended by this call.

    Raises:
        SettingsError: an empty dataset, or a model Opacus cannot train privately (its message).
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise SettingsError("DP-SGD needs at least one training sample")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SettingsError(f"epochs must be an integer >= 1, got {epochs!r}")
    privacy_history = check_history(privacy_history)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    loader = DataLoader(dataset, batch_size=settings.logical_batch, shuffle=True, generator=_generator(seed))
    with ignoring(Warning, message=".*secure RNG"), ignoring(Warning, message=".*full_backward_hook"):
        engine = PrivacyEngine(accountant=settings.accountant)
        engine.accountant = make_accountant(settings.accountant, privacy_history)
        try:
            private_model, private_optimizer, private_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=settings.noise_multiplier,
                max_grad_norm=settings.max_grad_norm, poisson_sampling=settings.poisson_sampling,
                noise_generator=_generator(seed + 1),
            )
        except (NotImplementedError, ValueError) as error:  # opacus.validators.errors.UnsupportedModuleError
            raise SettingsError(f"Opacus cannot train this model with DP-SGD: {error}") from error
        if after_noise is not None:
            accountant_hook = private_optimizer.step_hook

            def hook(optimizer_: Any) -> None:
                if accountant_hook is not None:
                    accountant_hook(optimizer_)
                after_noise()

            private_optimizer.step_hook = hook
        epoch_losses: list[tuple[float, int]] = []
        epoch_seconds: list[float] = []
        start = time.perf_counter()
        try:
            for _ in range(epochs):
                loss_sum, seen = 0.0, 0
                with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=settings.batch_size,
                                        optimizer=private_optimizer) as batches:
                    for batch in batches:
                        private_optimizer.zero_grad(set_to_none=True)
                        size = len(batch[0])
                        if size:
                            loss = loss_fn(model, *batch)
                            loss.backward()
                            loss_sum += loss.item() * size
                            seen += size
                        else:  # an empty Poisson batch: no gradient, but the step (and its noise) still counts
                            for p in trained:
                                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                        private_optimizer.step()  # a real step only at the end of a logical batch
                epoch_losses.append((loss_sum, seen))
                epoch_seconds.append(time.perf_counter() - start)
        finally:
            private_model._close()
            for p in trained:
                for name in ("grad_sample", "summed_grad", "_forward_counter"):
                    if hasattr(p, name):
                        delattr(p, name)
    history = compact_history(engine.accountant.history)
    steps = sum(entry[2] for entry in history) - sum(entry[2] for entry in privacy_history)
    return DPSGDRun(history, steps, epoch_losses, epoch_seconds)
