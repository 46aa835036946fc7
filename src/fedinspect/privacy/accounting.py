"""Privacy accounting: epsilon of (subsampled, composed) Gaussian mechanisms, and the noise for a target.

Thin, documented wrappers over Opacus's accountants, so that every epsilon fedinspect reports
comes from a real accountant:

- ``"rdp"``: Rényi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar, Zhang
  2019) converted to (epsilon, delta) with the conversion of Balle et al. 2020. An upper bound.
- ``"prv"``: privacy random variables (Gopi, Lee, Wutschitz 2021): numerically tight, with an
  error of at most ``eps_error``.

A mechanism is described by its noise multiplier ``z`` (noise standard deviation divided by the
L2 sensitivity of what is released), the sampling rate ``q`` (1.0: every record is used in every
step) and the number of steps composed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fedinspect.quiet_warnings import ignoring

if TYPE_CHECKING:
    from opacus.accountants import PRVAccountant, RDPAccountant

# Opacus (and the scipy.stats and torch.distributed it pulls in) is imported where an epsilon is computed:
# the command line's start-up does not pay for it.

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5


def _check(noise_multiplier: float, delta: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _accountant(name: str) -> RDPAccountant | PRVAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {name!r}; choose from {list(ACCOUNTANTS)}")


def epsilon(noise_multiplier: float, delta: float = DEFAULT_DELTA, sample_rate: float = 1.0, steps: int = 1,
            accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of ``steps`` compositions of the sampled Gaussian mechanism."""
    _check(noise_multiplier, delta, sample_rate, steps)
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    # "optimal order is the largest alpha" (tiny noise: epsilon is huge anyway); log(1 - q) at q = 1 in PRV
    with ignoring(UserWarning), np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, delta: float = DEFAULT_DELTA, sample_rate: float = 1.0,
                         steps: int = 1, accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier whose epsilon (by ``accountant``) is within ``tolerance`` below the target."""
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier

    _check(1.0, delta, sample_rate, steps)
    _accountant(accountant)
    with ignoring(UserWarning), np.errstate(divide="ignore"):  # the search probes tiny noise first
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              epsilon_tolerance=tolerance))
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} over {steps} step(s) needs more noise than "
                             f"the {accountant} accountant searches: {error}") from error
