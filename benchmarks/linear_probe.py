"""A linear probe on a frozen backbone vs full fine-tuning, on the demo chest X-rays: test AUROC and wall time.

    PYTHONPATH=platform .venv/bin/python benchmarks/linear_probe.py [--patients 400] [--epochs 8] [--size 64]

1. Pretraining: a resnet18 (from scratch) learns Cardiomegaly and Effusion on one demo dataset (seed 1),
   with medray's own training (Ray Train, 2 DDP workers of half a CPU each).
2. On another demo dataset (seed 2: other patients) labelled Mass and Nodule, from the pretrained
   ``model.pt`` of the best checkpoint:
   - full fine-tuning (``model.weights`` = that file, ``model.freeze: full``) for ``--epochs`` epochs;
   - a linear probe: ``medray embed`` with the same file (resnet18 minus its head), then ``model.head: linear``
     on the store (L2 strength chosen per label on val);
   - k-NN (``model.head: knn``, 20 neighbours, cosine) on the same store.
   Each is evaluated as ``medray evaluate`` does (threshold on val, 95 % patient-bootstrap interval on test).

Wall seconds: fine-tuning is its Ray Train run; the probe is its embedding pass plus the head's fit, shown
apart and together. Evaluation is timed in its own column: the fine-tuned model runs on the val and test
images, a head only on their stored vectors. Figures vary with the seed and with the machine's load.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import ray
from training_strategies import dataset  # demo CXRs → ingest → patient split, as the transfer benchmark builds them

from medray import jobs
from medray.config import JobConfig, build_config
from medray.data.manifest import read_manifest
from medray.embeddings.embed import embed
from medray.training.checkpoint import MODEL_FILE

SOURCE, TARGET = ["Cardiomegaly", "Effusion"], ["Mass", "Nodule"]


def timed(fn, config: JobConfig):
    started = time.perf_counter()
    result = fn(config)
    return result, time.perf_counter() - started


def job(root: str, name: str, args, **sections) -> JobConfig:
    raw = {
        "name": name,
        "storage": root,
        "train": {"epochs": args.epochs, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 32},
        "evaluate": {"gallery": 0},  # Grad-CAM examples apply to the image model only: leave them out of both timings
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return build_config(raw)


def aurocs(evaluation) -> list[str]:
    """Per target label: test AUROC with its 95 % patient-bootstrap interval, from the evaluation table."""
    t = evaluation.table
    return [f"{t.loc[label, 'auroc']:.3f} [{t.loc[label, 'auroc_lo']:.3f}, {t.loc[label, 'auroc_hi']:.3f}]" for label in TARGET]


def describe(uri: str, labels: list[str]) -> str:
    frame = read_manifest(uri).frame
    counts = frame.groupby("split").size()
    positives = ", ".join(f"{label} {int(frame.loc[frame['split'] == 'test', label].sum())}" for label in labels)
    return f"{counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test images; test positives: {positives}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="demo patients in each of the two datasets")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of pretraining and of fine-tuning")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (training and embedding)")
    args = parser.parse_args()
    print(f"resnet18 at {args.size} px, {args.patients} demo patients per dataset, {args.epochs} epochs (pretraining and fine-tuning)")
    print(f"2 DDP workers × 0.5 CPU; {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    with tempfile.TemporaryDirectory() as root:
        source = dataset(root, SOURCE, args.patients, SOURCE[0], seed=1, prevalence={})
        target = dataset(root, TARGET, args.patients, TARGET[0], seed=2, prevalence={})
        print(f"pretraining on {'+'.join(SOURCE)} (seed 1): {describe(source, SOURCE)}")
        print(f"target {'+'.join(TARGET)} (seed 2, other patients): {describe(target, TARGET)}")

        pretrained, t_pretrain = timed(jobs.train, job(root, "pretrain", args, data={"manifest": source, "image_size": args.size}))
        weights = os.path.join(pretrained.best_checkpoint, MODEL_FILE)
        val = ", ".join(f"{label} {pretrained.metrics[f'val_auroc/{label}']:.3f}" for label in SOURCE)
        print(f"pretrained in {t_pretrain:.0f} s; its val AUROC: {val}")

        rows = []
        finetune = job(root, "finetune-full", args, data={"manifest": target, "image_size": args.size},
                       model={"weights": weights, "freeze": "full"})  # fmt: skip
        _, t_fit = timed(jobs.train, finetune)
        evaluation, t_eval = timed(jobs.evaluate, finetune)
        rows.append((f"full fine-tuning, {args.epochs} epochs", aurocs(evaluation), 0.0, t_fit, t_eval))

        store = os.path.join(root, "embeddings")
        embedding = {"input": target, "output": store, "backbone": "resnet18", "weights": weights, "image_size": args.size}
        summary, t_embed = timed(embed, job(root, "embed", args, embed=embedding))
        print(f"embedded {summary.embedded} of {summary.inputs} images ({summary.dim}-dim) in {t_embed:.0f} s")
        for head, method in (("linear", "linear probe (embed + linear)"), ("knn", "k-NN, k 20 (same store)")):
            config = job(root, f"probe-{head}", args, model={"head": head}, embed={"output": store})
            _, t_fit = timed(jobs.train, config)
            evaluation, t_eval = timed(jobs.evaluate, config)
            rows.append((method, aurocs(evaluation), t_embed, t_fit, t_eval))

    print(f"\nTest AUROC [95 % patient-bootstrap interval]; wall seconds (load average after: {os.getloadavg()[0]:.1f})")
    header = f"{'method':<32}" + "".join(f"{label + ' AUROC':>24}" for label in TARGET)
    print(header + f"{'embed s':>9}{'fit s':>8}{'total s':>9}{'eval s':>8}")
    for method, per_label, t_embed, t_fit, t_eval in rows:
        cells = "".join(f"{a:>24}" for a in per_label)
        print(f"{method:<32}{cells}{t_embed:>9.1f}{t_fit:>8.1f}{t_embed + t_fit:>9.1f}{t_eval:>8.1f}")


if __name__ == "__main__":
    main()
