"""What stain normalisation costs per patch at extraction, against reading the patch alone.

One process, the same patches of demo slides for every row: read (OpenSlide read_region, resize)
and PNG-encode — the work extraction does per patch today — then the same with Macenko or Reinhard
in between (medray.wsi.stain), and torchstain's own Macenko ``normalize`` (per-pixel ``lstsq``) for
the step medray solves through a pseudo-inverse instead. Prints ms per patch, the ratio to the read
alone, whether medray's Macenko gives torchstain's pixels, and how many patches kept their own
(too little stain to fit).

    PYTHONPATH=platform .venv/bin/python benchmarks/stain.py --slides 2 --patch-size 224
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from medray.wsi import demo_slides
from medray.wsi.extract import ExtractSpec, plan_slide, png, read_patch
from medray.wsi.grid import GridSpec
from medray.wsi.manifest import read_slide_manifest
from medray.wsi.slides import open_slide
from medray.wsi.stain import LIGHT, StainNormaliser, fit_stain


def timed(fn, patches: list[np.ndarray]) -> tuple[float, list]:
    start = time.perf_counter()
    out = [fn(p) for p in patches]
    return (time.perf_counter() - start) / len(patches) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--target-mpp", type=float, default=0.5, help="0.5: the demo slides' level 0, read without resizing")
    parser.add_argument("--patches", type=int, default=200, help="patches timed (spread over the slides)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        csv = demo_slides.generate(folder, slides=args.slides, seed=0)
        manifest = read_slide_manifest(csv)
        spec = ExtractSpec(GridSpec(target_mpp=args.target_mpp, patch_size=args.patch_size, min_tissue=0.5))
        grids = {row["image"]: plan_slide(row, manifest.labels, spec)[0] for row in manifest.frame.to_dict("records")}
        share = min(1.0, args.patches / sum(len(g) for g in grids.values()))
        start, patches = time.perf_counter(), []
        for uri, grid in grids.items():
            with open_slide(uri) as slide:  # once per slide, as a chunk task opens its slide once
                picked = grid.iloc[np.linspace(0, len(grid) - 1, max(1, round(share * len(grid)))).astype(int)]
                patches += [read_patch(slide, r, args.patch_size) for r in picked.to_dict("records")]
        read_ms = (time.perf_counter() - start) / len(patches) * 1000
        png_ms, _ = timed(png, patches)
        base = read_ms + png_ms
        print(f"{len(patches)} patches of {args.patch_size} px from {args.slides} demo slides")
        print(f"{'per patch':<42}{'ms':>8}{'× read + PNG':>15}")
        print(f"{'read + PNG (extraction today)':<42}{base:8.2f}{1.0:15.2f}")
        results = {}
        for method in ("macenko", "reinhard"):
            normalise = StainNormaliser(fit_stain(method))
            ms, results[method] = timed(normalise, patches)
            kept = sum(not done for _, done in results[method])
            print(f"{'read + ' + method + ' + PNG':<42}{base + ms:8.2f}{(base + ms) / base:15.2f}   kept as read: {kept}")
        stock = NumpyMacenkoNormalizer()
        normalised = [p for p, (_, done) in zip(patches, results["macenko"]) if done]
        ms, theirs = timed(lambda p: stock.normalize(p, Io=LIGHT, stains=False)[0], normalised)
        ours_ms, ours = timed(lambda p: StainNormaliser(fit_stain("macenko"))(p)[0], normalised)
        same = all(np.array_equal(a, b) for a, b in zip(ours, theirs))
        print(f"Macenko alone, on the {len(normalised)} patches it fits: torchstain's normalize {ms:.2f} ms, medray's {ours_ms:.2f} ms "
              f"({ms / ours_ms:.1f}× faster); same pixels: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
