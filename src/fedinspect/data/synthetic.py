"""The embedded default data: a deterministic synthetic dataset in the AutoVI layout.

Real AutoVI images cannot be downloaded on every machine, so fedinspect ships a generator that writes
six "products" named after AutoVI's categories, at AutoVI's image sizes, in AutoVI's folder layout::

    OUT/<category>/train/good/0000.png
    OUT/<category>/test/good/0000.png
    OUT/<category>/test/<defect>/0000.png
    OUT/<category>/ground_truth/<defect>/0000/000.png   one PNG per defect region of test/<defect>/0000.png
    OUT/<category>/defects_config.json
    OUT/dataset.json                                     manifest (generator, version, seed, size, counts)

Every image is a textured surface (mottled / brushed metal or plastic, grain, vignetting) carrying a
product-specific set of rigid components (screws, clips, connectors, pipes, wires, staples) at nominal
positions with small pose jitter. Normal variation: pose jitter, screw rotation, wire flex, texture,
lighting (gain, colour cast, a smooth gradient) and sensor noise. Defects come with pixel-accurate masks:

- structural: ``scratch`` (thin bright or dark curve), ``dent`` (shaded elliptical hollow),
  ``stain`` (irregular dark or light blob);
- logical: ``missing`` (a component is absent; the mask is its footprint where it should be) and
  ``misplaced`` (a component is moved clearly away from its nominal position; the mask is ONE region,
  the union of its nominal footprint and its displaced footprint, as in MVTec LOCO).

Determinism: the randomness of an image is derived only from ``numpy.random.SeedSequence`` of
(seed, category index, split, index in split, stream), so files do not depend on generation order or
on the number of worker processes, and the same seed gives byte-identical files (same platform and
library versions). Test images are numbered through the whole test split: indices ``0..n_good-1`` are
good, the following ones defective with the defect types taken in turn; the file name is the running
number inside its folder. The defect has its own random stream, so ``generate_image(..., defect=None)``
with the same index renders the very same product without the defect.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from fedinspect.errors import DataError

__all__ = [
    "CATEGORIES",
    "DEFECT_KINDS",
    "SIZES",
    "defect_types",
    "defects_config",
    "generate_dataset",
    "generate_image",
]

GENERATOR = "fedinspect.data.synthetic"
GENERATOR_VERSION = 1  # bump whenever the rendered pixels change

CATEGORIES: dict[str, tuple[int, int]] = {
    "engine_wiring": (400, 400),
    "pipe_clip": (400, 400),
    "pipe_staple": (400, 400),
    "tank_screw": (1000, 750),
    "underbody_pipes": (1000, 750),
    "underbody_screw": (1000, 750),
}
"""Category name -> (width, height) in pixels, as in AutoVI."""

SIZES: tuple[str, ...] = ("tiny", "small", "full")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "dent", "stain", "missing", "misplaced")
SPLITS: tuple[str, ...] = ("train", "test")

_FULL_COUNTS = {  # train, test good, test defective: AutoVI's counts
    "engine_wiring": (285, 285, 322),
    "pipe_clip": (195, 195, 142),
    "pipe_staple": (191, 188, 117),
    "tank_screw": (318, 318, 95),
    "underbody_pipes": (161, 161, 184),
    "underbody_screw": (373, 374, 18),
}
_COUNTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "tiny": dict.fromkeys(CATEGORIES, (4, 2, 2)),
    "small": dict.fromkeys(CATEGORIES, (16, 8, 8)),
    "full": _FULL_COUNTS,
}

_STREAMS = ("background", "pose", "defect", "lighting", "noise")
_PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "optimize": False}
_NOISE_SIGMA = 1.6  # sensor noise, in 8-bit levels
# Unit vectors towards the light (top left), image axes (x right, y down, z towards the camera); Python
# floats, so that they do not promote float32 arrays to float64.
_LIGHT_2D = (-0.5523, -0.8336)
_LIGHT_3D = (-0.4500 / 1.0047, -0.6500 / 1.0047, 0.6200 / 1.0047)


# ----------------------------------------------------------------------------------------------
# Product descriptions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Surface:
    """The textured part under the components; amplitudes are relative luminance variations."""

    colour: tuple[float, float, float]
    blotch: float  # large-scale mottling (cast metal, moulded plastic)
    mid: float  # medium-scale unevenness
    brushed: float  # horizontal streaks (brushed metal)
    grain: float  # per-pixel grain
    vignette: float  # darkening at the corners


@dataclass(frozen=True)
class _Component:
    """A rigid component. Lengths are in units of s = image height / 400 pixels, positions relative
    to the image centre. ``kind`` is "screw" (size = radius), "block" (size = width, height, corner
    radius) or "tube" (size = radius, ``path`` = centre-line control points)."""

    name: str
    kind: str
    xy: tuple[float, float]
    size: tuple[float, ...]
    colour: tuple[float, float, float]
    angle: float = 0.0  # degrees
    path: tuple[tuple[float, float], ...] = ()
    detail: str = ""  # screw: "slot" | "cross" | "hex"; block: "socket" | "hole"; tube: "ribbed"
    removable: bool = False  # may be missing or misplaced
    jitter: float = 2.0  # standard deviation of the position jitter
    angle_jitter: float = 2.0  # degrees
    flex: float = 0.0  # jitter of each tube control point (flexible wires)
    shine: float = 0.15  # specular highlight strength
    shadow: float = 0.35  # drop-shadow strength
    hole: bool = False  # a dark hole under the component (seen when it is missing)
    slide: tuple[float, float, float] | None = None  # misplacement: (direction relative to angle, min, max)


@dataclass(frozen=True)
class _DefectSpec:
    kind: str
    pixel_value: int
    relative: bool
    threshold: float | None  # None: absolute, the typical footprint area of a removable component


@dataclass(frozen=True)
class _Product:
    surface: _Surface
    components: tuple[_Component, ...]
    defects: tuple[_DefectSpec, ...]


_PIXEL_VALUES = {"scratch": 255, "dent": 204, "stain": 153, "missing": 102, "misplaced": 51}


def _defects(*kinds: str) -> tuple[_DefectSpec, ...]:
    """Saturation: structural defects relative (whole scratch / dent, half a stain), logical ones
    absolute at the typical footprint of one component (for misplaced: finding either place suffices)."""
    relative = {"scratch": 1.0, "dent": 1.0, "stain": 0.5}
    return tuple(
        _DefectSpec(kind, _PIXEL_VALUES[kind], kind in relative, relative.get(kind)) for kind in kinds
    )


def _staple_path() -> tuple[tuple[float, float], ...]:
    return ((-13.0, -40.0), (-13.0, 26.0), (-8.0, 34.0), (8.0, 34.0), (13.0, 26.0), (13.0, -40.0))


_PRODUCTS: dict[str, _Product] = {
    "engine_wiring": _Product(
        _Surface((0.30, 0.30, 0.31), blotch=0.10, mid=0.05, brushed=0.0, grain=0.035, vignette=0.20),
        (
            _Component(
                "panel", "block", (0, 150), (370, 60, 14), (0.36, 0.36, 0.37),
                jitter=1.0, angle_jitter=0.7, shadow=0.2,
            ),
            _Component(
                "conduit", "tube", (0, 0), (11,), (0.07, 0.07, 0.08),
                path=((-240, -50), (-110, -85), (20, -45), (120, -75), (240, -125)),
                detail="ribbed", flex=3.0, shine=0.12,
            ),
            _Component(
                "wire_orange", "tube", (0, 0), (5,), (0.85, 0.42, 0.08),
                path=((-240, 45), (-120, 15), (0, 55), (110, 25), (240, 65)), flex=3.0, shine=0.2,
            ),
            _Component(
                "wire_grey", "tube", (0, 0), (4,), (0.58, 0.58, 0.60),
                path=((-55, 240), (-45, 125), (5, 85), (65, -10), (85, -240)), flex=3.0, shine=0.2,
            ),
            _Component(
                "connector_white", "block", (-115, 20), (46, 28, 5), (0.84, 0.83, 0.78), angle=-15,
                detail="socket", removable=True,
            ),
            _Component(
                "connector_blue", "block", (118, 30), (40, 26, 5), (0.16, 0.30, 0.72), angle=10,
                detail="socket", removable=True,
            ),
            _Component(
                "hoop", "block", (20, -45), (16, 36, 4), (0.10, 0.36, 0.86), angle=-8,
                detail="hole", removable=True,
            ),
        ),
        _defects("scratch", "stain", "missing", "misplaced"),
    ),
    "pipe_clip": _Product(
        _Surface((0.42, 0.40, 0.37), blotch=0.12, mid=0.06, brushed=0.0, grain=0.04, vignette=0.20),
        (
            _Component("bracket", "block", (-125, 115), (120, 70, 10), (0.50, 0.50, 0.52), detail="hole"),
            _Component(
                "pipe", "tube", (0, 0), (26,), (0.62, 0.64, 0.66), angle=30,
                path=((-320, 0), (0, 0), (320, 0)), shine=0.35, angle_jitter=1.5,
            ),
            _Component(
                "clip_1", "block", (-61, -35), (80, 22, 6), (0.12, 0.12, 0.13), angle=120,
                detail="hole", removable=True, slide=(90, 45, 75),
            ),
            _Component(
                "clip_2", "block", (69, 40), (80, 22, 6), (0.12, 0.12, 0.13), angle=120,
                detail="hole", removable=True, slide=(90, 45, 75),
            ),
        ),
        _defects("missing", "misplaced"),
    ),
    "pipe_staple": _Product(
        _Surface((0.55, 0.56, 0.58), blotch=0.08, mid=0.05, brushed=0.03, grain=0.035, vignette=0.18),
        (
            _Component("screw_1", "screw", (-150, -120), (9,), (0.70, 0.70, 0.72), detail="cross"),
            _Component("screw_2", "screw", (150, 120), (9,), (0.70, 0.70, 0.72), detail="cross"),
            _Component(
                "hose", "tube", (0, 0), (22,), (0.10, 0.10, 0.11),
                path=((-260, 10), (-100, -5), (100, 5), (260, -10)), flex=3.0, shine=0.12,
            ),
            _Component(
                "staple_1", "tube", (-80, 0), (3.2,), (0.80, 0.80, 0.82), path=_staple_path(),
                removable=True, shine=0.3,
            ),
            _Component(
                "staple_2", "tube", (85, 0), (3.2,), (0.80, 0.80, 0.82), path=_staple_path(),
                removable=True, shine=0.3,
            ),
        ),
        _defects("missing"),
    ),
    "tank_screw": _Product(
        _Surface((0.16, 0.16, 0.17), blotch=0.10, mid=0.06, brushed=0.0, grain=0.05, vignette=0.25),
        (
            _Component(
                "flange", "block", (0, 0), (380, 230, 30), (0.21, 0.21, 0.22),
                jitter=1.0, angle_jitter=0.7, shadow=0.25,
            ),
            *(
                _Component(
                    f"screw_{i}", "screw", (sx * 150, sy * 85), (15,), (0.70, 0.70, 0.72),
                    detail="hex", removable=True, hole=True,
                )
                for i, (sx, sy) in enumerate(((-1, -1), (1, -1), (-1, 1), (1, 1)))
            ),
        ),
        _defects("missing"),
    ),
    "underbody_pipes": _Product(
        _Surface((0.45, 0.46, 0.47), blotch=0.10, mid=0.05, brushed=0.05, grain=0.04, vignette=0.20),
        (
            _Component(
                "pipe_1", "tube", (0, 0), (20,), (0.60, 0.62, 0.64),
                path=((-300, -110), (-100, -100), (100, -115), (300, -105)), shine=0.35, flex=2.0,
            ),
            _Component(
                "pipe_2", "tube", (0, 0), (15,), (0.55, 0.57, 0.60),
                path=((-300, -20), (-50, -10), (150, -30), (300, -15)), shine=0.35, flex=2.0,
            ),
            _Component(
                "hose", "tube", (0, 0), (12,), (0.10, 0.10, 0.10),
                path=((-300, 80), (-80, 100), (120, 70), (300, 90)), shine=0.12, flex=2.0,
            ),
            _Component("bracket_1", "block", (-130, -40), (26, 200, 6), (0.30, 0.30, 0.32), detail="hole"),
            _Component("bracket_2", "block", (170, -40), (26, 200, 6), (0.30, 0.30, 0.32), detail="hole"),
        ),
        _defects("scratch", "dent", "stain"),
    ),
    "underbody_screw": _Product(
        _Surface((0.40, 0.41, 0.43), blotch=0.12, mid=0.05, brushed=0.04, grain=0.04, vignette=0.22),
        (
            _Component(
                "plate", "block", (0, 10), (320, 170, 20), (0.50, 0.50, 0.52),
                jitter=1.0, angle_jitter=0.7, shadow=0.25,
            ),
            *(
                _Component(
                    f"screw_{i}", "screw", (x, 10), (14,), (0.66, 0.67, 0.70),
                    detail="cross", removable=True, hole=True,
                )
                for i, x in enumerate((-110, 0, 110))
            ),
        ),
        _defects("missing"),
    ),
}


# ----------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, category: str, split: str, index: int, stream: str) -> np.random.Generator:
    """An independent generator for one image and one purpose, whatever the generation order."""
    key = (list(CATEGORIES).index(category), SPLITS.index(split), index, _STREAMS.index(stream))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# ----------------------------------------------------------------------------------------------
# Layers: an antialiased alpha and a colour on a window of the image
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    y0: int
    x0: int
    alpha: np.ndarray  # (h, w) float32 in [0, 1]
    colour: np.ndarray  # (h, w, 3) float32


def _window(y0: int, x0: int, h: int, w: int, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """Slices (image rows, image cols, local rows, local cols) of a window clipped to the image."""
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = max(ya, min(y0 + h, height)), max(xa, min(x0 + w, width))
    return slice(ya, yb), slice(xa, xb), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0)


def _grid(y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a window as broadcastable (h, 1) and (1, w) arrays."""
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    return ys, xs


