"""Synthetic defects drawn into good images: one interface, several generators, a registry by name.

Every generator takes a good uint8 RGB image (H, W, 3), a seeded :class:`numpy.random.Generator` and an
optional ``region`` (a boolean (H, W) mask of where a defect may appear: an expert's drawing, a real
defect's mask) and returns ``(defective image, mask)``. The mask is exactly the set of pixels that differ
from the source: a pixel the blend happened to leave identical is not marked, and nothing changes outside
the mask. The same image, seed and settings give the same output.

- ``perlin``: DRAEM (Zavrtanik et al., ICCV 2021): a thresholded Perlin-noise mask filled with a texture
  at opacity beta in [0.1, 1) (the code the ``draem`` detector trains on, :func:`simulate_anomaly`).
- ``cutpaste`` / ``cutpaste_scar``: CutPaste (Li et al., CVPR 2021): a rectangle (2-15 % of the area, aspect
  ratio log-uniform in (0.3, 3.3)) or a thin rotated scar (2-16 px wide, 10-25 px long, -45..45 degrees) cut
  from the same image, colour-jittered, pasted elsewhere.
- ``memseg``: MemSeg (Yang et al., 2023): a Perlin mask intersected with the foreground (Otsu on the
  grayscale image; the whole image for textures), filled with a texture or the image's own content with its
  blocks shuffled, blended at opacity delta in [0.15, 1].
- ``diffusion``: text-guided inpainting with a local diffusion checkpoint (:mod:`fedinspect.synthesis.diffusion`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from fedinspect.errors import FedinspectError
from fedinspect.synthesis.anomaly_simulation import simulate_anomaly
from fedinspect.synthesis.perlin import perlin_mask
from fedinspect.synthesis.textures import TextureSource

MAX_ATTEMPTS = 50
"""Draws a generator makes before giving up on an image whose defect keeps coming out empty."""
MIN_SIDE = 16


class SynthesisError(FedinspectError):
    """A defect could not be generated (an image too small, a region too small to hold one)."""


@runtime_checkable
class DefectGenerator(Protocol):
    """Draws one defect into a good image; see the module docstring for the contract."""

    name: str

    def generate(self, image: np.ndarray, rng: np.random.Generator,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(defective uint8 image of the same shape, boolean mask of exactly the changed pixels)."""
        ...

    def parameters(self) -> dict[str, Any]:
        """The settings that, with the seed, reproduce the output (written to the manifest)."""
        ...


def check_image(image: np.ndarray, region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as a uint8 (H, W, 3) array and the region as bool (H, W); ValueError naming what is wrong."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} pixels is too small for a defect "
                         f"(at least {MIN_SIDE}x{MIN_SIDE})")
    if region is None:
        return image, None
    region = np.asarray(region)
    if region.shape != image.shape[:2]:
        raise ValueError(f"region of shape {region.shape} does not match the image's {image.shape[:2]}")
    region = region.astype(bool)
    if not region.any():
        raise ValueError("the region is empty: nowhere to put a defect")
    return image, region


