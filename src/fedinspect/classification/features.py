"""Features of a frozen backbone, per image: pooled, averaged over the image's symmetric views, projected.

Every transform here reads one image only and uses no learned statistic, so it costs no privacy: DP-SGD's
clipping and noise come after it, and test images get the same transform.

- :func:`pooled_features`: the backbone's pooled features of a batch of images.
- :func:`view_averaged_features`: the features of the image's ``views`` dihedral views (flips and
  rotations by 90 degrees, :data:`DIHEDRAL_VIEWS`), each standardized over its own features, then averaged.
  A surface defect is a defect in any orientation, so the average keeps what classifies and halves, or
  better, the part of each feature vector that depends on the orientation alone.
- :func:`random_projection` and :func:`to_sphere`: a fixed, seeded random orthogonal map to ``k``
  dimensions, then each row scaled to unit norm. Fewer dimensions need less DP noise in total, and unit
  norm bounds each image's share of a sum by 1 (the sensitivity of the federation's DP mean).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from fedinspect.classification.models import standardize

# the 8 symmetries of a square image (N, C, H, W): the first 2, 4 or 8 are each a group, so the average
# over them does not change when the image is flipped (2), or flipped and turned by 180 degrees (4, 8)
DIHEDRAL_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "hflip": lambda t: t.flip(3),
    "vflip": lambda t: t.flip(2),
    "rot180": lambda t: t.flip(2).flip(3),
    "transpose": lambda t: t.transpose(2, 3),
    "rot90": lambda t: t.transpose(2, 3).flip(2),
    "rot270": lambda t: t.transpose(2, 3).flip(3),
    "antitranspose": lambda t: t.transpose(2, 3).flip(2).flip(3),
}
VIEW_COUNTS = (1, 2, 4, 8)


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 32, progress: bool = False,
                    desc: str = "features") -> torch.Tensor:
    """Pooled backbone features (N, D) of float images (N, 3, S, S)."""
    parts = [backbone(images[i:i + batch_size]) for i in
             tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False)]
    return torch.cat(parts) if parts else torch.empty(0, backbone.out_features)


def dihedral_views(views: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The first ``views`` (1, 2, 4 or 8) of :data:`DIHEDRAL_VIEWS`."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {list(VIEW_COUNTS)}, got {views!r}")
    return list(DIHEDRAL_VIEWS.values())[:views]


@torch.no_grad()
def view_averaged_features(backbone: nn.Module, images: torch.Tensor, views: int, batch_size: int = 32,
                           progress: bool = False, desc: str = "features") -> torch.Tensor:
    """The mean over ``views`` dihedral views of each image of its standardized pooled features (N, D).

    ``images`` must be square (N, 3, S, S): a transposed view has the same shape.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral views need square images, got {tuple(images.shape[-2:])}")
    total: torch.Tensor | None = None
    for i, view in enumerate(dihedral_views(views)):
        features = standardize(pooled_features(backbone, view(images), batch_size, progress,
                                               f"{desc} (view {i + 1}/{views})"))
        total = features if total is None else total + features
    assert total is not None
    return total / views


def random_projection(in_features: int, k: int, seed: int) -> torch.Tensor:
    """A (in_features, k) matrix with orthonormal columns: the Q of a seeded Gaussian matrix's QR
    decomposition, signs fixed so that R's diagonal is positive (the same seed gives the same map)."""
    if not 1 <= k <= in_features:
        raise ValueError(f"cannot project {in_features} features to {k} dimensions (want 1 <= k <= {in_features})")
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(in_features, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def to_sphere(features: torch.Tensor, projection: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``features`` (times ``projection``) scaled to unit L2 norm (a zero row stays zero)."""
    x = features if projection is None else features @ projection
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
