"""A KolektorSDD2-layout folder (Bozic et al., Computers in Industry 2021), as the synthesis study reads it.

KSDD2::

    <root>/train/<N>.png  <root>/train/<N>_GT.png
    <root>/test/<N>.png   <root>/test/<N>_GT.png

Every image has a mask of the same size; an image is defective (label 1) when its mask has any non-zero
pixel. Every problem is a :class:`~fedinspect.errors.DataError` naming the file: an image without its mask,
a mask without its image, an unreadable file, a mask of another size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinspect.data.images import IMAGE_SUFFIXES, image_size, list_images, read_mask
from fedinspect.errors import DataError

MASK_SUFFIX = "_GT"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class LabelledImage:
    """One image, its label (1 defective, 0 good) and its mask file (None when the layout has none)."""

    image_path: Path
    label: int
    mask_path: Path | None = None

    @property
    def stem(self) -> str:
        return self.image_path.stem


def is_kolektor_layout(root: str | Path) -> bool:
    """True when ``root/train`` holds a ``*_GT`` mask file (and ``root`` has no ``train/good`` folder)."""
    train = Path(root) / "train"
    if not train.is_dir() or (train / "good").is_dir():
        return False
    return any(path.stem.endswith(MASK_SUFFIX) for path in list_images(train))


def read_kolektor_split(folder: str | Path) -> list[LabelledImage]:
    """The images of one split folder (``train`` or ``test``) with labels from their masks, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "missing folder (a KolektorSDD2 split: <N>.png images and <N>_GT.png masks)")
    files = list_images(folder)
    masks = {path.stem.removesuffix(MASK_SUFFIX): path for path in files if path.stem.endswith(MASK_SUFFIX)}
    images = [path for path in files if not path.stem.endswith(MASK_SUFFIX)]
    if not images:
        raise DataError(folder, "no images found (expected <N>.png beside <N>_GT.png)")
    stems = {path.stem for path in images}
    if len(stems) != len(images):
        raise DataError(folder, "two images share a name with different suffixes; keep one of each")
    orphans = sorted(set(masks) - stems)
    if orphans:
        raise DataError(masks[orphans[0]], "mask without its image "
                                           f"(expected {orphans[0]}.png; {len(orphans)} such mask(s))")
    samples = []
    for path in images:
        mask_path = masks.get(path.stem)
        if mask_path is None:
            raise DataError(path, f"image without its mask: expected {path.stem}{MASK_SUFFIX}"
                                  f"{path.suffix if path.suffix in IMAGE_SUFFIXES else '.png'} beside it")
        mask = read_mask(mask_path)
        if mask.shape[:2] != image_size(path):
            height, width = image_size(path)
            raise DataError(mask_path, f"mask of {mask.shape[1]}x{mask.shape[0]} pixels, but its image {path.name} "
                                       f"is {width}x{height}")
        samples.append(LabelledImage(path, int(np.any(mask != 0)), mask_path))
    return samples


def read_kolektor(root: str | Path) -> dict[str, list[LabelledImage]]:
    """``{"train": [...], "test": [...]}`` of a KolektorSDD2-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    return {split: read_kolektor_split(root / split) for split in SPLITS}