def is_gray(image: np.ndarray) -> bool:
    """True when the three channels are equal everywhere (a grayscale image stored as RGB)."""
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def finish(source: np.ndarray, result: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The defective image and its mask, made consistent: the mask is exactly where the image differs.

    Pixels outside ``mask`` are restored from ``source``. A grayscale source gets a grayscale result (a
    coloured texture would be a give-away no real defect of a gray camera has). A pixel inside the mask that
    the blend left identical is moved by one grey level (towards mid-grey), so that the mask stays the
    solid region the generator drew and not a speckle of the pixels that happened to change.
    """
    mask = np.asarray(mask, dtype=bool)
    result = np.asarray(result, dtype=np.uint8)
    if is_gray(source):
        luminance = result.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        result = np.repeat(np.clip(luminance + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    result = np.where(mask[..., None], result, source).astype(np.uint8)
    same = mask & np.all(result == source, axis=2)
    if same.any():
        nudged = source[same].astype(np.int16)
        result[same] = np.where(nudged < 128, nudged + 1, nudged - 1).astype(np.uint8)
    return result, mask.copy()


def _retry(draw: Callable[[], tuple[np.ndarray, np.ndarray]], name: str) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(MAX_ATTEMPTS):
        result, mask = draw()
        if mask.any():
            return result, mask
    raise SynthesisError(f"{name}: no visible defect after {MAX_ATTEMPTS} draws (region too small, or the "
                         "image too uniform for this method)")


def _random_point(rng: np.random.Generator, region: np.ndarray | None, shape: tuple[int, int]) -> tuple[int, int]:
    """A (row, col) drawn uniformly from the region's pixels, or from the whole image."""
    if region is None:
        return int(rng.integers(shape[0])), int(rng.integers(shape[1]))
    rows, cols = np.nonzero(region)
    pick = int(rng.integers(rows.size))
    return int(rows[pick]), int(cols[pick])


# ----------------------------------------------------------------------------------------------------------
# perlin (DRAEM)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PerlinGenerator:
    """DRAEM's simulated anomaly (Zavrtanik et al., ICCV 2021), shared with the ``draem`` detector.

    ``textures`` default to :meth:`TextureSource.builtin` (scikit-image samples and generated patterns: DTD
    does not ship offline); pass ``TextureSource.from_folder(dtd)`` for the paper's textures.
    """

    textures: TextureSource | None = None
    beta_range: tuple[float, float] = (0.1, 1.0)
    texture_dir: str | None = None
    name: str = field(default="perlin", init=False)

    def __post_init__(self) -> None:
        if self.textures is None:
            self.textures = TextureSource.builtin()

    def parameters(self) -> dict[str, Any]:
        return {"beta_range": list(self.beta_range), "textures": self.texture_dir or "builtin",
                "paper": "Zavrtanik et al., DRAEM, ICCV 2021"}

    def generate(self, image: np.ndarray, rng: np.random.Generator,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        image, region = check_image(image, region)

        def draw() -> tuple[np.ndarray, np.ndarray]:
            result, mask = simulate_anomaly(image, rng, self.textures, beta_range=self.beta_range)
            return finish(image, result, mask if region is None else mask & region)

        return _retry(draw, self.name)


# ----------------------------------------------------------------------------------------------------------
# CutPaste
# ----------------------------------------------------------------------------------------------------------


def colour_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """torchvision's ColorJitter(b, c, s, h = strength) in numpy: brightness, contrast, saturation, hue.

    Factors are drawn from [1 - strength, 1 + strength] (hue: a shift in [-strength, strength] of a turn);
    ``strength`` 0 returns the patch unchanged.
    """
    if strength == 0:
        return patch.copy()
    out = patch.astype(np.float32) / 255.0
    out = np.clip(out * rng.uniform(1 - strength, 1 + strength), 0, 1)
    gray = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.clip((out - gray.mean()) * rng.uniform(1 - strength, 1 + strength) + gray.mean(), 0, 1)
    gray = (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    out = np.clip((out - gray) * rng.uniform(1 - strength, 1 + strength) + gray, 0, 1)
    as_uint8 = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(as_uint8).convert("HSV")).copy()
    shift = int(np.rint(rng.uniform(-strength, strength) * 255))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))


