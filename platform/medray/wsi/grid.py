"""The patch grid of one slide: where to cut patches at a target resolution, and their labels.

Patch positions are in level-0 pixels (``x``, ``y``, and ``size``, the patch's side at level 0),
as in the canonical manifest. Each patch is read from ``level`` — the coarsest pyramid level at
least as fine as the target resolution — as ``read_size`` pixels and resized to ``patch_size``, so
no patch is ever upsampled and little more than the patch itself is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medray.wsi.slides import Pyramid

COLUMNS = ["x", "y", "level", "size", "read_size", "tissue", "tumour_fraction"]


@dataclass(frozen=True)
class GridSpec:
    target_mpp: float = 1.0  # microns per pixel of the patches
    patch_size: int = 224  # pixels, at target_mpp
    stride: int | None = None  # pixels at target_mpp; default patch_size (no overlap)
    min_tissue: float = 0.5  # share of a patch the tissue mask must cover
    max_patches: int | None = None  # cap per slide, so that bags stay bounded
    cap_by: str = "random"  # "random" or "tissue" (keep the patches with the most tissue)
    seed: int = 0


def _box_means(mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
    """Mean of ``mask`` over each level-0 box ``(x, y, size)``, by a summed-area table."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    table[1:, 1:] = mask.astype(float).cumsum(0).cumsum(1)
    h, w = mask.shape

    def edges(start, limit):
        lo = np.clip(np.floor(start / downsample).astype(int), 0, limit)
        hi = np.clip(np.ceil((start + size) / downsample).astype(int), 0, limit)
        return lo, np.maximum(hi, np.minimum(lo + 1, limit))

    x0, x1 = edges(xs, w)
    y0, y1 = edges(ys, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area


def patch_grid(
    pyramid: Pyramid,
    tissue: np.ndarray,
    tissue_downsample: float,
    spec: GridSpec,
    annotation: np.ndarray | None = None,
) -> pd.DataFrame:
    """Grid positions whose tissue share passes ``spec.min_tissue``, capped at ``spec.max_patches``.

    ``annotation`` is an optional tumour mask covering the whole slide at any scale; each patch
    then gets its tumour share in ``tumour_fraction`` (NaN without a mask).
    """
    factor = spec.target_mpp / pyramid.mpp  # level-0 pixels per patch pixel
    size = spec.patch_size * factor
    step = (spec.stride or spec.patch_size) * factor
    width, height = pyramid.dimensions[0]
    level = pyramid.best_level(factor)
    read_size = max(1, round(size / pyramid.downsamples[level]))
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, step), np.arange(0, height - size + 1, step))
    xs, ys = xs.ravel(), ys.ravel()
    share = _box_means(tissue, tissue_downsample, xs, ys, size) if len(xs) else np.zeros(0)
    keep = share >= spec.min_tissue
    grid = pd.DataFrame({"x": np.round(xs[keep]).astype(np.int64), "y": np.round(ys[keep]).astype(np.int64), "tissue": share[keep]})
    grid["level"], grid["size"], grid["read_size"] = level, round(size), read_size
    if annotation is not None and len(grid):
        ann_downsample = width / annotation.shape[1]
        grid["tumour_fraction"] = _box_means(annotation > 0, ann_downsample, grid["x"].to_numpy(float), grid["y"].to_numpy(float), size)
    else:
        grid["tumour_fraction"] = np.nan
    if spec.max_patches is not None and len(grid) > spec.max_patches:
        if spec.cap_by == "tissue":
            grid = grid.sort_values("tissue", ascending=False, kind="stable").head(spec.max_patches)
        else:
            grid = grid.sample(spec.max_patches, random_state=spec.seed)
        grid = grid.sort_values(["y", "x"])
    return grid[COLUMNS].reset_index(drop=True)


def patch_labels(grid: pd.DataFrame, slide_labels: dict[str, float], tumour_label: str | None, threshold: float) -> pd.DataFrame:
    """One column per label: the slide's label, except that ``tumour_label`` comes from the annotation
    mask (positive when the patch's tumour share reaches ``threshold``) where the slide has one."""
    labels = {}
    for name, value in slide_labels.items():
        column = np.full(len(grid), value, dtype=np.float32)
        if name == tumour_label:
            annotated = grid["tumour_fraction"].notna().to_numpy()
            column[annotated] = (grid["tumour_fraction"].to_numpy()[annotated] >= threshold).astype(np.float32)
        labels[name] = column
    return pd.DataFrame(labels, index=grid.index)
