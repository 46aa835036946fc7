"""Image obfuscation before feature extraction (the PIDS methods of seed 000).

Three methods, applied in this order when combined:

- ``average``: every non-overlapping ``k x k`` block is replaced by its mean (pixelation; lossy).
- ``shuffle``: the pixels of every ``k x k`` block are permuted by one keyed permutation of the
  ``k*k`` positions (the seed's Shuffle_Key); blocks cut by the image border get their own keyed
  permutation of their smaller area, so no pixel is left in place by construction.
- ``switch_row``: the rows of the image are permuted by a keyed permutation of its height (Row_Key).

The key is a secret of the federation: every client and its test images use the same key, so a
model trained on obfuscated images sees the same transformation at test time. ``shuffle`` and
``switch_row`` are permutations, inverted exactly with the key (``restore``); ``average`` is not
invertible. Obfuscation hides content from the human eye; it is not differential privacy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

METHODS = ("average", "shuffle", "switch_row")
_TAGS = {"shuffle": 1, "switch_row": 2}


def _permutation(key: int, method: str, *shape: int) -> np.ndarray:
    """A keyed permutation of ``prod(shape)`` positions; the same key and shape give the same one."""
    if key < 0:
        raise ValueError(f"obfuscation key must be a non-negative integer, got {key}")
    rng = np.random.default_rng(np.random.SeedSequence([key, _TAGS[method], *shape]))
    return rng.permutation(int(np.prod(shape)))


def _check_image(image: np.ndarray) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {image.shape}")


def _tiles(image: np.ndarray, block: int) -> np.ndarray:
    """The full ``block x block`` tiles as an array of shape (rows, cols, block*block, C)."""
    rows, cols = image.shape[0] // block, image.shape[1] // block
    tiles = image[:rows * block, :cols * block].reshape(rows, block, cols, block, -1)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(rows, cols, block * block, -1)


def _untile(tiles: np.ndarray, block: int, out: np.ndarray) -> None:
    rows, cols = tiles.shape[:2]
    full = tiles.reshape(rows, cols, block, block, -1).transpose(0, 2, 1, 3, 4)
    out[:rows * block, :cols * block] = full.reshape(rows * block, cols * block, *out.shape[2:])


def _border_blocks(height: int, width: int, block: int) -> Iterable[tuple[slice, slice, int, int]]:
    """The tiles cut by the bottom or right border (those :func:`_tiles` leaves out)."""
    full_h, full_w = height - height % block, width - width % block
    for top in range(0, height, block):
        for left in range(0, width, block):
            if top < full_h and left < full_w:
                continue
            h, w = min(block, height - top), min(block, width - left)
            yield slice(top, top + h), slice(left, left + w), h, w


def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")


def _mean(values: np.ndarray, axis: int | tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    mean = values.astype(np.float64).mean(axis=axis)
    return np.round(mean).astype(dtype) if np.issubdtype(dtype, np.integer) else mean.astype(dtype)


def average_blocks(image: np.ndarray, block: int) -> np.ndarray:
    """Replace each non-overlapping ``block x block`` tile (smaller at the border) by its mean."""
    _check_image(image)
    _check_block(block)
    out = np.empty_like(image)
    tiles = _tiles(image, block)
    means = _mean(tiles, 2, image.dtype)[:, :, None]
    _untile(np.broadcast_to(means, tiles.shape), block, out)
    for rows, cols, _, _ in _border_blocks(*image.shape[:2], block):
        out[rows, cols] = _mean(image[rows, cols], (0, 1), image.dtype)
    return out


def _shuffle(image: np.ndarray, block: int, key: int, inverse: bool) -> np.ndarray:
    _check_image(image)
    _check_block(block)
    out = np.empty_like(image)

    def permute(values: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
        return np.take(values, np.argsort(order) if inverse else order, axis=axis)

    _untile(permute(_tiles(image, block), _permutation(key, "shuffle", block, block), 2), block, out)
    for rows, cols, h, w in _border_blocks(*image.shape[:2], block):
        tile = image[rows, cols].reshape(h * w, *image.shape[2:])
        out[rows, cols] = permute(tile, _permutation(key, "shuffle", h, w), 0).reshape(h, w, *image.shape[2:])
    return out


def shuffle_blocks(image: np.ndarray, block: int, key: int) -> np.ndarray:
    """Permute the pixels inside every ``block x block`` tile with the keyed permutation."""
    return _shuffle(image, block, key, inverse=False)


def unshuffle_blocks(image: np.ndarray, block: int, key: int) -> np.ndarray:
    """Inverse of :func:`shuffle_blocks` with the same key."""
    return _shuffle(image, block, key, inverse=True)


def switch_rows(image: np.ndarray, key: int) -> np.ndarray:
    """Permute the rows of the image with the keyed permutation of its height."""
    _check_image(image)
    return image[_permutation(key, "switch_row", image.shape[0])]


def unswitch_rows(image: np.ndarray, key: int) -> np.ndarray:
    """Inverse of :func:`switch_rows` with the same key."""
    _check_image(image)
    out = np.empty_like(image)
    out[_permutation(key, "switch_row", image.shape[0])] = image
    return out


def parse_methods(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"average,shuffle"`` or a list -> validated methods in the canonical order; "none"/"" -> ()."""
    if spec is None:
        return ()
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n and n != "none"]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown obfuscation method(s) {unknown}; choose from {list(METHODS)}")
    return tuple(m for m in METHODS if m in names)


