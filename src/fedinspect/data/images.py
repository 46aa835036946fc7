"""Reading images and masks from disk with errors that name the file.

Every file is checked against a pixel limit from its header before any pixel is decoded, so a
small file that claims a huge size (a decompression bomb) is refused instead of filling memory.
The limit is ``FEDINSPECT_MAX_IMAGE_PIXELS`` (read at each use; default 100 megapixels). Pillow
keeps its own hard limit of ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (179 megapixels unless a program
changes it), which this setting cannot raise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedinspect.errors import DataError, FedinspectError
from fedinspect.quiet_warnings import ignoring

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS_VARIABLE = "FEDINSPECT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def max_image_pixels() -> int:
    """The largest width x height accepted: ``$FEDINSPECT_MAX_IMAGE_PIXELS``, else 100 megapixels."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise FedinspectError(f"{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, got {value!r}")
    return limit


def _open_header(path: Path) -> Image.Image:
    """The image opened lazily (header only), refused when it claims more pixels than the limit."""
    if not path.is_file():
        raise DataError(path, "file not found")
    limit = max_image_pixels()
    try:
        with ignoring(Image.DecompressionBombWarning):  # Pillow's bomb warning: the check below replaces it
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DataError(path, f"image too large to read safely ({error})") from error
    except UnidentifiedImageError as error:
        raise DataError(path, "not a readable image file") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(path, f"unreadable image header ({error})") from error
    width, height = image.size
    if width * height > limit:
        image.close()
        raise DataError(
            path,
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels "
            f"(a possible decompression bomb); set {MAX_PIXELS_VARIABLE} to accept larger images",
        )
    return image


def _open(path: Path) -> Image.Image:
    image = _open_header(path)
    try:
        image.load()  # decodes now, so truncated files fail here and not later
    except (OSError, SyntaxError, ValueError) as error:
        image.close()
        raise DataError(path, f"unreadable or truncated image ({error})") from error
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3); grayscale is replicated, alpha dropped.

    16-bit samples keep their high byte (value // 256), whatever the image's brightest pixel: the
    rule Pillow applies to 16-bit colour PNGs, so a 16-bit gray and a 16-bit colour file agree.
    """
    path = Path(path)
    image = _open(path)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.asarray(image)
        if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(path, f"32-bit integer image with values {array.min()}..{array.max()} outside the "
                                  "16-bit range 0..65535: save it as an 8- or 16-bit image")
        array = (array.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode == "F":
        raise DataError(path, "floating-point image (no fixed brightness scale): save it as an 8- or 16-bit image")
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
    """(height, width) from the file header, without decoding the pixels (same pixel limit as reading)."""
    with _open_header(Path(path)) as image:
        width, height = image.size
    return height, width


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files skipped).

    A broken symbolic link with an image suffix is refused: it is an image the dataset lost, and
    skipping it would silently shrink the data.
    """
    images = []
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(path, f"broken symbolic link to {os.readlink(path)}: restore the image or remove the link")
        if path.is_file():
            images.append(path)
    return sorted(images)