def _box(cx: float, cy: float, half: float, half_y: float | None = None) -> tuple[int, int, int, int]:
    """Window (y0, x0, h, w) around a centre, ``half`` (x and, by default, y) pixels to each side."""
    half_y = half if half_y is None else half_y
    y0, x0 = math.floor(cy - half_y), math.floor(cx - half)
    return y0, x0, math.ceil(2 * half_y) + 2, math.ceil(2 * half) + 2


def _paste(img: np.ndarray, layer: _Layer) -> None:
    h, w = layer.alpha.shape
    iy, ix, ly, lx = _window(layer.y0, layer.x0, h, w, *img.shape[:2])
    a = layer.alpha[ly, lx, None]
    img[iy, ix] = img[iy, ix] * (1 - a) + layer.colour[ly, lx] * a


def _cast_shadow(img: np.ndarray, layer: _Layer, s: float, strength: float) -> None:
    """A soft drop shadow down and to the right of the layer (the light comes from the top left)."""
    if strength <= 0:
        return
    sigma = 2.0 * s
    pad = math.ceil(3 * sigma) + 1
    shadow = ndimage.gaussian_filter(np.pad(layer.alpha, pad), sigma, mode="constant")
    dy, dx = round(3 * s), round(2 * s)
    h, w = shadow.shape
    iy, ix, ly, lx = _window(layer.y0 - pad + dy, layer.x0 - pad + dx, h, w, *img.shape[:2])
    img[iy, ix] *= 1 - strength * shadow[ly, lx, None]


