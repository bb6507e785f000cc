"""Synthetic whole-slide images for the demo and the tests: pyramidal TIFFs that OpenSlide reads.

Each slide is pink "tissue" with purple nuclei on white glass; a tumour-positive slide also holds a
region of dense, dark, larger nuclei — a texture and colour a small network can learn from patches.
Some positive slides come with an annotation mask of their tumour (PNG at 1/16 scale). A slide
manifest (``slides.csv``: image, patient_id, slide_id, tumour, mask) lists them; paths in it are
relative to the CSV, as a user's own manifest may be.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import ndimage

MPP = 0.5  # microns per pixel at level 0, as a 20x scan
DOWNSAMPLES = (1, 4, 16)
GLASS = np.array([243, 242, 246], np.float32)
STROMA = np.array([232, 160, 196], np.float32)
NUCLEUS = np.array([120, 60, 150], np.float32)
TUMOUR_NUCLEUS = np.array([55, 30, 115], np.float32)
TUMOUR_STROMA = np.array([190, 130, 200], np.float32)


def _blob(shape: tuple[int, int], rng: np.random.Generator, centre, radii) -> np.ndarray:
    """An ellipse with a ragged edge (low-frequency noise on its radius)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=max(h, w) / 25)
    return r < 1 + 4 * noise / max(noise.std(), 1e-6) * 0.08


def _paint(shape, rng, tissue: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    image = np.empty((*shape, 3), np.float32)
    image[:] = GLASS
    image[tissue] = STROMA
    image[tumour] = TUMOUR_STROMA
    noise = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 1.2)
    nuclei = (noise > 0.56) & tissue & ~tumour
    big = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.5)
    tumour_nuclei = (big > 0.52) & tumour
    image[nuclei] = NUCLEUS
    image[tumour_nuclei] = TUMOUR_NUCLEUS
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return image.clip(0, 255).astype(np.uint8)


def write_pyramid(path: str, image: np.ndarray, mpp: float = MPP, tile: int = 256, tiled: bool = True) -> None:
    """A pyramid OpenSlide reads: successive pages, reduced ones marked ``subfiletype=1``; the resolution
    tags give OpenSlide's ``openslide.mpp-x``."""
    with tifffile.TiffWriter(path) as tif:
        for i, d in enumerate(DOWNSAMPLES):
            level = image if d == 1 else np.asarray(Image.fromarray(image).reduce(d))
            res = 1e4 / (mpp * d)  # pixels per centimetre
            tif.write(
                level,
                photometric="rgb",
                compression="zlib",
                tile=(tile, tile) if tiled else None,
                rowsperstrip=None if tiled else 64,
                subfiletype=0 if i == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )


def make_slide(rng: np.random.Generator, width: int, height: int, tumour: bool, blank: bool = False):
    """Level-0 pixels of one slide, and its tumour mask at level 0 (all False when negative)."""
    small = (height // 8, width // 8)  # shapes are drawn at 1/8 and scaled up: cheap and smooth enough
    tissue = np.zeros(small, bool)
    if not blank:
        for _ in range(rng.integers(1, 3)):
            centre = (rng.uniform(0.3, 0.7) * small[1], rng.uniform(0.3, 0.7) * small[0])
            radii = (rng.uniform(0.18, 0.3) * small[1], rng.uniform(0.2, 0.35) * small[0])
            tissue |= _blob(small, rng, centre, radii)
    lesion = np.zeros(small, bool)
    if tumour and tissue.any():
        ys, xs = np.nonzero(ndimage.binary_erosion(tissue, iterations=6) if tissue.sum() > 400 else tissue)
        k = rng.integers(len(xs))
        radius = rng.uniform(0.08, 0.14) * min(small)
        lesion = _blob(small, rng, (xs[k], ys[k]), (radius, radius * rng.uniform(0.8, 1.2))) & tissue
    up = np.ones((8, 8), bool)
    tissue, lesion = np.kron(tissue, up)[:height, :width], np.kron(lesion, up)[:height, :width]
    return _paint((height, width), rng, tissue, lesion), lesion


def generate(out: str, slides: int = 16, width: int = 2048, height: int = 1536, seed: int = 0, masks: float = 0.5) -> str:
    """Write ``slides`` demo slides (half tumour-positive) and ``slides.csv`` under ``out``; return the CSV."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i in range(slides):
        positive = i % 2 == 1
        pixels, lesion = make_slide(rng, width, height, positive)
        name = f"slide_{i:03d}.tif"
        write_pyramid(os.path.join(out, name), pixels)
        mask = ""
        if positive and rng.random() < masks:
            mask = f"slide_{i:03d}_tumour.png"
            Image.fromarray((lesion[::16, ::16] * 255).astype(np.uint8)).save(os.path.join(out, mask))
        rows.append(
            {"image": name, "patient_id": f"DEMO{i // 2:03d}", "slide_id": f"slide_{i:03d}", "tumour": float(positive), "mask": mask}
        )
    csv = os.path.join(out, "slides.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv
