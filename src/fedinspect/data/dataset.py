"""One product category on disk, in the AutoVI or the MVTec AD layout (detected automatically).

AutoVI::

    <category>/train/good/*.png
    <category>/test/{good,<defect>}/*.png
    <category>/ground_truth/<defect>/<stem>/*.png     one PNG per defect region
    <category>/defects_config.json

MVTec AD::

    <category>/train/good/*.png
    <category>/test/{good,<defect>}/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png  one binary mask per image

Every problem found is raised as a :class:`~fedinspect.errors.DataError` naming the file. Two
images of one folder may not share a name (``0000.png`` and ``0000.jpg``): anomaly maps and ground
truth are matched by name. An MVTec-layout mask marks every non-zero pixel as defect, as MVTec's own
evaluation does; a mask with more than one non-zero value is read that way with a warning.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fedinspect.data.images import IMAGE_SUFFIXES, list_images, read_image, read_mask
from fedinspect.data.regions import Region, connected_component_regions, saturation_area
from fedinspect.errors import DataError

Layout = Literal["autovi", "mvtec"]
GOOD = "good"
DEFECTS_CONFIG = "defects_config.json"


@dataclass(frozen=True)
class DefectType:
    """One entry of AutoVI's ``defects_config.json``."""

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def read_defects_config(path: str | Path) -> dict[int, DefectType]:
    """Parse and validate ``defects_config.json``; returns pixel value -> defect type."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "defects_config.json not found (required by the AutoVI layout)")
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(path, f"not valid JSON ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "must be a non-empty JSON list of defect entries")
    defects: dict[int, DefectType] = {}
    for number, entry in enumerate(entries):
        where = f"entry {number}"
        try:
            name = str(entry["defect_name"])
            value = entry["pixel_value"]
            threshold = entry["saturation_threshold"]
            relative = entry["relative_saturation"]
        except (KeyError, TypeError) as error:
            raise DataError(path, f"{where} lacks key {error}") from error
        if not isinstance(value, int) or not 1 <= value <= 255:
            raise DataError(path, f"{where} ({name}): pixel_value must be an integer in 1..255, got {value!r}")
        if not isinstance(relative, bool):
            raise DataError(path, f"{where} ({name}): relative_saturation must be true or false")
        if relative and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise DataError(path, f"{where} ({name}): relative saturation_threshold must be in (0, 1]")
        if not relative and not (isinstance(threshold, int) and threshold >= 1):
            raise DataError(path, f"{where} ({name}): absolute saturation_threshold must be an integer >= 1")
        if value in defects:
            raise DataError(path, f"{where} ({name}): pixel_value {value} already used by {defects[value].name}")
        defects[value] = DefectType(name, value, float(threshold), relative)
    return defects


@dataclass(frozen=True)
class Sample:
    """One image of a category and, for a defective test image, its ground-truth files."""

    image_path: Path
    category: str
    split: Literal["train", "test"]
    defect: str
    ground_truth: tuple[Path, ...] = field(default=())

    @property
    def label(self) -> int:
        """1 for a defective image, 0 for a good one."""
        return int(self.defect != GOOD)

    @property
    def stem(self) -> str:
        return self.image_path.stem


def _named_images(folder: Path) -> list[Path]:
    """The folder's images, refusing two that share a name (``0000.png`` and ``0000.jpg``)."""
    images = list_images(folder)
    seen: dict[str, Path] = {}
    for path in images:
        other = seen.setdefault(path.stem, path)
        if other is not path:
            raise DataError(path, f"same name as {other}: anomaly maps and ground truth are matched by name, "
                                  "so keep only one of them")
    return images


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"missing folder ({what})")
    return path


def detect_layout(root: Path) -> Layout:
    """'autovi' when defects_config.json or per-image ground-truth folders exist, else 'mvtec'."""
    if (root / DEFECTS_CONFIG).exists():
        return "autovi"
    ground_truth = root / "ground_truth"
    if ground_truth.is_dir():
        for defect_dir in ground_truth.iterdir():
            if defect_dir.is_dir() and any(p.is_dir() for p in defect_dir.iterdir()):
                raise DataError(
                    root / DEFECTS_CONFIG,
                    "ground truth is in per-image folders (AutoVI layout) but defects_config.json is missing",
                )
    return "mvtec"