def _full_mask(layer: _Layer, height: int, width: int) -> np.ndarray:
    """The layer's footprint (alpha >= 0.5) as a boolean mask of the whole image."""
    mask = np.zeros((height, width), dtype=bool)
    h, w = layer.alpha.shape
    iy, ix, ly, lx = _window(layer.y0, layer.x0, h, w, height, width)
    mask[iy, ix] = layer.alpha[ly, lx] >= 0.5
    return mask


def _shaded(colour: Sequence[float], shade: np.ndarray, highlight: np.ndarray | float = 0.0) -> np.ndarray:
    rgb = np.asarray(colour, dtype=np.float32)
    return (shade[..., None] * rgb + np.asarray(highlight, dtype=np.float32)[..., None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


def _spline(points: np.ndarray, spacing: float = 0.4) -> np.ndarray:
    """Dense points (N, 2) along a Catmull-Rom spline through the control points (x, y)."""
    points = np.asarray(points, dtype=np.float64)
    ext = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    pieces = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1 : i + 3]
        n = max(math.ceil(np.linalg.norm(p2 - p1) / spacing), 1)
        t = (np.arange(n) / n)[:, None]
        a, b, c = p2 - p0, 2 * p0 - 5 * p1 + 4 * p2 - p3, 3 * p1 - p0 - 3 * p2 + p3
        pieces.append(p1 + 0.5 * (a * t + b * t**2 + c * t**3))
    pieces.append(points[-1:])
    return np.vstack(pieces)


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return points @ np.array([[c, s], [-s, c]])


@dataclass(frozen=True)
class _TubeField:
    """Distance to a centre line and arc length of the nearest centre-line point, on a window."""

    y0: int
    x0: int
    dist: np.ndarray
    arc: np.ndarray


def _tube_field(curve: np.ndarray, reach: float, height: int, width: int) -> _TubeField | None:
    """Exact-ish distance to a dense curve within ``reach`` pixels of it, on a window clipped to the
    image (grown by ``reach`` so tubes leaving the image keep their shape up to its edge)."""
    lo = np.maximum(np.floor(curve.min(axis=0) - reach), [-reach - 1, -reach - 1]).astype(int)
    hi = np.minimum(np.ceil(curve.max(axis=0) + reach), [width + reach, height + reach]).astype(int)
    x0, y0 = int(lo[0]), int(lo[1])
    w, h = int(hi[0]) - x0 + 1, int(hi[1]) - y0 + 1
    if w <= 0 or h <= 0:
        return None
    ij = np.rint(curve - lo).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    if not inside.any():
        return None
    steps = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))]
    col, row = ij[inside, 0], ij[inside, 1]
    empty = np.ones((h, w), dtype=bool)
    empty[row, col] = False
    # exact x, y and arc length of the curve point that fell into each centre-line pixel
    point_x, point_y, point_arc = (np.zeros((h, w), dtype=np.float32) for _ in range(3))
    point_x[row, col], point_y[row, col] = curve[inside, 0], curve[inside, 1]
    point_arc[row, col] = steps[inside]
    near = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    ys, xs = _grid(y0, x0, h, w)
    nx, ny, arc = (field[near[0], near[1]] for field in (point_x, point_y, point_arc))
    return _TubeField(y0, x0, np.hypot(xs - nx, ys - ny), arc)


