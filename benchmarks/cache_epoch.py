"""Epoch throughput of the training input: from the prepared cache vs decoding the source images.

    .venv/bin/python benchmarks/cache_epoch.py [--patients 250] [--image-size 1024] [--size 224] [--epochs 2]

Writes demo chest X-rays as ``--image-size`` PNGs (NIH's are 1024², ~0.5–1 MB), runs ``medray
prepare`` on them, then iterates the training split the way a Ray Train worker does
(``iter_torch_batches`` with a local shuffle buffer) from each source in the same Ray, on the same
machine, and prints images/s for both and their ratio. Each source's best epoch counts, so that
neither pays for starting Ray's workers. Augmentation is left out: it costs the same on both paths.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
from PIL import Image


def epoch(ds, batch_size: int) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size):
        n += len(batch["labels"])
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=1024, help="size of the source PNGs")
    parser.add_argument("--size", type=int, default=224, help="training input size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import pandas as pd
    import ray

    from medray.data.cache import prepare, training_data
    from medray.data.demo_data import FINDINGS, generate
    from medray.data.manifest import Manifest, write_manifest

    with tempfile.TemporaryDirectory() as out:
        generate(out, args.patients, 256, seed=0)
        folder = os.path.join(out, "images")
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        rng = np.random.default_rng(0)
        for path in paths:  # drawing at 1024 px is slow; upscale, with a detector's grain so files get their real size
            big = np.asarray(Image.open(path).resize((args.image_size,) * 2, Image.Resampling.BICUBIC), dtype=np.int16)
            noisy = np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path)
        megabytes = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
        frame = pd.DataFrame({"image": paths, "patient_id": [os.path.basename(p)[:8] for p in paths], "split": "train",
                              **{label: np.zeros(len(paths), np.float32) for label in FINDINGS}})  # fmt: skip
        manifest = Manifest(frame, list(FINDINGS))
        manifest_uri = write_manifest(manifest, os.path.join(out, "manifest.parquet"))

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        prepared = prepare(manifest_uri, None, args.size, 1)
        rates = {}
        for name, use_cache in (("source", False), ("cache", True)):
            ds = training_data(manifest, "train", manifest_uri, args.size, use_cache=use_cache)
            runs = [epoch(ds, args.batch_size) for _ in range(args.epochs)]
            assert all(n == len(paths) for n, _ in runs), runs
            rates[name] = len(paths) / min(t for _, t in runs)
        ray.shutdown()

    n = len(paths)
    print(f"{n} PNGs {args.image_size}px ({megabytes:.2f} MB each on average) → {args.size}px, {args.cpus} CPUs for Ray")
    print(f"medray prepare (once):               {n / prepared.seconds:8.1f} images/s ({prepared.seconds:.1f} s)")
    print(f"epoch, decoding the source images:   {rates['source']:8.1f} images/s")
    print(f"epoch, reading the prepared cache:   {rates['cache']:8.1f} images/s")
    print(f"ratio cache / source:                {rates['cache'] / rates['source']:8.1f}x")


if __name__ == "__main__":
    main()
