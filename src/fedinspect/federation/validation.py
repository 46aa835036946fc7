"""Does a client's update fit the round it answers? One check, used by every transport.

:meth:`ClientUpdate.from_bytes` only says the bytes are well formed. The server then holds each
update against an :class:`UpdateSpec` built from the round it planned (:meth:`UpdateSpec.for_round`),
and :func:`receive` turns a reply into an update or an :class:`UpdateError` naming the client; the
runner records a rejected client in ``missing_clients`` and the round goes on without it.

What is checked:

- the sender: ``client_id`` in the bytes is the client that sent them; the precision is the round's;
- the categories: at least one, each a category of the round's dataset (so a name like ``../x`` or
  one the server does not evaluate is refused); embeddings of the backbone's width;
- the counts (``n_samples`` images, ``n_patches`` patches before the local coreset), which weight a
  client in aggregation, so a client can only claim what its rows and the plan allow:

  * rows: exactly ``coreset_size(n_patches, local_coreset_ratio)`` (the client's own rule), or, with
    DP at the ``image`` unit, between 1 and ``dp_clusters`` noisy centres;
  * patches per image: an image's short side is resized to ``image_size``, so it gives at least
    ``ceil(image_size / stride) ** 2`` patches and, for aspect ratios up to :data:`MAX_ASPECT_RATIO`,
    at most ``ceil(image_size / stride) * ceil(MAX_ASPECT_RATIO * image_size / stride)``; hence
    ``n_samples * min <= n_patches <= n_samples * max``;
  * when the plan itself assigned the client's images (the in-process runner, Flower's simulation,
    a SuperNode without its own ``data-dir``): ``n_samples`` per category equals the plan's.

  Together: without image-level DP, ``n_patches`` is pinned by the rows sent (within
  ``1 / local_coreset_ratio``), and ``n_samples`` by ``n_patches``, so influence costs rows. With DP at
  the image unit and a client's own data, the rows say nothing about the counts: the checks above
  still bound ``n_patches`` by ``n_samples`` but ``n_samples`` itself is the client's word; use a robust
  strategy there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedinspect.detectors.coreset import coreset_size
from fedinspect.federation.update import PRECISIONS, ClientUpdate, UpdateError

if TYPE_CHECKING:
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.federation.client import RoundSettings

# Widest image (long side / short side) whose patch count an honest client may report. AutoVI's
# images are about 16:9, KolektorSDD2's about 1:2.7, and the letterbox keeps strips of 5:1 and more,
# so the bound is generous: it buys a liar no weight (more patches per image means fewer images), it
# only refuses claims no camera makes, and refusing an honest factory's strips would be worse.
MAX_ASPECT_RATIO = 16.0


@dataclass(frozen=True)
class UpdateSpec:
    """What the server expects of every update of one round."""

    categories: frozenset[str]
    dim: int  # embedding width: the backbone's feature dimension
    precision: str
    image_size: int  # short side after resizing
    stride: int  # of the embedding grid
    coreset_ratio: float  # the clients' local coreset ratio
    dp_clusters: int | None = None  # DP at the image unit: rows are at most this many noisy centres
    # client id -> category -> training images the plan gave that client (clients the plan fed only)
    assigned: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if min(self.dim, self.image_size, self.stride) < 1 or not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"invalid update spec: {self}")

    @classmethod
    def for_round(cls, settings: RoundSettings, detector: PatchCore, categories: Iterable[str],
                  assigned: Mapping[str, Mapping[str, int]] | None = None) -> UpdateSpec:
        """The spec of a round: its settings, the server's detector (width, stride), its categories."""
        privacy = settings.bank_privacy()
        return cls(
            categories=frozenset(categories), dim=detector.features.dim, precision=settings.precision,
            image_size=settings.image_size, stride=detector.features.stride,
            coreset_ratio=settings.local_coreset_ratio,
            dp_clusters=privacy.clusters if privacy is not None and privacy.unit == "image" else None,
            assigned=dict(assigned or {}),
        )

    def patches_per_image(self) -> tuple[int, int]:
        """Fewest and most patches one image can give (short side resized to ``image_size``)."""
        short = math.ceil(self.image_size / self.stride)
        return short * short, short * math.ceil(self.max_aspect_ratio * self.image_size / self.stride)

    def check(self, update: ClientUpdate, sender: str) -> None:
        """Raise :class:`UpdateError` (naming ``sender``) unless ``update`` fits this round."""
        def refuse(problem: str) -> UpdateError:
            return UpdateError(f"{sender}: update rejected: {problem}")

        if update.client_id != sender:
            raise refuse(f"it says it is from {update.client_id!r}")
        if update.precision != self.precision:
            raise refuse(f"precision {update.precision!r}, the round asked for {self.precision!r}")
        if not update.categories:
            raise refuse("no category")
        unknown = sorted(set(update.categories) - self.categories)
        if unknown:
            raise refuse(f"unknown categories {unknown!r} (the round's: {sorted(self.categories)})")
        fewest, most = self.patches_per_image()
        planned = self.assigned.get(sender)
        if planned is not None and set(update.categories) != {c for c, n in planned.items() if n > 0}:
            raise refuse(f"categories {sorted(update.categories)}, the plan gave it {sorted(planned)}")
        for name, part in sorted(update.categories.items()):
            rows, width = part.embeddings.shape
            if width != self.dim:
                raise refuse(f"{name}: embeddings of width {width}, the round's backbone gives {self.dim}")
            if planned is not None and part.n_samples != planned[name]:
                raise refuse(f"{name}: n_samples {part.n_samples}, the plan gave it {planned[name]} images")
            if part.n_samples < 1:
                raise refuse(f"{name}: n_samples must be at least 1, got {part.n_samples}")
            if not part.n_samples * fewest <= part.n_patches <= part.n_samples * most:
                raise refuse(f"{name}: n_patches {part.n_patches} is impossible for {part.n_samples} images "
                             f"({fewest} to {most} patches each at image size {self.image_size})")
            if self.dp_clusters is not None:
                if not 1 <= rows <= self.dp_clusters:
                    raise refuse(f"{name}: {rows} rows, DP at the image unit sends 1 to {self.dp_clusters}")
            elif rows != coreset_size(part.n_patches, self.coreset_ratio):
                raise refuse(f"{name}: {rows} rows, a local coreset of {part.n_patches} patches at ratio "
                             f"{self.coreset_ratio:g} has {coreset_size(part.n_patches, self.coreset_ratio)}")


def receive(payload: bytes, sender: str, spec: UpdateSpec) -> ClientUpdate:
    """Parse and check one client's update bytes; :class:`UpdateError` names ``sender`` and the problem."""
    update = ClientUpdate.from_bytes(payload, source=sender)
    spec.check(update, sender)
    return update