def _rounded_rect_sdf(u: np.ndarray, v: np.ndarray, w: float, h: float, r: float) -> np.ndarray:
    qx, qy = np.abs(u) - (w / 2 - r), np.abs(v) - (h / 2 - r)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage of the region sdf <= 0 (one-pixel ramp)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    x: float  # centre, pixels
    y: float
    angle: float  # degrees
    turn: float  # screw rotation, degrees
    flex: np.ndarray  # (len(path), 2) control-point offsets, pixels


def _draw_pose(c: _Component, rng: np.random.Generator, s: float, width: int, height: int) -> _Pose:
    """Nominal pose plus jitter; always draws the same amount of randomness for a component."""
    shift = np.clip(rng.normal(0.0, 1.0, 2), -2.5, 2.5) * c.jitter * s
    dangle = float(np.clip(rng.normal(0.0, 1.0), -2.5, 2.5)) * c.angle_jitter
    turn = float(rng.uniform(0.0, 180.0))
    flex = rng.normal(0.0, 1.0, (len(c.path), 2)) * c.flex * s
    return _Pose(
        width / 2 + c.xy[0] * s + shift[0], height / 2 + c.xy[1] * s + shift[1], c.angle + dangle, turn, flex
    )


def _screw_layer(c: _Component, p: _Pose, s: float, height: int, width: int) -> _Layer:
    """A domed screw head with a slot, cross or hex recess on a flat washer."""
    r = c.size[0] * s
    rw = 1.3 * r
    y0, x0, h, w = _box(p.x, p.y, rw + 2)
    ys, xs = _grid(y0, x0, h, w)
    dx, dy = xs - p.x, ys - p.y
    rho = np.hypot(dx, dy)
    rim = np.clip((rho - 0.8 * rw) / (0.2 * rw), 0, 1)
    washer = 0.78 + 0.3 * rim * -(dx * _LIGHT_2D[0] + dy * _LIGHT_2D[1]) / rw
    t = np.minimum(rho / r, 1.0)
    nz = np.sqrt(1 - t**2)
    lambert = np.clip(dx / r * _LIGHT_3D[0] + dy / r * _LIGHT_3D[1] + nz * _LIGHT_3D[2], 0, 1)
    head_alpha = _coverage(rho - r)
    shade = washer * (1 - head_alpha) + (0.3 + 0.75 * lambert) * head_alpha
    shade *= 1 - 0.4 * np.exp(-(((rho - r) / 0.8) ** 2))  # the edge of the head
    shade *= 1 - 0.8 * _recess(c.detail, dx, dy, r, p.turn)
    highlight = c.shine * lambert**12 * head_alpha
    return _Layer(y0, x0, _coverage(rho - rw), _shaded(c.colour, shade, highlight))


def _recess(detail: str, dx: np.ndarray, dy: np.ndarray, r: float, turn: float) -> np.ndarray:
    ca, sa = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    if detail == "hex":
        a = np.abs(np.arctan2(v, u)) % (math.pi / 3) - math.pi / 6
        return _coverage(np.hypot(u, v) * np.cos(a) - 0.38 * r)
    slot = _coverage(_rounded_rect_sdf(u, v, 1.5 * r, 0.26 * r, 0.05 * r))
    if detail == "cross":
        slot = np.maximum(slot, _coverage(_rounded_rect_sdf(v, u, 1.5 * r, 0.26 * r, 0.05 * r)))
    return slot


def _hole_layer(c: _Component, p: _Pose, s: float) -> _Layer:
    """The dark threaded hole under a screw, visible when the screw is missing."""
    r = 0.55 * c.size[0] * s
    y0, x0, h, w = _box(p.x, p.y, r + 2)
    ys, xs = _grid(y0, x0, h, w)
    rho = np.hypot(xs - p.x, ys - p.y)
    shade = 0.25 + 0.5 * np.clip(rho / r, 0, 1) ** 4
    return _Layer(y0, x0, _coverage(rho - r), _shaded((0.12, 0.12, 0.12), shade))


def _block_layer(c: _Component, p: _Pose, s: float, height: int, width: int) -> _Layer:
    """A rounded rectangle (clip, connector, bracket) with bevelled, directionally lit edges."""
    bw, bh, br = (v * s for v in c.size)
    ca, sa = math.cos(math.radians(p.angle)), math.sin(math.radians(p.angle))
    half_x, half_y = (abs(bw * ca) + abs(bh * sa)) / 2 + 3, (abs(bw * sa) + abs(bh * ca)) / 2 + 3
    y0, x0, h, w = _box(p.x, p.y, half_x, half_y)
    ys, xs = _grid(y0, x0, h, w)
    dx, dy = xs - p.x, ys - p.y
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    sdf = _rounded_rect_sdf(u, v, bw, bh, br)
    gy, gx = np.gradient(sdf)  # outward normal near the edge
    bevel = np.clip(1 + sdf / (2.5 * s), 0, 1)  # 1 at the edge, 0 inside
    shade = 0.92 - 0.45 * bevel * (gx * _LIGHT_2D[0] + gy * _LIGHT_2D[1])
    shade -= 0.12 * (dx * _LIGHT_2D[0] + dy * _LIGHT_2D[1]) / max(bw, bh)  # brighter towards the light
    if c.detail == "socket":
        shade *= 1 - 0.65 * _coverage(_rounded_rect_sdf(u, v, 0.6 * bw, 0.45 * bh, 0.1 * bh))
    elif c.detail == "hole":
        shade *= 1 - 0.75 * _coverage(np.hypot(u, v) - 0.2 * min(bw, bh))
    return _Layer(y0, x0, _coverage(sdf), _shaded(c.colour, shade))


def _tube_curve(c: _Component, p: _Pose, s: float) -> np.ndarray:
    points = _rotate(np.asarray(c.path, dtype=np.float64) * s, p.angle) + p.flex + [p.x, p.y]
    return _spline(points)


def _tube_layer(c: _Component, p: _Pose, s: float, height: int, width: int) -> _Layer:
    """A cylinder along a smooth centre line: pipe, wire, corrugated conduit or staple."""
    r = c.size[0] * s
    field = _tube_field(_tube_curve(c, p, s), r + 2, height, width)
    if field is None:
        return _Layer(0, 0, np.zeros((1, 1), np.float32), np.zeros((1, 1, 3), np.float32))
    t = np.minimum(field.dist / r, 1.0)
    profile = np.sqrt(1 - t**2)
    shade = 0.4 + 0.6 * profile
    if c.detail == "ribbed":
        shade *= 1 - 0.35 * (0.5 + 0.5 * np.cos(2 * math.pi * field.arc / (2.2 * s))) * profile
    highlight = c.shine * np.exp(-((t / 0.3) ** 2))
    return _Layer(field.y0, field.x0, _coverage(field.dist - r), _shaded(c.colour, shade, highlight))


_LAYER_BUILDERS = {"screw": _screw_layer, "block": _block_layer, "tube": _tube_layer}


def _layer(c: _Component, p: _Pose, s: float, height: int, width: int) -> _Layer:
    return _LAYER_BUILDERS[c.kind](c, p, s, height, width)


# ----------------------------------------------------------------------------------------------
# Surface, lighting and noise
# ----------------------------------------------------------------------------------------------


