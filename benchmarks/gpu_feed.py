"""Is the model fed? Images/s of medray's whole training path against the same model's bare loop.

    .venv/bin/python benchmarks/gpu_feed.py                       # CPU, tiny: keeps the script working
    .venv/bin/python benchmarks/gpu_feed.py --gpu --backbone resnet50 --size 224 --batch-size 256 \\
        --patients 700 --epochs 4                                 # one GPU: the figure the README quotes

medray's path: demo images → ``medray prepare`` (uint8 cache) → Ray Data (global shuffle per epoch)
→ one Ray Train worker → augmentation on the worker's device → loss, backward, AdamW step. Its speed
is the ``train_images_per_s`` the worker reports for its last epoch (the first ones pay for warm-up).

Baselines, in the same process on the same device and torch threads: the same model, loss and
optimizer stepping on synthetic uint8 batches already on the device, (a) bare and (b) with medray's
augmentation. medray / (a) is the figure to watch (goal ≥ 0.9 on a GPU); (b) / (a) is what
augmentation itself costs. On a 2-core CPU the model is the bottleneck by far, and the ratio mostly
shows Ray Data's and Ray Train's overhead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time


def bare_loop(args, device, augment_name: str | None) -> float:
    """Images/s of the plain training step on synthetic batches resident on ``device``."""
    import numpy as np
    import torch

    from medray.training.augment import Augment
    from medray.training.losses import make_loss
    from medray.training.models import build_model, to_input

    torch.manual_seed(0)
    model = build_model(args.backbone, 4, 1).to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    loss_fn = make_loss("multi-label", np.random.default_rng(0).integers(0, 2, (100, 4)).astype(float), "seed").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (args.batch_size, args.size, args.size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (args.batch_size, 4), device=device).float()
    augment = Augment(augment_name) if augment_name else None
    generator = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda"

    def step():
        x = to_input(images, device, (lambda t: augment(t, generator)) if augment else None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    steps = max(3, args.images_per_epoch // args.batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # waits for the device
    return steps * args.batch_size / (time.perf_counter() - start)


def medray_rate(args, work: str) -> tuple[float, int]:
    import ray

    from medray.config import build_config
    from medray.data.cache import prepare
    from medray.data.datasets import ingest_nih
    from medray.data.demo_data import FINDINGS, generate
    from medray.data.manifest import Manifest, read_manifest, write_manifest
    from medray.data.splits import split_by_patient
    from medray.training.trainer import train

    generate(work, args.patients, max(args.size, 64), seed=0)
    ingested = ingest_nih(os.path.join(work, "Data_Entry_2017.csv"), os.path.join(work, "manifest.parquet"), labels=list(FINDINGS))
    manifest = read_manifest(ingested.manifest)
    frame = split_by_patient(manifest, val=0.1, test=0.1, min_positive=0.3, label="Mass", seed=0)
    manifest_uri = write_manifest(Manifest(frame, manifest.labels), os.path.join(work, "split.parquet"))
    prepare(manifest_uri, None, args.size, 1)
    config = build_config({
        "name": "feed", "storage": os.path.join(work, "runs"),
        "data": {"manifest": manifest_uri, "image_size": args.size, "augment": args.augment},
        "model": {"backbone": args.backbone},
        "train": {"epochs": args.epochs, "workers": 1, "batch_size": args.batch_size, "use_gpu": args.gpu,
                  "cpus_per_worker": args.worker_cpus, "checkpoints_to_keep": args.epochs},
    })  # fmt: skip
    train(config)
    folder = os.path.join(config.run_dir, "train")
    last = max(d for d in os.listdir(folder) if d.startswith("epoch_"))
    with open(os.path.join(folder, last, "meta.json")) as f:
        metrics = json.load(f)["metrics"]
    ray.shutdown()
    return metrics["train_images_per_s"], metrics["train_samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=150, help="demo patients (about 2.7 images each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--augment", default="cxr")
    parser.add_argument("--gpu", action="store_true", help="train on one GPU (and run the baselines there)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for Ray")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs of the training worker (its torch threads)")
    args = parser.parse_args()

    import ray
    import torch

    ray.init(address="local", num_cpus=args.cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as work:
        medray, per_epoch = medray_rate(args, work)
    args.images_per_epoch = per_epoch
    device = torch.device("cuda" if args.gpu else "cpu")
    if not args.gpu:
        torch.set_num_threads(max(1, int(args.worker_cpus)))
    bare = bare_loop(args, device, None)
    augmented = bare_loop(args, device, args.augment)

    print(f"{args.backbone} at {args.size}px, batch {args.batch_size}, {device.type}, "
          f"{per_epoch} training images an epoch, augmentation {args.augment!r}")  # fmt: skip
    print(f"bare loop, synthetic batches on the device:      {bare:8.1f} images/s")
    print(f"bare loop + augmentation on the device:          {augmented:8.1f} images/s")
    print(f"medray: cache → Ray Data → Ray Train → augment:  {medray:8.1f} images/s (last epoch)")
    print(f"ratio medray / bare loop:                        {medray / bare:8.2f}x  (goal ≥ 0.9 on a GPU)")
    print(f"ratio augmented / bare loop:                     {augmented / bare:8.2f}x")


if __name__ == "__main__":
    main()
