"""Scoring decompression bombs: peak memory of the whole Ray process tree against good images alone.

    .venv/bin/python benchmarks/hostile_memory.py [--good 20] [--cpus 2]

Two folders are scored, each by a fresh process that starts its own local Ray: the baseline holds
``--good`` good images (1024 px PNGs and 512 px DICOMs), the hostile one the same files plus the
bombs of issue 18, each under 2.2 MB on disk: a deflated DICOM of 64 frames of 4096² at 16 bits
(2 GB inflated), a deflated 20000² RGB DICOM (1.2 GB), a deflated DICOM whose header declares 64²
and whose body inflates to 410 MB, and a 12000² 16-bit PNG (288 MB decoded). A thread sums the PSS
of the driver and every process under it (benchmarks/process_memory.py) every 50 ms and keeps the
peak. The goal: the bombs cost nothing measurable (ratio ≈ 1) and each has its error row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from process_memory import PeakSampler, tree_pss

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the bomb builders the tests use


def child(args) -> None:
    """Start Ray, score the folder, print one JSON line with the figures and every error row."""
    import logging

    import pyarrow.parquet as pq
    import ray

    from medray.config import build_config
    from medray.scoring.score import score

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    idle = tree_pss(os.getpid())
    config = build_config({"storage": args.out, "score": {
        "input": args.folder, "output": os.path.join(args.out, "scores"), "checkpoint": args.checkpoint}})  # fmt: skip
    with PeakSampler(interval=0.05) as memory:
        start = time.perf_counter()
        summary = score(config)
        seconds = time.perf_counter() - start
    ray.shutdown()
    rows = pq.ParquetDataset(summary.output).read().to_pandas()
    errors = {os.path.basename(i): e for i, e in zip(rows["image"], rows["error"]) if e}
    print(json.dumps({"inputs": summary.inputs, "errors": errors, "seconds": seconds, "peak_pss": memory.peak, "idle_pss": idle}))


def write_folders(work: str, good: int) -> tuple[str, str]:
    import numpy as np
    from PIL import Image

    from bombs import deflated_dicom, png_16bit
    from dicom_files import dataset, to_bytes

    baseline, hostile = os.path.join(work, "good"), os.path.join(work, "hostile")
    os.makedirs(baseline)
    os.makedirs(hostile)
    rng = np.random.default_rng(0)
    for i in range(good):
        if i % 4 == 3:
            name, data = f"good{i:03d}.dcm", to_bytes(dataset(rng.integers(0, 4096, (512, 512), dtype=np.uint16), bits=12))
        else:
            name = f"good{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8)).save(os.path.join(baseline, name))
            data = None
        if data is not None:
            with open(os.path.join(baseline, name), "wb") as f:
                f.write(data)
        os.link(os.path.join(baseline, name), os.path.join(hostile, name))
    bombs = {
        "frames.dcm": deflated_dicom(4096, 4096, frames=64, bits=16),
        "rgb.dcm": deflated_dicom(20_000, 20_000, samples=3),
        "liar.dcm": deflated_dicom(64, 64, body_frames=100_000),
        "deep.png": png_16bit(12_000, 12_000),
    }
    for name, data in bombs.items():
        with open(os.path.join(hostile, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data) / 1e6:.2f} MB on disk")
    return baseline, hostile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--good", type=int, default=20, help="good images in both folders")
    parser.add_argument("--size", type=int, default=128, help="model input size")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--folder", "--out", "--checkpoint"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from medray.training import checkpoint
    from medray.training.models import build_model

    with tempfile.TemporaryDirectory() as work:
        baseline, hostile = write_folders(work, args.good)
        model_dir = os.path.join(work, "model")
        os.makedirs(model_dir)
        meta = {"backbone": "resnet18", "labels": ["a", "b"], "task": "multi-label", "in_channels": 1, "image_size": args.size}
        checkpoint.save(model_dir, {"model": build_model("resnet18", 2, 1).state_dict()}, meta)
        runs = {}
        for label, folder in (("good images", baseline), ("good + bombs", hostile)):
            command = [sys.executable, __file__, "--child", "--folder", folder, "--out", os.path.join(work, label.replace(" ", "")),
                       "--checkpoint", model_dir, "--cpus", str(args.cpus)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"medray score over {label} failed:\n{done.stderr[-3000:]}")
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])

    gib = 1024**3
    for label, run in runs.items():
        print(f"{label:>13}: {run['inputs']:3d} inputs, {len(run['errors'])} errors, {run['seconds']:6.1f} s, "
              f"peak PSS of the Ray process tree {run['peak_pss'] / gib:5.2f} GiB (idle Ray {run['idle_pss'] / gib:4.2f} GiB)")  # fmt: skip
    for name, error in sorted(runs["good + bombs"]["errors"].items()):
        print(f"  {name}: {error.split(': ', 1)[1]}")
    ratio = runs["good + bombs"]["peak_pss"] / runs["good images"]["peak_pss"]
    print(f"peak memory, good + bombs / good images: {ratio:5.2f}  (goal ≈ 1: a bomb costs no more than a good image)")


if __name__ == "__main__":
    main()
