"""Scoring at 1× and 10× the same archive size: peak memory and images/s against a plain PyTorch loop.

    .venv/bin/python benchmarks/score_scale.py [--images 200] [--scale 10] [--size 128] [--cpus 2]

Memory: each medray run is a fresh process that starts its own local Ray; a sampler sums the PSS
(proportional set size) of that process and every process under it — GCS, raylet, dashboard, the
listing task, the actors — every 0.5 s and keeps the peak. PSS divides shared pages (Ray's object
store is shared memory) among the processes that map them, so nothing is counted twice. The goal is
that scoring 10× the files needs at most 1.2× the memory of 1×: streaming keeps only a window of
rows in flight and writes each part as it completes.

Speed: the baseline is one process that loads the model and, batch by batch, decodes the same files
and runs the model (torch using every core), as a simple script would. medray runs ``score`` with
one CPU actor per core. Both are timed from "model not loaded" to "all probabilities in hand" (medray
also writes its Parquet parts); Ray's own start-up is excluded. All figures come from this run.
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


def medray_run(args) -> None:
    """Child mode: start Ray, score the folder, print one JSON line with the figures."""
    import logging

    import ray

    from medray.config import build_config
    from medray.scoring.score import score

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    idle = tree_pss(os.getpid())
    config = build_config({"storage": args.out, "score": {
        "input": args.folder, "output": os.path.join(args.out, "scores"), "checkpoint": args.checkpoint,
        "batch_size": args.batch_size, "actors": args.actors, "cpus_per_actor": args.cpus / args.actors,
        "part_size": args.part_size}})  # fmt: skip
    with PeakSampler() as memory:
        start = time.perf_counter()
        summary = score(config)
        seconds = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps({"inputs": summary.inputs, "errors": summary.errors, "seconds": seconds, "peak_pss": memory.peak, "idle_pss": idle}))


def plain_loop(paths: list[str], checkpoint_uri: str, batch_size: int) -> float:
    import numpy as np
    import torch

    from medray.io import images
    from medray.training import checkpoint
    from medray.training.losses import probabilities
    from medray.training.models import to_input

    start = time.perf_counter()
    model, meta = checkpoint.load_model(checkpoint_uri)
    for i in range(0, len(paths), batch_size):
        pixels = [images.load(p, meta["image_size"], meta["in_channels"]) for p in paths[i : i + batch_size]]
        with torch.inference_mode():
            x = to_input(torch.from_numpy(np.stack(pixels)), torch.device("cpu"))
            probabilities(meta["task"], model(x)).numpy()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="files in the 1× archive")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--source-size", type=int, default=512, help="pixel size of the archive's PNGs")
    parser.add_argument("--size", type=int, default=128, help="model input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part-size", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--actors", type=int, default=1, help="scoring actors; the CPUs are shared among them")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--folder", "--out", "--checkpoint"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return medray_run(args)

    import torch
    from PIL import Image

    from medray.data.demo_data import generate
    from medray.training import checkpoint
    from medray.training.models import build_model

    with tempfile.TemporaryDirectory() as work:
        generate(os.path.join(work, "demo"), max(10, args.images // 3), 256, seed=0)
        demo = sorted(os.path.join(work, "demo", "images", f) for f in os.listdir(os.path.join(work, "demo", "images")))
        base = os.path.join(work, "copy0")
        os.makedirs(base)
        for i in range(args.images):  # cycle the demo images, upscaled to archive size
            Image.open(demo[i % len(demo)]).resize((args.source_size,) * 2).save(os.path.join(base, f"img{i:06d}.png"))
        scaled = os.path.join(work, "scaled")
        for c in range(args.scale):  # 10×: the same bytes under new names (hard links), as distinct inputs
            os.makedirs(os.path.join(scaled, f"copy{c}"))
            for name in os.listdir(base):
                os.link(os.path.join(base, name), os.path.join(scaled, f"copy{c}", name))
        model_dir = os.path.join(work, "model")
        os.makedirs(model_dir)
        meta = {"backbone": "resnet18", "labels": ["a", "b", "c", "d"], "task": "multi-label", "in_channels": 1, "image_size": args.size}
        checkpoint.save(model_dir, {"model": build_model("resnet18", 4, 1).state_dict()}, meta)

        runs = {}
        for label, folder in (("1x", base), (f"{args.scale}x", scaled)):
            out = os.path.join(work, f"out-{label}")
            command = [sys.executable, __file__, "--child", "--folder", folder, "--out", out, "--checkpoint", model_dir,
                       "--cpus", str(args.cpus), "--actors", str(args.actors), "--batch-size", str(args.batch_size), "--part-size", str(args.part_size)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"medray run {label} failed:\n{done.stderr[-3000:]}")
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])

        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(scaled) for f in files)
        torch.set_num_threads(args.cpus)
        baseline = plain_loop(paths, model_dir, args.batch_size)

    one, big = runs["1x"], runs[f"{args.scale}x"]
    gib = 1024**3
    print(f"archive: {args.images} PNGs of {args.source_size}px (1x) and {big['inputs']} (≈{args.scale}x); "
          f"resnet18 at {args.size}px; {args.cpus} CPUs")  # fmt: skip
    for label, run in runs.items():
        print(f"medray score {label:>4}: {run['inputs']:6d} inputs in {run['seconds']:7.1f} s = {run['inputs'] / run['seconds']:6.1f} images/s, "
              f"peak PSS of the Ray process tree {run['peak_pss'] / gib:5.2f} GiB (idle Ray {run['idle_pss'] / gib:4.2f} GiB)")  # fmt: skip
    print(f"plain PyTorch loop:  {len(paths):6d} inputs in {baseline:7.1f} s = {len(paths) / baseline:6.1f} images/s")
    print(f"memory {args.scale}x / 1x:            {big['peak_pss'] / one['peak_pss']:5.2f}  (goal ≤ 1.2)")
    print(f"speed medray {args.scale}x / plain loop: {(big['inputs'] / big['seconds']) / (len(paths) / baseline):5.2f}  (goal ≥ 0.9)")


if __name__ == "__main__":
    main()