def _upsampled_noise(rng: np.random.Generator, shape: tuple[int, int], height: int, width: int) -> np.ndarray:
    """Smooth noise: white noise of ``shape`` (rows, cols) resized bicubically to the image size."""
    small = rng.standard_normal(shape, dtype=np.float32)
    return np.array(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def _surface(surface: _Surface, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The textured part: mottling, unevenness, optional brushing, grain (float32, HxWx3, 0..1)."""
    layers = [
        (surface.blotch, (max(height // 64, 2), max(width // 64, 2))),
        (surface.mid, (height // 12, width // 12)),
    ]
    if surface.brushed:
        layers.append((surface.brushed, (height, max(width // 40, 2))))
    lum = np.full((height, width), 1.0, dtype=np.float32)
    for amplitude, shape in layers:
        noise = _upsampled_noise(rng, shape, height, width)
        noise *= amplitude
        lum += noise
    grain = rng.standard_normal((height, width), dtype=np.float32)
    grain *= surface.grain
    lum += grain
    return lum[..., None] * np.asarray(surface.colour, dtype=np.float32)


def _light(img: np.ndarray, surface: _Surface, rng: np.random.Generator) -> None:
    """Global gain, colour cast, a linear gradient in a random direction, and vignetting."""
    height, width = img.shape[:2]
    gain = rng.uniform(0.85, 1.15)
    cast = 1 + np.clip(rng.normal(0, 0.03, 3), -0.08, 0.08)
    theta, amplitude = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.15)
    ys, xs = _grid(0, 0, height, width)
    yn, xn = (ys - height / 2) / height, (xs - width / 2) / width
    field = (1 + amplitude * (math.cos(theta) * xn + math.sin(theta) * yn)) * (
        1 - surface.vignette * 2 * (xn**2 + yn**2)
    )
    img *= field[..., None]
    img *= (gain * cast).astype(np.float32)


def _quantize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = rng.standard_normal(img.shape, dtype=np.float32)
    noisy *= _NOISE_SIGMA
    noisy += img * 255
    return np.clip(np.rint(noisy, out=noisy), 0, 255, out=noisy).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Logical defects: missing and misplaced components
# ----------------------------------------------------------------------------------------------


def _removable(product: _Product) -> list[int]:
    return [i for i, c in enumerate(product.components) if c.removable]


def _plan_missing(
    product: _Product, poses: list[_Pose], rng: np.random.Generator, s: float, height: int, width: int
) -> tuple[list[_Pose | None], list[np.ndarray]]:
    """Remove 1 or 2 removable components; each mask is a footprint where the component should be."""
    candidates = _removable(product)
    count = 2 if len(candidates) >= 2 and rng.random() < 0.4 else 1
    chosen = sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))
    drawn: list[_Pose | None] = list(poses)
    masks = []
    for i in chosen:
        masks.append(_full_mask(_layer(product.components[i], poses[i], s, height, width), height, width))
        drawn[i] = None
    return drawn, masks


def _displacement(
    c: _Component, p: _Pose, extent: float, rng: np.random.Generator, s: float, height: int, width: int
) -> tuple[float, float]:
    """A move of the component well beyond its own extent, keeping it inside the image."""
    margin = extent / 2 + 6
    for _ in range(32):
        if c.slide is not None:
            direction = math.radians(p.angle + c.slide[0] + (180 if rng.random() < 0.5 else 0))
            distance = rng.uniform(c.slide[1], c.slide[2]) * s
        else:
            direction = rng.uniform(0, 2 * math.pi)
            distance = rng.uniform(1.25, 1.8) * extent
        dx, dy = distance * math.cos(direction), distance * math.sin(direction)
        if margin <= p.x + dx <= width - margin and margin <= p.y + dy <= height - margin:
            return dx, dy
    towards = math.atan2(height / 2 - p.y, width / 2 - p.x)
    return 1.25 * extent * math.cos(towards), 1.25 * extent * math.sin(towards)


def _plan_misplaced(
    product: _Product, poses: list[_Pose], rng: np.random.Generator, s: float, height: int, width: int
) -> tuple[list[_Pose | None], list[np.ndarray]]:
    """Move one removable component; its mask is ONE region: nominal footprint OR displaced footprint."""
    i = int(rng.choice(_removable(product)))
    c, p = product.components[i], poses[i]
    nominal = _full_mask(_layer(c, p, s, height, width), height, width)
    rows, cols = np.nonzero(nominal)
    extent = float(max(np.ptp(rows), np.ptp(cols)) + 1)
    dx, dy = _displacement(c, p, extent, rng, s, height, width)
    moved = replace(p, x=p.x + dx, y=p.y + dy)
    drawn: list[_Pose | None] = list(poses)
    drawn[i] = moved
    return drawn, [nominal | _full_mask(_layer(c, moved, s, height, width), height, width)]


_LOGICAL_PLANNERS = {"missing": _plan_missing, "misplaced": _plan_misplaced}


# ----------------------------------------------------------------------------------------------
# Structural defects: scratch, dent, stain
# ----------------------------------------------------------------------------------------------


def _local_luminance(img: np.ndarray, y0: int, x0: int, h: int, w: int) -> float:
    iy, ix, _, _ = _window(y0, x0, h, w, *img.shape[:2])
    return float(img[iy, ix].mean())


def _blend(img: np.ndarray, y0: int, x0: int, weight: np.ndarray, target: np.ndarray) -> None:
    """img <- img * (1 - weight) + target * weight on a window; target (3,) or (h, w, 3)."""
    h, w = weight.shape
    iy, ix, ly, lx = _window(y0, x0, h, w, *img.shape[:2])
    a = weight[ly, lx, None]
    tgt = target if target.ndim == 1 else target[ly, lx]
    img[iy, ix] = img[iy, ix] * (1 - a) + tgt * a


def _to_mask(y0: int, x0: int, local: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    iy, ix, ly, lx = _window(y0, x0, *local.shape, height, width)
    mask[iy, ix] = local[ly, lx]
    return mask


def _scratch(img: np.ndarray, rng: np.random.Generator, s: float, cx: float, cy: float) -> np.ndarray:
    """A thin, slightly wandering line, bright on dark surfaces and dark on bright ones."""
    height, width = img.shape[:2]
    length = rng.uniform(90, 160) * s
    segments = int(rng.integers(2, 5))
    headings = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.2, segments))
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=1) * (length / segments)
    points = np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])
    points += [cx, cy] - points.mean(axis=0)
    radius = rng.uniform(1.2, 1.8) * math.sqrt(s)
    field = _tube_field(_spline(points), radius + 2, height, width)
    assert field is not None  # the centre is inside the image
    alpha = _coverage(field.dist - radius)
    bright = _local_luminance(img, field.y0, field.x0, *alpha.shape) < 0.45
    target = np.array((0.93, 0.93, 0.9) if bright else (0.04, 0.04, 0.05), dtype=np.float32)
    _blend(img, field.y0, field.x0, alpha * rng.uniform(0.75, 0.9), target)
    return _to_mask(field.y0, field.x0, field.dist <= radius, height, width)


def _blob_radius(rng: np.random.Generator, angle: np.ndarray, roughness: float) -> np.ndarray:
    """1 + a few random low harmonics of the polar angle: an irregular closed outline."""
    radius = np.ones_like(angle)
    for k in range(2, 6):
        radius += rng.uniform(0, roughness) / k * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
    return radius


def _ellipse_coords(
    rng: np.random.Generator, s: float, cx: float, cy: float, size: tuple[float, float], roughness: float
) -> tuple[int, int, np.ndarray]:
    """Window and normalized radius (1 on an irregular elliptical outline) around (cx, cy)."""
    a = rng.uniform(*size) * s
    b = a * rng.uniform(0.6, 0.95)
    phi = rng.uniform(0, math.pi)
    y0, x0, h, w = _box(cx, cy, a * (1 + roughness) + 3)
    ys, xs = _grid(y0, x0, h, w)
    dx, dy = xs - cx, ys - cy
    u = (dx * math.cos(phi) + dy * math.sin(phi)) / a
    v = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
    rho = np.hypot(u, v) / _blob_radius(rng, np.arctan2(v, u), roughness)
    return y0, x0, rho.astype(np.float32)


def _dent(img: np.ndarray, rng: np.random.Generator, s: float, cx: float, cy: float) -> np.ndarray:
    """A shallow hollow: the wall facing the light is bright, the one turned away dark."""
    height, width = img.shape[:2]
    y0, x0, rho = _ellipse_coords(rng, s, cx, cy, (10, 17), 0.15)
    depth = np.clip(1 - rho**2, 0, 1) ** 2
    gy, gx = np.gradient(depth)  # the hollow's surface normal tilts along the depth gradient
    slope = (gx * _LIGHT_2D[0] + gy * _LIGHT_2D[1]) / max(float(np.hypot(gx, gy).max()), 1e-6)
    shade = np.clip(1 + rng.uniform(0.45, 0.6) * slope - 0.2 * depth, 0.2, 2.0)
    sheen = 0.1 * np.clip(slope, 0, 1)  # the lit wall catches light even on a dark surface
    h, w = rho.shape
    iy, ix, ly, lx = _window(y0, x0, h, w, height, width)
    img[iy, ix] = img[iy, ix] * shade[ly, lx, None] + sheen[ly, lx, None]
    return _to_mask(y0, x0, rho <= 1, height, width)


def _stain(img: np.ndarray, rng: np.random.Generator, s: float, cx: float, cy: float) -> np.ndarray:
    """An irregular translucent blob: dark oil on bright surfaces, pale residue on dark ones."""
    height, width = img.shape[:2]
    y0, x0, rho = _ellipse_coords(rng, s, cx, cy, (10, 22), 0.35)
    edge = 1.5 / (10 * s)  # about 1.5 pixels of soft edge
    alpha = np.clip((1 - rho) / edge + 0.5, 0, 1)
    mottle = 0.8 + 0.2 * np.cos(rho * rng.uniform(6, 12) + rng.uniform(0, 2 * math.pi))
    opacity = rng.uniform(0.65, 0.85)
    dark_surface = _local_luminance(img, y0, x0, *rho.shape) < 0.3
    colour = (0.78, 0.72, 0.55) if dark_surface else (0.10, 0.07, 0.04)
    _blend(img, y0, x0, (alpha * mottle * opacity).astype(np.float32), np.array(colour, dtype=np.float32))
    return _to_mask(y0, x0, alpha >= 0.5, height, width)


_STRUCTURAL = {"scratch": _scratch, "dent": _dent, "stain": _stain}


def _apply_structural(img: np.ndarray, kind: str, rng: np.random.Generator, s: float) -> list[np.ndarray]:
    """1 or 2 defects of one kind, placed apart from each other and from the image border."""
    height, width = img.shape[:2]
    margin = 45 * s
    count = 2 if rng.random() < 0.35 else 1
    centres: list[tuple[float, float]] = []
    for _ in range(count):
        for _attempt in range(16):
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            if all(math.hypot(cx - x, cy - y) > 90 * s for x, y in centres):
                break
        centres.append((cx, cy))
    return [_STRUCTURAL[kind](img, rng, s, cx, cy) for cx, cy in centres]


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------


def _check_category(category: str) -> _Product:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {sorted(CATEGORIES)}")
    return _PRODUCTS[category]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def defect_types(category: str) -> tuple[str, ...]:
    """The defect types (folder names under test/) of a category."""
    return tuple(d.kind for d in _check_category(category).defects)


def generate_image(
    category: str, seed: int, split: str, index: int, defect: str | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image of a category.

    Returns the image (uint8, H x W x 3) and its defect regions as boolean H x W masks (empty for a
    good image). ``index`` numbers images within the split (see the module docstring); ``defect`` must
    be one of the category's defect types, and None on the train split.
    """
    product = _check_category(category)
    seed = _check_seed(seed)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if defect is not None and defect not in defect_types(category):
        raise ValueError(f"{category} has no defect {defect!r}; expected one of {defect_types(category)}")
    if defect is not None and split == "train":
        raise ValueError("the train split holds good images only (defect must be None)")

    width, height = CATEGORIES[category]
    s = height / 400

    def rng(stream: str) -> np.random.Generator:
        return _rng(seed, category, split, int(index), stream)

    img = _surface(product.surface, rng("background"), height, width)
    pose_rng = rng("pose")
    poses = [_draw_pose(c, pose_rng, s, width, height) for c in product.components]
    drawn: list[_Pose | None] = list(poses)
    masks: list[np.ndarray] = []
    if defect in _LOGICAL_PLANNERS:
        drawn, masks = _LOGICAL_PLANNERS[defect](product, poses, rng("defect"), s, height, width)

    for c, nominal, p in zip(product.components, poses, drawn, strict=True):
        if c.hole:
            _paste(img, _hole_layer(c, nominal, s))
        if p is not None:
            layer = _layer(c, p, s, height, width)
            _cast_shadow(img, layer, s, c.shadow)
            _paste(img, layer)

    if defect in _STRUCTURAL:
        masks = _apply_structural(img, defect, rng("defect"), s)
    _light(img, product.surface, rng("lighting"))
    return _quantize(img, rng("noise")), masks


# ----------------------------------------------------------------------------------------------
# The dataset on disk
# ----------------------------------------------------------------------------------------------


@cache
def _typical_area(category: str) -> int:
    """Mean footprint (pixels) of the removable components at their nominal poses, rounded to 10."""
    product = _PRODUCTS[category]
    width, height = CATEGORIES[category]
    s = height / 400
    areas = []
    for c in product.components:
        if c.removable:
            x, y = width / 2 + c.xy[0] * s, height / 2 + c.xy[1] * s
            pose = _Pose(x, y, c.angle, 0.0, np.zeros((len(c.path), 2)))
            areas.append(int(_full_mask(_layer(c, pose, s, height, width), height, width).sum()))
    return round(float(np.mean(areas)) / 10) * 10


def defects_config(category: str) -> list[dict[str, object]]:
    """The category's defects_config.json entries (AutoVI / MVTec LOCO format)."""
    entries: list[dict[str, object]] = []
    for d in _check_category(category).defects:
        threshold: float | int = d.threshold if d.threshold is not None else _typical_area(category)
        entries.append(
            {
                "defect_name": d.kind,
                "pixel_value": d.pixel_value,
                "saturation_threshold": float(threshold) if d.relative else int(threshold),
                "relative_saturation": d.relative,
            }
        )
    return entries


@dataclass(frozen=True)
class _Sample:
    """One test or train image to write, with where its ground truth goes."""

    category: str
    seed: int
    split: str
    index: int
    defect: str | None
    image_path: Path
    truth_dir: Path | None
    pixel_value: int


def _samples(root: Path, category: str, seed: int, size: str) -> Iterator[_Sample]:
    """Train images, then test images: good first, then the defect types in turn."""
    n_train, n_good, n_defective = _COUNTS[size][category]
    kinds = defect_types(category)
    values = {d.kind: d.pixel_value for d in _PRODUCTS[category].defects}
    for i in range(n_train):
        yield _Sample(category, seed, "train", i, None, root / "train" / "good" / f"{i:04d}.png", None, 0)
    for i in range(n_good):
        yield _Sample(category, seed, "test", i, None, root / "test" / "good" / f"{i:04d}.png", None, 0)
    for j in range(n_defective):
        kind, stem = kinds[j % len(kinds)], f"{j // len(kinds):04d}"
        yield _Sample(
            category, seed, "test", n_good + j, kind,
            root / "test" / kind / f"{stem}.png", root / "ground_truth" / kind / stem, values[kind],
        )


def _write_sample(sample: _Sample) -> None:
    image, masks = generate_image(sample.category, sample.seed, sample.split, sample.index, sample.defect)
    sample.image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(sample.image_path, **_PNG_OPTIONS)
    if sample.truth_dir is not None:
        sample.truth_dir.mkdir(parents=True, exist_ok=True)
        for k, mask in enumerate(masks):
            channel = np.where(mask, np.uint8(sample.pixel_value), np.uint8(0))
            Image.fromarray(np.repeat(channel[..., None], 3, axis=2)).save(
                sample.truth_dir / f"{k:03d}.png", **_PNG_OPTIONS
            )


def _category_counts(category: str, size: str) -> dict[str, object]:
    n_train, n_good, n_defective = _COUNTS[size][category]
    kinds = defect_types(category)
    per_kind = {k: len(range(i, n_defective, len(kinds))) for i, k in enumerate(kinds)}
    return {
        "image_size": list(CATEGORIES[category]),
        "train": n_train,
        "test_good": n_good,
        "test_defective": per_kind,
    }


def _read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "dataset.json")


def _existing_manifest(out: Path, seed: int, size: str) -> dict | None:
    """The manifest of a previous generation into ``out`` with the same settings; None for an empty
    or absent folder; DataError for any other non-empty folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if not any(out.iterdir()):
        return None
    manifest = _read_manifest(out)
    if manifest is None:
        raise DataError(out, "is not empty and holds no synthetic dataset; choose an empty or new folder")
    found = (manifest.get("version"), manifest.get("seed"), manifest.get("size"))
    if found != (GENERATOR_VERSION, seed, size):
        raise DataError(
            out,
            f"holds a synthetic dataset with version={manifest.get('version')}, seed={manifest.get('seed')}, "
            f"size={manifest.get('size')!r}, not version={GENERATOR_VERSION}, seed={seed}, size={size!r}; "
            "delete it or choose another folder",
        )
    return manifest


def _workers(requested: int | None, n_images: int) -> int:
    if requested is not None:
        return requested
    if n_images < 16:
        return 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, 8))


def generate_dataset(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "small",
    categories: Sequence[str] | None = None,
    progress: bool = True,
    *,
    workers: int | None = None,
) -> Path:
    """Write the synthetic dataset in the AutoVI layout under ``out_dir`` and return ``out_dir``.

    ``size`` is "tiny" (unit tests), "small" (demos) or "full" (AutoVI's image counts). Categories
    already generated with the same seed and size are skipped ("already generated"); a non-empty
    folder that is not such a dataset is refused with DataError (a ValueError). Each category is
    written to a hidden temporary folder and renamed when complete, and the manifest ``dataset.json``
    lists the complete categories, so an interrupted run can simply be started again. ``workers``:
    processes (default: one for small jobs, else the available cores, at most 8); the files do not
    depend on it.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    seed = _check_seed(seed)
    if isinstance(categories, str):
        categories = [categories]
    wanted = list(CATEGORIES) if categories is None else list(dict.fromkeys(categories))
    for category in wanted:
        _check_category(category)
    if not wanted:
        raise ValueError("no category to generate")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")

    out = Path(out_dir)
    manifest = _existing_manifest(out, seed, size)
    if manifest is None:
        manifest = {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "seed": seed,
            "size": size,
            "layout": "autovi",
            "categories": {},
        }
    todo = [c for c in wanted if c not in manifest["categories"]]
    if not todo:
        return out  # already generated
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)

    total = sum(sum(_COUNTS[size][c][:2]) + _COUNTS[size][c][2] for c in todo)
    n_workers = _workers(workers, total)
    context = get_context("fork") if "fork" in get_all_start_methods() else None
    pool = ProcessPoolExecutor(n_workers, mp_context=context) if n_workers > 1 else None
    try:
        with tqdm(total=total, unit="img", disable=not progress, desc="synthetic data") as bar:
            for category in todo:
                bar.set_postfix_str(category)
                partial, final = out / f".partial-{category}", out / category
                for stale in (partial, final):  # left by an interrupted run (not in the manifest)
                    if stale.exists():
                        shutil.rmtree(stale)
                partial.mkdir()
                config = json.dumps(defects_config(category), indent=2) + "\n"
                (partial / "defects_config.json").write_text(config)
                samples = list(_samples(partial, category, seed, size))
                mapper = pool.map if pool is not None else map
                for _ in mapper(_write_sample, samples):
                    bar.update()
                os.replace(partial, final)
                manifest["categories"][category] = _category_counts(category, size)
                _write_manifest(out, manifest)
    finally:
        if pool is not None:
            pool.shutdown()
    return out