@dataclass
class CutPasteGenerator:
    """CutPaste (Li et al., CVPR 2021): a patch of the image itself, jittered and pasted elsewhere.

    ``scar=False``: a rectangle of ``area_ratio`` of the image with aspect ratio log-uniform in
    ``aspect_ratio``. ``scar=True``: a ``scar_width`` x ``scar_length`` strip rotated by ``scar_rotation``
    degrees (pixels, as the paper's 256-pixel images; clipped to the image). ``jitter`` is ColorJitter's
    strength (paper: 0.1). The patch is pasted with its top-left corner such that its centre falls on a
    random pixel of ``region`` (or of the image) and is clipped at the image border and to the region.
    """

    scar: bool = False
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    scar_width: tuple[int, int] = (2, 16)
    scar_length: tuple[int, int] = (10, 25)
    scar_rotation: tuple[float, float] = (-45.0, 45.0)
    jitter: float = 0.1
    name: str = field(default="cutpaste", init=False)

    def __post_init__(self) -> None:
        self.name = "cutpaste_scar" if self.scar else "cutpaste"
        if not 0 < self.area_ratio[0] <= self.area_ratio[1] < 1:
            raise ValueError(f"area_ratio must satisfy 0 < low <= high < 1, got {self.area_ratio}")
        if not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise ValueError(f"aspect_ratio must be positive and ordered, got {self.aspect_ratio}")
        if not 1 <= self.scar_width[0] <= self.scar_width[1] or not 1 <= self.scar_length[0] <= self.scar_length[1]:
            raise ValueError(f"scar sizes must be ordered and >= 1, got {self.scar_width}, {self.scar_length}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def parameters(self) -> dict[str, Any]:
        keys = ("scar_width", "scar_length", "scar_rotation") if self.scar else ("area_ratio", "aspect_ratio")
        values = asdict(self)
        return {**{key: list(values[key]) for key in keys}, "jitter": self.jitter,
                "paper": "Li et al., CutPaste, CVPR 2021"}

    def _patch(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(patch uint8 (h, w, 3), its boolean shape mask) cut from a random place of ``image``."""
        height, width = image.shape[:2]
        if self.scar:
            patch_w = int(rng.integers(self.scar_width[0], self.scar_width[1] + 1))
            patch_h = int(rng.integers(self.scar_length[0], self.scar_length[1] + 1))
        else:
            area = rng.uniform(*self.area_ratio) * height * width
            aspect = float(np.exp(rng.uniform(np.log(self.aspect_ratio[0]), np.log(self.aspect_ratio[1]))))
            patch_w = int(np.rint(np.sqrt(area * aspect)))
            patch_h = int(np.rint(np.sqrt(area / aspect)))
        patch_h, patch_w = max(1, min(patch_h, height - 1)), max(1, min(patch_w, width - 1))
        top, left = int(rng.integers(height - patch_h + 1)), int(rng.integers(width - patch_w + 1))
        patch = colour_jitter(image[top:top + patch_h, left:left + patch_w], rng, self.jitter)
        shape = np.ones((patch_h, patch_w), dtype=bool)
        if self.scar:
            angle = float(rng.uniform(*self.scar_rotation))
            patch = np.asarray(Image.fromarray(patch).rotate(angle, Image.Resampling.NEAREST, expand=True))
            shape = np.asarray(Image.fromarray(shape).rotate(angle, Image.Resampling.NEAREST, expand=True))
            patch, shape = patch[: height - 1, : width - 1], shape[: height - 1, : width - 1]
        return patch, shape

    def generate(self, image: np.ndarray, rng: np.random.Generator,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        image, region = check_image(image, region)
        height, width = image.shape[:2]

        def draw() -> tuple[np.ndarray, np.ndarray]:
            patch, shape = self._patch(image, rng)
            centre_y, centre_x = _random_point(rng, region, (height, width))
            top, left = centre_y - patch.shape[0] // 2, centre_x - patch.shape[1] // 2
            canvas = image.copy()
            mask = np.zeros((height, width), dtype=bool)
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + patch.shape[0], height), min(left + patch.shape[1], width)
            inner = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
            mask[y0:y1, x0:x1] = shape[inner]
            canvas[y0:y1, x0:x1] = patch[inner]
            return finish(image, canvas, mask if region is None else mask & region)

        return _retry(draw, self.name)


# ----------------------------------------------------------------------------------------------------------
# MemSeg
# ----------------------------------------------------------------------------------------------------------


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """The object of an image: the side of Otsu's grayscale threshold that covers less of the border.

    Most inspection images show a part on a background that touches the border; for a texture or a
    uniform image (no threshold to find) the whole image is foreground.
    """
    from skimage.filters import threshold_otsu

    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if np.ptp(gray) < 1.0:
        return np.ones(gray.shape, dtype=bool)
    bright = gray > threshold_otsu(gray)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    foreground = ~bright if border.mean() > 0.5 else bright
    return foreground if foreground.any() else np.ones(gray.shape, dtype=bool)


def shuffled_blocks(image: np.ndarray, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """The image cut into ``grid`` x ``grid`` blocks put back in a random order (its own content, out of place)."""
    height, width = image.shape[:2]
    rows = np.linspace(0, height, grid + 1).astype(int)
    cols = np.linspace(0, width, grid + 1).astype(int)
    blocks = [(rows[i], rows[i + 1], cols[j], cols[j + 1]) for i in range(grid) for j in range(grid)]
    out = np.empty_like(image)
    for (y0, y1, x0, x1), pick in zip(blocks, rng.permutation(len(blocks)), strict=True):
        sy0, sy1, sx0, sx1 = blocks[int(pick)]
        piece = Image.fromarray(np.ascontiguousarray(image[sy0:sy1, sx0:sx1]))
        out[y0:y1, x0:x1] = np.asarray(piece.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    return out


@dataclass
class MemSegGenerator:
    """MemSeg's abnormal synthetic images (Yang et al., 2023), foreground-aware.

    The mask is a Perlin mask intersected with the foreground (``foreground="otsu"``, or ``"all"`` for
    textures) and with ``region`` when given; it is filled with a texture (probability ``texture_probability``)
    or the image's own blocks shuffled, at opacity delta in ``opacity``:
    ``delta * fill + (1 - delta) * image`` inside the mask.
    """

    textures: TextureSource | None = None
    foreground: str = "otsu"
    opacity: tuple[float, float] = (0.15, 1.0)
    texture_probability: float = 0.5
    texture_dir: str | None = None
    name: str = field(default="memseg", init=False)

    def __post_init__(self) -> None:
        if self.foreground not in ("otsu", "all"):
            raise ValueError(f"foreground must be 'otsu' or 'all', got {self.foreground!r}")
        if not 0 < self.opacity[0] <= self.opacity[1] <= 1:
            raise ValueError(f"opacity must satisfy 0 < low <= high <= 1, got {self.opacity}")
        if not 0 <= self.texture_probability <= 1:
            raise ValueError(f"texture_probability must be in [0, 1], got {self.texture_probability}")
        if self.textures is None:
            self.textures = TextureSource.builtin()

    def parameters(self) -> dict[str, Any]:
        return {"foreground": self.foreground, "opacity": list(self.opacity),
                "texture_probability": self.texture_probability, "textures": self.texture_dir or "builtin",
                "paper": "Yang et al., MemSeg, 2023"}

    def generate(self, image: np.ndarray, rng: np.random.Generator,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        image, region = check_image(image, region)
        shape = image.shape[:2]
        allowed = otsu_foreground(image) if self.foreground == "otsu" else np.ones(shape, dtype=bool)
        if region is not None:
            allowed = allowed & region if (allowed & region).any() else region

        def draw() -> tuple[np.ndarray, np.ndarray]:
            mask = perlin_mask(shape, rng) & allowed
            if rng.random() < self.texture_probability:
                fill = self.textures.sample(shape, rng)
            else:
                fill = shuffled_blocks(image, rng).astype(np.float32) / 255.0
            delta = rng.uniform(*self.opacity)
            blended = delta * fill + (1.0 - delta) * (image.astype(np.float32) / 255.0)
            return finish(image, np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8), mask)

        return _retry(draw, self.name)


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

OFFLINE_METHODS = ("perlin", "cutpaste", "cutpaste_scar", "memseg")
METHODS = (*OFFLINE_METHODS, "diffusion")
DESCRIPTIONS = {
    "perlin": "Perlin-noise mask filled with a texture (DRAEM, Zavrtanik et al., ICCV 2021)",
    "cutpaste": "a rectangle of the image, colour-jittered, pasted elsewhere (CutPaste, Li et al., CVPR 2021)",
    "cutpaste_scar": "a thin rotated scar of the image pasted elsewhere (CutPaste-scar, Li et al., CVPR 2021)",
    "memseg": "foreground-aware Perlin mask, texture or shuffled blocks at opacity 0.15-1 (MemSeg, Yang et al. 2023)",
    "diffusion": "text-guided inpainting with a local Stable Diffusion checkpoint (DIAG, Capogrosso et al. 2024)",
}


def make_generator(name: str, textures: TextureSource | None = None, texture_dir: str | None = None,
                   **settings: Any) -> DefectGenerator:
    """The offline generator called ``name`` (``diffusion`` needs weights: see
    :func:`fedinspect.synthesis.diffusion.DiffusionGenerator.from_folder`).

    ``textures`` is shared by ``perlin`` and ``memseg`` (built once; default: the built-in set);
    ``texture_dir`` is only recorded in the manifest.
    """
    if name == "perlin":
        return PerlinGenerator(textures=textures, texture_dir=texture_dir, **settings)
    if name in ("cutpaste", "cutpaste_scar"):
        return CutPasteGenerator(scar=name == "cutpaste_scar", **settings)
    if name == "memseg":
        return MemSegGenerator(textures=textures, texture_dir=texture_dir, **settings)
    if name == "diffusion":
        raise ValueError("the diffusion generator needs a local inpainting model: "
                         "fedinspect.synthesis.diffusion.DiffusionGenerator.from_folder(model_dir, prompts)")
    raise ValueError(f"unknown synthesis method {name!r}; choose from {', '.join(METHODS)}")
