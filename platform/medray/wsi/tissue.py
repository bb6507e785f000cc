"""Tissue detection on a low-resolution level: Otsu on saturation, morphological clean-up, small regions dropped.

Stained tissue is coloured and glass is grey-white, so saturation separates them better than
brightness (which pen marks and dust share with tissue). Otsu picks the threshold per slide, with a
floor so that a blank slide — whose saturation is all noise — is not split in two: it comes out
empty and is reported as such, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from medray.wsi.slides import Slide

MIN_SATURATION = 20  # of 255: below this no pixel is stained, whatever Otsu says


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (h, w) at the thumbnail's scale
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    downsample: float  # level-0 pixels per mask pixel
    threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def empty(self) -> bool:
        return not self.mask.any()


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut maximising the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(float)
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * np.arange(256))
    total_w, total_m = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_m * weight - mean * total_w) ** 2 / (weight * (total_w - weight))
    return float(np.nanargmax(between[:-1])) if total_w else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]


def thumbnail_level(slide: Slide, min_side: int = 512) -> int:
    """The coarsest level whose longer side still has ``min_side`` pixels (level 0 for small slides)."""
    dims = slide.pyramid.dimensions
    for level in reversed(range(len(dims))):
        if max(dims[level]) >= min_side:
            return level
    return 0


def detect(slide: Slide, min_side: int = 512, min_region_um2: float = 20_000.0, closing_um: float = 20.0) -> TissueMask:
    """The tissue mask of ``slide`` at a low-resolution level."""
    level = thumbnail_level(slide, min_side)
    thumb = slide.read_level(level)
    downsample = slide.pyramid.dimensions[0][0] / thumb.shape[1]
    um_per_px = slide.pyramid.mpp * downsample

    sat = saturation(thumb)
    threshold = max(otsu(sat), MIN_SATURATION)
    mask = sat > threshold
    radius = max(1, round(closing_um / um_per_px / 2))
    structure = ndimage.generate_binary_structure(2, 1)
    # Closing joins tissue torn into fragments; opening drops speckle; holes inside tissue are tissue.
    mask = ndimage.binary_closing(mask, structure, iterations=radius)
    mask = ndimage.binary_opening(mask, structure, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    regions, n = ndimage.label(mask)
    if n:
        areas = ndimage.sum_labels(mask, regions, index=np.arange(1, n + 1)) * um_per_px**2
        keep = np.concatenate([[False], areas >= min_region_um2])
        mask = keep[regions]
    return TissueMask(mask, thumb, downsample, threshold)


def overlay(tissue: TissueMask) -> np.ndarray:
    """The thumbnail with detected tissue tinted green and its outline drawn, for review."""
    image = tissue.thumbnail.astype(np.float32)
    green = np.array([40, 200, 60], np.float32)
    image[tissue.mask] = 0.7 * image[tissue.mask] + 0.3 * green
    edge = tissue.mask & ~ndimage.binary_erosion(tissue.mask)
    image[edge] = green
    return image.clip(0, 255).astype(np.uint8)
