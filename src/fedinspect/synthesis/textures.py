"""Where the content of a simulated anomaly comes from: a set of texture images sampled at random.

DRAEM fills its masks with images of the Describable Textures Dataset (DTD), which is not available
offline. :meth:`TextureSource.builtin` uses the texture-like sample images that ship with scikit-image
(brick, grass, gravel, ...) plus a few generated ones (stripes, checkerboard, coloured noise, speckle);
:meth:`TextureSource.from_folder` reads a user's folder (a DTD copy, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fedinspect.data.images import IMAGE_SUFFIXES, list_images, read_image
from fedinspect.errors import DataError
from fedinspect.synthesis.perlin import perlin_noise

# scikit-image sample images that read as textures (all ship with the package; no download)
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "immunohistochemistry", "hubble_deep_field",
                    "coffee")
_MIN_SIDE = 8


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def generated_textures(seed: int = 0, size: int = 256) -> dict[str, np.ndarray]:
    """Four procedural textures (uint8 RGB, ``size`` square), the same for the same seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    cell = int(rng.integers(8, 32))
    checker = ((y // cell + x // cell) % 2).astype(np.float32)
    noise = np.stack([perlin_noise((size, size), (8, 8), rng) for _ in range(3)], axis=-1) * 0.5 + 0.5
    speckle = (rng.random((size, size)) < 0.05).astype(np.float32)
    colours = rng.uniform(0, 1, (3, 2, 3)).astype(np.float32)

    def paint(pattern: np.ndarray, pair: np.ndarray) -> np.ndarray:
        rgb = pair[0] + pattern[..., None] * (pair[1] - pair[0])
        return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)

    return {"stripes": paint(stripes, colours[0]), "checkerboard": paint(checker, colours[1]),
            "coloured_noise": np.clip(noise * 255 + 0.5, 0, 255).astype(np.uint8),
            "speckle": paint(speckle, colours[2])}


class TextureSource:
    """A set of RGB texture images; :meth:`sample` returns a random, augmented crop of one of them."""

    def __init__(self, textures: Sequence[np.ndarray], names: Sequence[str] | None = None) -> None:
        if not textures:
            raise ValueError("a TextureSource needs at least one texture image")
        self.textures = [_as_rgb(texture) for texture in textures]
        self.names = list(names) if names is not None else [f"texture_{i}" for i in range(len(self.textures))]
        for name, texture in zip(self.names, self.textures, strict=True):
            if texture.ndim != 3 or min(texture.shape[:2]) < _MIN_SIDE:
                raise ValueError(f"texture {name}: need an image of at least {_MIN_SIDE}x{_MIN_SIDE} pixels, "
                                 f"got shape {texture.shape}")

    def __len__(self) -> int:
        return len(self.textures)

    @classmethod
    def builtin(cls, seed: int = 0) -> TextureSource:
        """scikit-image's texture-like sample images and four generated textures (no download)."""
        import skimage.data

        textures = {name: getattr(skimage.data, name)() for name in SKIMAGE_TEXTURES}
        textures.update(generated_textures(seed))
        return cls(list(textures.values()), list(textures))

    @staticmethod
    def folder_images(folder: str | Path) -> list[Path]:
        """The image files of a texture folder; a missing folder or one without images is a DataError."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(folder, "texture folder not found (or not a folder)")
        paths = list_images(folder)
        if not paths:
            raise DataError(folder, f"texture folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return paths

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextureSource:
        """Every image of ``folder`` (not recursive), checked as :meth:`folder_images` says and read safely."""
        paths = cls.folder_images(folder)
        images = []
        for path in paths:
            image = read_image(path)
            if min(image.shape[:2]) < _MIN_SIDE:
                raise DataError(path, f"texture smaller than {_MIN_SIDE}x{_MIN_SIDE} pixels")
            images.append(image)
        return cls(images, [path.name for path in paths])

    def sample(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A float32 (H, W, 3) texture in [0, 1]: a random crop of a random texture, resized and augmented.

        Augmentations (DRAEM draws three of imgaug's eleven; these are the cheap equivalents): a random
        quarter turn and flip, gamma in [0.5, 2], brightness x [0.8, 1.2], a channel permutation (hue),
        and inversion with probability 0.2.
        """
        height, width = shape
        texture = self.textures[int(rng.integers(len(self.textures)))]
        texture = np.rot90(texture, int(rng.integers(4)))
        if rng.random() < 0.5:
            texture = texture[:, ::-1]
        rows, cols = texture.shape[:2]
        crop_h = int(rng.integers(max(1, rows // 4), rows + 1))
        crop_w = min(cols, max(1, round(crop_h * width / height)))
        top, left = int(rng.integers(rows - crop_h + 1)), int(rng.integers(cols - crop_w + 1))
        crop = np.ascontiguousarray(texture[top:top + crop_h, left:left + crop_w])
        resized = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR))
        out = resized.astype(np.float32) / 255.0
        out = out ** rng.uniform(0.5, 2.0)
        out = np.clip(out * rng.uniform(0.8, 1.2), 0.0, 1.0)
        out = out[..., rng.permutation(3)]
        if rng.random() < 0.2:
            out = 1.0 - out
        return np.ascontiguousarray(out, dtype=np.float32)