@dataclass(frozen=True)
class Obfuscation:
    """A keyed combination of obfuscation methods, applied as ``obfuscation(image)``.

    ``average_block`` and ``shuffle_block`` default to the seed's 2x2 average and 4x4 shuffle.
    """

    methods: tuple[str, ...] = ()
    key: int = 0
    average_block: int = 2
    shuffle_block: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", parse_methods(self.methods))
        if self.key < 0:
            raise ValueError(f"obfuscation key must be a non-negative integer, got {self.key}")

    @property
    def active(self) -> bool:
        return bool(self.methods)

    @property
    def name(self) -> str:
        return "+".join(self.methods) if self.methods else "none"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = image
        if "average" in self.methods:
            out = average_blocks(out, self.average_block)
        if "shuffle" in self.methods:
            out = shuffle_blocks(out, self.shuffle_block, self.key)
        if "switch_row" in self.methods:
            out = switch_rows(out, self.key)
        return out

    def restore(self, image: np.ndarray) -> np.ndarray:
        """Undo the permutations (switch_row, then shuffle) with the key; averaging stays.

        Used to bring an anomaly map computed on an obfuscated test image back to the image's own
        pixel grid, so it can be compared with the ground-truth masks.
        """
        out = image
        if "switch_row" in self.methods:
            out = unswitch_rows(out, self.key)
        if "shuffle" in self.methods:
            out = unshuffle_blocks(out, self.shuffle_block, self.key)
        return out

    def prepare(self, image: np.ndarray, short_side: int) -> np.ndarray:
        """Resize the short side to ``short_side`` (the detector's input size), then obfuscate.

        Obfuscating at the resolution the backbone sees keeps the blocks meaningful: a 2x2 average
        on a 1000-pixel image would vanish in the detector's own downscaling.
        """
        height, width = image.shape[:2]
        scale = short_side / min(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return self(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)))

    def restore_map(self, score_map: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """An anomaly map of a :meth:`prepare`-d image -> the map on the original image's pixel grid."""
        restored = torch.from_numpy(np.ascontiguousarray(self.restore(score_map), dtype=np.float32))
        resized = F.interpolate(restored[None, None], size=tuple(original), mode="bilinear", align_corners=False)
        return resized[0, 0].numpy()

    def to_dict(self) -> dict[str, object]:
        """Settings for results.json; the key itself is a secret and is never written."""
        return {"methods": list(self.methods), "average_block": self.average_block,
                "shuffle_block": self.shuffle_block}
