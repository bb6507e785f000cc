"""Patch extraction throughput: medray's extraction job vs a naive single-process OpenSlide loop.

Same slides, same grid, same run. Two baselines:
- "naive, full grid": what a plain script does — read every grid position with OpenSlide, keep the
  patches whose mean saturation says tissue, PNG-encode them, write one Parquet file per slide;
- "naive, tissue grid": the same loop over exactly the positions medray's tissue mask selected
  (so the ratio against it is parallelism and overhead alone, with no skipping credited).
medray's time includes planning (tissue masks, grids, the review PNGs) and writing its shards and
markers. "CPU s" is what each used in CPU time — for medray its driver and every Ray process — which
stays meaningful when other work shares the machine and the wall-clock figures do not.

    PYTHONPATH=platform .venv/bin/python benchmarks/wsi_extract.py                  # 12 slides of 2048 x 1536
    PYTHONPATH=platform .venv/bin/python benchmarks/wsi_extract.py --slides 6 --width 6144 --height 4608
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import openslide
import pandas as pd
import ray

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

from process_memory import tree_cpu_seconds

from medray.data.manifest import Manifest
from medray.wsi import demo_slides
from medray.wsi.extract import ExtractSpec, extract_patches, plan_slide, png
from medray.wsi.grid import GridSpec
from medray.wsi.manifest import read_slide_manifest
from medray.wsi.tissue import MIN_SATURATION, saturation


def naive(slides: list[str], grids: dict[str, pd.DataFrame], patch_size: int, out: str, check_tissue: bool) -> int:
    """One process: OpenSlide read_region per position, resize, PNG, one Parquet per slide."""
    from PIL import Image

    kept = 0
    for n, uri in enumerate(slides):
        slide = openslide.OpenSlide(uri)
        rows = []
        for r in grids[uri].itertuples(index=False):
            region = slide.read_region((int(r.x), int(r.y)), int(r.level), (int(r.read_size), int(r.read_size))).convert("RGB")
            if region.size[0] != patch_size:
                region = region.resize((patch_size, patch_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            pixels = np.asarray(region)
            if check_tissue and (saturation(pixels) > MIN_SATURATION).mean() < 0.5:
                continue
            rows.append({"x": r.x, "y": r.y, "patch": png(pixels)})
        slide.close()
        pd.DataFrame(rows).to_parquet(os.path.join(out, f"slide{n}.parquet"))
        kept += len(rows)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--chunk", type=int, default=64, help="patches per extraction task")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="wsi-bench-")
    csv = demo_slides.generate(os.path.join(work, "slides"), args.slides, args.width, args.height, seed=0)
    manifest = read_slide_manifest(csv)
    slides = list(manifest.frame["image"])
    spec = ExtractSpec(GridSpec(args.target_mpp, args.patch_size, min_tissue=0.5), chunk_patches=args.chunk)
    full = ExtractSpec(GridSpec(args.target_mpp, args.patch_size, min_tissue=0.0))

    rows = manifest.frame.to_dict("records")
    full_grids = {r["image"]: plan_slide(r, manifest.labels, full)[0] for r in rows}
    tissue_grids = {r["image"]: plan_slide(r, manifest.labels, spec)[0] for r in rows}
    print(f"{len(slides)} slides {args.width}x{args.height}, patches {args.patch_size} px at {args.target_mpp} µm/px, {args.cpus} CPUs")
    print(f"load average before: {os.getloadavg()[0]:.1f} (other work on the machine slows the parallel run most)")

    os.makedirs(os.path.join(work, "naive_full"))
    started, cpu = time.perf_counter(), time.process_time()
    kept_full = naive(slides, full_grids, args.patch_size, os.path.join(work, "naive_full"), check_tissue=True)
    t_full, cpu_full = time.perf_counter() - started, time.process_time() - cpu
    os.makedirs(os.path.join(work, "naive_tissue"))
    started, cpu = time.perf_counter(), time.process_time()
    kept_tissue = naive(slides, tissue_grids, args.patch_size, os.path.join(work, "naive_tissue"), check_tissue=False)
    t_tissue, cpu_tissue = time.perf_counter() - started, time.process_time() - cpu

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    frame = manifest.frame.assign(split="train")
    # Warm-up on one slide per CPU, untimed: starts Ray's worker processes and has each import the
    # extraction code, a once-per-cluster cost that a real extraction of hundreds of slides pays once
    # and the naive loop never pays.
    started = time.perf_counter()
    extract_patches(Manifest(frame.head(args.cpus), manifest.labels), os.path.join(work, "warmup"), spec, progress=False)
    t_warmup = time.perf_counter() - started
    started, cpu = time.perf_counter(), tree_cpu_seconds()
    result = extract_patches(Manifest(frame, manifest.labels), os.path.join(work, "medray"), spec, progress=False)
    t_medray, cpu_medray = time.perf_counter() - started, tree_cpu_seconds() - cpu
    ray.shutdown()

    table = pd.DataFrame(
        [
            ("naive loop, full grid + per-patch tissue check", kept_full, t_full, cpu_full),
            ("naive loop, medray's tissue grid", kept_tissue, t_tissue, cpu_tissue),
            ("medray extract_patches (Ray)", result.patches, t_medray, cpu_medray),
        ],
        columns=["method", "patches", "seconds", "CPU s"],
    ).set_index("method")
    table["patches/s"] = table["patches"] / table["seconds"]
    print(table.round(2).to_string())
    print(f"background grid positions skipped by the tissue mask: {result.background_skipped:.1%} of {result.grid_cells}")
    print(f"speed-up vs naive full-grid loop:   {table['patches/s'].iloc[2] / table['patches/s'].iloc[0]:.2f}x")
    print(f"speed-up vs naive tissue-grid loop: {table['patches/s'].iloc[2] / table['patches/s'].iloc[1]:.2f}x")
    print(
        f"(untimed warm-up on {min(args.cpus, len(frame))} slides, Ray workers starting: {t_warmup:.1f} s; load average after: {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
