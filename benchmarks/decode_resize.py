"""Ray Data decode + resize (medray's training input path) against a bare Pillow loop on the same files.

    .venv/bin/python benchmarks/decode_resize.py [--patients 400] [--image-size 1024] [--size 128]

Prints images/s for both and their ratio; both are measured in this run, on this machine. The Ray
path uses every core Ray is given; the baseline is one process, the way a simple script would do it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


def pillow_loop(paths: list[str], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return time.perf_counter() - start


def ray_data(frame, labels: list[str], size: int) -> float:
    from medray.data import decoded

    start = time.perf_counter()
    rows = decoded(frame, labels, size).materialize().count()
    assert rows == len(frame)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=1024, help="size of the PNGs decoded (NIH's are 1024)")
    parser.add_argument("--size", type=int, default=128, help="training input size")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import logging

    import pandas as pd
    import ray

    from medray.data.demo_data import FINDINGS, generate

    with tempfile.TemporaryDirectory() as out:
        generate(out, args.patients, 256, seed=0)
        paths = sorted(os.path.join(out, "images", f) for f in os.listdir(os.path.join(out, "images")))
        for path in paths:  # drawing at 1024 px is slow; upscaling gives files of the real size
            Image.open(path).resize((args.image_size, args.image_size), Image.Resampling.BICUBIC).save(path)
        frame = pd.DataFrame({"image": paths, **{label: np.zeros(len(paths), np.float32) for label in FINDINGS}})

        pillow_loop(paths[:20], args.size)  # warm the page cache for both contenders
        baseline = pillow_loop(paths, args.size)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray_data(frame.head(50), list(FINDINGS), args.size)  # start the worker processes once
        medray = ray_data(frame, list(FINDINGS), args.size)
        ray.shutdown()

    n = len(paths)
    print(f"{n} PNGs {args.image_size}px → {args.size}px, {args.cpus} CPUs for Ray")
    print(f"bare Pillow loop (1 process): {n / baseline:8.1f} images/s")
    print(f"medray Ray Data decode path:  {n / medray:8.1f} images/s")
    print(f"ratio medray / Pillow loop:   {baseline / medray:8.2f}x")


if __name__ == "__main__":
    main()