class CategoryDataset:
    """The train and test samples of one category folder, with lazy image and region loading."""

    def __init__(self, root: str | Path, layout: Layout | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "category folder not found")
        self.name = self.root.name
        self.layout: Layout = layout or detect_layout(self.root)
        self.defects: dict[int, DefectType] = (
            read_defects_config(self.root / DEFECTS_CONFIG) if self.layout == "autovi" else {}
        )
        self.train = self._scan_train()
        self.test = self._scan_test()

    def __repr__(self) -> str:
        return (
            f"CategoryDataset({self.name!r}, layout={self.layout!r}, train={len(self.train)}, "
            f"test={len(self.test)})"
        )

    @property
    def defect_types(self) -> list[str]:
        """Defect folder names found in the test split, sorted."""
        return sorted({s.defect for s in self.test if s.label})

    def _scan_train(self) -> list[Sample]:
        folder = _require_dir(self.root / "train" / GOOD, "training images of good parts")
        samples = [Sample(p, self.name, "train", GOOD) for p in _named_images(folder)]
        if not samples:
            raise DataError(folder, "no training images found")
        return samples

    def _scan_test(self) -> list[Sample]:
        test_dir = _require_dir(self.root / "test", "test images")
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image_path in _named_images(defect_dir):
                truth = () if defect == GOOD else self._ground_truth_files(defect, image_path)
                samples.append(Sample(image_path, self.name, "test", defect, truth))
        if not samples:
            raise DataError(test_dir, "no test images found")
        return samples

    def _ground_truth_files(self, defect: str, image_path: Path) -> tuple[Path, ...]:
        defect_dir = self.root / "ground_truth" / defect
        if self.layout == "autovi":
            folder = defect_dir / image_path.stem
            files = list_images(folder) if folder.is_dir() else []
            if not files:
                raise DataError(image_path, f"defective test image has no ground truth: expected PNGs in {folder}")
            return tuple(files)
        candidates = [defect_dir / f"{image_path.stem}_mask{suffix}" for suffix in IMAGE_SUFFIXES]
        candidates += [defect_dir / f"{image_path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if len(found) > 1:
            raise DataError(image_path, f"ambiguous ground truth: {', '.join(map(str, found))}; keep only one")
        if found:
            return (found[0],)
        raise DataError(
            image_path, f"defective test image has no ground truth: expected {candidates[0]}"
        )

    def load_image(self, sample: Sample) -> np.ndarray:
        """The sample's image as uint8 RGB (H, W, 3)."""
        return read_image(sample.image_path)

    def load_regions(self, sample: Sample, shape: tuple[int, int]) -> list[Region]:
        """The defect regions of a test sample; ``shape`` is its image's (height, width).

        Good samples have none. A defective MVTec-layout image with an empty mask also has none
        (it then counts for image-level metrics only), with a warning naming the file; any non-zero
        pixel of an MVTec-layout mask is defect (a warning names masks with several non-zero values).
        """
        regions: list[Region] = []
        for path in sample.ground_truth:
            mask = read_mask(path)
            if mask.shape[:2] != tuple(shape):
                raise DataError(
                    path,
                    f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                    f"{sample.image_path} ({shape[1]}x{shape[0]})",
                )
            found = self._autovi_regions(path, mask) if self.layout == "autovi" else self._mvtec_regions(
                path, mask, sample.defect
            )
            if not found:
                warnings.warn(f"{path}: empty ground-truth mask; the image counts for image-level metrics only",
                              stacklevel=2)
            regions.extend(found)
        return regions

    def _autovi_regions(self, path: Path, mask: np.ndarray) -> list[Region]:
        channels = [mask] if mask.ndim == 2 else [mask[..., c] for c in range(min(mask.shape[2], 3))]
        unique_channels: list[np.ndarray] = []
        for channel in channels:
            if not any(np.array_equal(channel, kept) for kept in unique_channels):
                unique_channels.append(channel)
        regions = []
        for channel in unique_channels:
            values = np.unique(channel)
            values = values[values != 0]
            if values.size == 0:
                continue
            if values.size > 1:
                raise DataError(path, f"a ground-truth channel must hold one defect value, found {values.tolist()}")
            value = int(values[0])
            if value not in self.defects:
                raise DataError(
                    path,
                    f"mask value {value} is not in {DEFECTS_CONFIG} (known values: {sorted(self.defects)})",
                )
            defect = self.defects[value]
            region_mask = channel == value
            area = int(region_mask.sum())
            regions.append(
                Region(region_mask, saturation_area(area, defect.saturation_threshold, defect.relative_saturation),
                       defect.name)
            )
        return regions

    @staticmethod
    def _mvtec_regions(path: Path, mask: np.ndarray, defect: str) -> list[Region]:
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        values = np.unique(mask)
        values = values[values != 0]
        if values.size > 1:
            shown = ", ".join(str(v) for v in values[:8]) + (f", ... ({values.size} values)" if values.size > 8 else "")
            warnings.warn(f"{path}: mask is not binary (non-zero values {shown}); every non-zero pixel counts as "
                          "defect", stacklevel=3)
        return connected_component_regions(mask != 0, defect)


def find_categories(dataset_dir: str | Path) -> list[Path]:
    """Category folders of a dataset: the folder itself if it holds ``train/``, else its subfolders that do."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DataError(dataset_dir, "dataset folder not found")
    if (dataset_dir / "train").is_dir():
        return [dataset_dir]
    categories, others = [], []
    for folder in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / "train").is_dir():
            categories.append(folder)
        elif (folder / "test").is_dir() or (folder / "ground_truth").is_dir():
            raise DataError(folder / "train", "missing folder: a category with test/ or ground_truth/ needs train/good")
        else:
            others.append(folder)
    if not categories:
        raise DataError(dataset_dir, "no category folder found (a category holds train/ and test/)")
    for folder in others:
        warnings.warn(f"{folder}: not a category (no train/ folder); ignored", stacklevel=2)
    return categories


def training_images(dataset_dir: str | Path) -> dict[str, list[Path]]:
    """A factory's own training images: ``{category: sorted train/good images}`` of its dataset folder.

    The folder has the dataset layout (one subfolder per category, or a single category folder) but only
    ``train/good`` is needed: a federated client never sees a test split.
    """
    images: dict[str, list[Path]] = {}
    for root in find_categories(dataset_dir):
        folder = root / "train" / GOOD
        paths = list_images(folder) if folder.is_dir() else []
        if paths:
            images[root.name] = paths
    if not images:
        raise DataError(dataset_dir, "no training image in any category's train/good")
    return images
