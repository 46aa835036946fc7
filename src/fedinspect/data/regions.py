"""Ground-truth defect regions with their saturation areas (the unit that sPRO averages over)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    """One annotated defect: a boolean mask at image size and its saturation area in pixels.

    In the AutoVI layout a region is one ground-truth channel (one PNG of the image's folder);
    in the MVTec layout every connected component of the mask is a region saturated at its full
    area, which turns sPRO into the classic PRO.
    """

    mask: np.ndarray
    saturation_area: int
    defect_name: str = ""

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def saturation_area(region_area: int, threshold: float, relative: bool) -> int:
    """Saturation area as the official AutoVI / MVTec LOCO evaluation defines it.

    relative: ``int(threshold * region_area)``; absolute: ``min(threshold, region_area)``.
    Never below 1 pixel for a non-empty region (the official code would divide by zero there).
    """
    if region_area <= 0:
        raise ValueError("a region must contain at least one pixel")
    area = int(threshold * region_area) if relative else min(int(threshold), int(region_area))
    return max(area, 1)


def connected_component_regions(mask: np.ndarray, defect_name: str = "") -> list[Region]:
    """Split a binary mask into 8-connected components, each saturated at its own area (classic PRO)."""
    labels, count = ndimage.label(mask.astype(bool), structure=np.ones((3, 3), dtype=int))
    regions = []
    for index in range(1, count + 1):
        component = labels == index
        regions.append(Region(component, int(component.sum()), defect_name))
    return regions
