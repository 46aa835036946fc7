"""The labelled view of a category for defect classification, its split and the clients' shares.

Classes are ``good`` followed by the defect types (sorted), as in the seed's six AOI classes. Every
image of the category is used: ``train/good`` and every ``test/<class>`` folder (the anomaly
detection split does not matter here). The seed's protocol splits the labelled images 80/20,
stratified by class; the training part is then dealt to the clients, IID or label-skewed
(Dirichlet), by :func:`fedinspect.federation.partition.partition`.

Images are resized to a fixed square (bilinear), then obfuscated (the seed obfuscates the resized
images), then scaled to float tensors. ``resize="squash"`` stretches each image to the square (the
seed); ``"letterbox"`` keeps its aspect ratio and pads with mid-grey (the magnetic tiles range from
1:3 to 2:1, so squashing distorts their defects' shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fedinspect.data.dataset import GOOD, CategoryDataset, find_categories
from fedinspect.data.images import read_image
from fedinspect.errors import DataError
from fedinspect.federation.partition import partition
from fedinspect.privacy.obfuscation import Obfuscation

PARTITIONS = ("iid", "dirichlet")
RESIZES = ("squash", "letterbox")
PAD_VALUE = 128  # mid-grey: about 0 after the backbones' input normalization


@dataclass(frozen=True)
class LabelledImage:
    """One image with its class index."""

    path: Path
    label: int


@dataclass(frozen=True)
class LabelledView:
    """All images of one category with class labels; ``classes[0]`` is ``good``."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[LabelledImage, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=True)}

    def subset(self, indices: Sequence[int]) -> LabelledView:
        return LabelledView(self.root, self.classes, tuple(self.items[i] for i in indices))


def labelled_view(data_dir: str | Path) -> LabelledView:
    """The labelled images of one category folder (AutoVI or MVTec AD layout).

    Raises:
        DataError: the folder holds several categories (pass one), or fewer than two classes.
    """
    categories = find_categories(data_dir)
    if len(categories) != 1:
        names = ", ".join(c.name for c in categories)
        raise DataError(data_dir, f"holds {len(categories)} categories ({names}); classification needs one "
                                  f"category folder, e.g. --data {categories[0]}")
    dataset = CategoryDataset(categories[0])
    classes = (GOOD, *dataset.defect_types)
    if len(classes) < 2:
        raise DataError(dataset.root / "test", "no defect folder: classification needs good plus at least one "
                                               "defect type")
    index = {name: i for i, name in enumerate(classes)}
    items = tuple(LabelledImage(s.image_path, index[s.defect]) for s in (*dataset.train, *dataset.test))
    return LabelledView(dataset.root, classes, items)


def stratified_split(labels: Sequence[int], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded stratified split: per class, ``round(test_fraction * n)`` items go to the test part.

    A class with at least two items keeps at least one on each side. Returns sorted index lists.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(test_fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return sorted(train), sorted(test)


def client_shares(labels: Sequence[int], n_clients: int, scheme: str = "iid", seed: int = 0,
                  alpha: float = 0.5, min_per_client: int = 2) -> list[list[int]]:
    """Indices (into ``labels``) held by each client: ``iid`` or Dirichlet label skew (``alpha``)."""
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; choose from {list(PARTITIONS)}")
    shares = partition([f"class{label:03d}" for label in labels], n_clients, scheme, seed,
                       alpha=alpha, min_per_client=min(min_per_client, len(labels) // n_clients))
    return [list(share) for share in shares.assignments]


@dataclass(frozen=True)
class Split:
    """The seed's protocol on a labelled view: train / test items and each client's training items."""

    view: LabelledView
    train: LabelledView
    test: LabelledView
    clients: tuple[LabelledView, ...]


def split_view(view: LabelledView, n_clients: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
               test_fraction: float = 0.2, train_fraction: float = 1.0, fraction_seed: int | None = None) -> Split:
    """80/20 stratified split, then the training part dealt to ``n_clients`` clients.

    ``train_fraction`` < 1 keeps that stratified, seeded fraction of the training part (a class of two or more
    images keeps at least one) before it is dealt, for learning curves; the test part does not change.
    ``fraction_seed`` (default: ``seed``) seeds which images are kept.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    train_idx, test_idx = stratified_split(view.labels, test_fraction, seed)
    train = view.subset(train_idx)
    if train_fraction < 1:
        kept, _ = stratified_split(train.labels, 1 - train_fraction, seed if fraction_seed is None else fraction_seed)
        train = train.subset(kept)
    if n_clients < 1 or n_clients > len(train.items):
        raise ValueError(f"clients must be in 1..{len(train.items)} (training images), got {n_clients}")
    shares = client_shares(train.labels, n_clients, scheme, seed, alpha)
    return Split(view, train, view.subset(test_idx), tuple(train.subset(share) for share in shares))


def load_square(path: Path, size: int, resize: str = "squash") -> np.ndarray:
    """An image as uint8 RGB resized (bilinear) to ``size x size``: stretched, or letterboxed on mid-grey."""
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; choose from {list(RESIZES)}")
    image = Image.fromarray(read_image(path))
    if resize == "squash":
        return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(image.resize((new_w, new_h), Image.BILINEAR), np.uint8)
    return canvas


def image_tensor(view: LabelledView, size: int, obfuscation: Obfuscation | None = None, *,
                 cache: dict[tuple[Path, int, str], np.ndarray] | None = None, progress: bool = False,
                 desc: str = "images", resize: str = "squash") -> torch.Tensor:
    """The view's images as float (N, 3, size, size) in [0, 1]: resized, then obfuscated.

    ``cache`` (path, size, resize) -> resized uint8 image is filled and reused, so several obfuscations
    of the same images read each file once.
    """
    arrays = []
    for item in tqdm(view.items, desc=desc, disable=not progress, leave=False):
        key = (item.path, size, resize)
        resized = cache.get(key) if cache is not None else None
        if resized is None:
            resized = load_square(item.path, size, resize)
            if cache is not None:
                cache[key] = resized
        arrays.append(obfuscation(resized) if obfuscation is not None and obfuscation.active else resized)
    if not arrays:
        return torch.empty(0, 3, size, size)
    batch = np.stack(arrays).astype(np.float32) / 255.0
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def label_tensor(view: LabelledView) -> torch.Tensor:
    return torch.from_numpy(view.labels)
