"""Reading images and masks from disk with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedinspect.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = Image.open(path)
        image.load()  # decodes now, so truncated files fail here and not later
    except UnidentifiedImageError as error:
        raise DataError(path, "not a readable image file") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(path, f"unreadable or truncated image ({error})") from error
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3); grayscale is replicated, alpha dropped, 16-bit rescaled."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as an integer array (H, W) or (H, W, C), values as stored."""
    path = Path(path)
    image = _open(path)
    if image.mode == "P":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA"):
        image = image.convert(image.mode[:-1])
    if image.mode == "1":
        image = image.convert("L")
    array = np.asarray(image)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(path, f"mask must hold integer values, found {array.dtype}")
    return array


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(path, f"not a readable image file ({error})") from error
    return height, width


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
