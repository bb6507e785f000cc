"""Evidence for the training strategies on demo data with a rare finding.

    .venv/bin/python benchmarks/training_strategies.py [--patients 1000] [--epochs 5]

1. Imbalance: Mass at ~1.5 % of images, trained with loss weighting ``none``, ``seed`` and with
   ``oversample``; prints Mass's validation AUROC and, at the threshold chosen on val, its test
   sensitivity and specificity.
2. Transfer: a backbone pretrained on another demo task (Cardiomegaly and Effusion), then fine-tuned
   for Mass with ``head_only`` (linear probe) and ``full``; same figures.

Every run is a real Ray Train run (2 DDP workers) on this machine; figures vary with the seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import ray

from medray.config import build_config
from medray.data.datasets import ingest_nih
from medray.data.demo_data import generate
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.data.splits import split_by_patient
from medray.evaluation.evaluate import evaluate
from medray.training.checkpoint import MODEL_FILE
from medray.training.trainer import train

RARE = "Mass"


def dataset(root: str, labels: list[str], patients: int, split_label: str, seed: int = 1, prevalence: dict | None = None) -> str:
    """Demo CXRs (128 px) of ``patients`` ingested with ``labels``, split by patient (stratified on ``split_label``).
    ``prevalence``: the share of patients with each finding (default: Mass rare, at 1.6 %)."""
    out = os.path.join(root, f"data-{'-'.join(labels)}")
    prevalence = {RARE: 0.016} if prevalence is None else prevalence
    csv = generate(out, patients=patients, image_size=128, seed=seed, prevalence=prevalence)
    manifest = read_manifest(ingest_nih(csv, os.path.join(out, "ingested.parquet"), labels=labels).manifest)
    frame = split_by_patient(manifest, val=0.2, test=0.2, min_positive=0.5, label=split_label, seed=0)
    return write_manifest(Manifest(frame, labels), os.path.join(out, "split.parquet"))


def run(root: str, name: str, manifest: str, epochs: int, **sections) -> dict:
    raw = {
        "name": name,
        "storage": root,
        "data": {"manifest": manifest, "image_size": 64},
        "train": {"epochs": epochs, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 32},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    config = build_config(raw)
    result = train(config)
    table = evaluate(config).table
    row = table.loc[RARE] if RARE in table.index else table.iloc[0]
    return {"run": name, "val_auroc": result.metrics.get(f"val_auroc/{RARE}", float("nan")), "test_auroc": row["auroc"],
            "sensitivity": row["sensitivity"], "specificity": row["specificity"], "checkpoint": result.best_checkpoint}  # fmt: skip


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'run':<22}{'val AUROC':>10}{'test AUROC':>11}{'sensitivity':>12}{'specificity':>12}")
    for r in rows:
        print(f"{r['run']:<22}{r['val_auroc']:>10.3f}{r['test_auroc']:>11.3f}{r['sensitivity']:>12.3f}{r['specificity']:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as root:
        rare = dataset(root, [RARE], args.patients, RARE)
        positives = read_manifest(rare).split("train")[RARE].mean()
        print(f"{RARE} prevalence in train: {100 * positives:.1f} %")
        imbalance = [
            run(root, "weighting-none", rare, args.epochs, loss={"weighting": "none"}),
            run(root, "weighting-seed", rare, args.epochs, loss={"weighting": "seed"}),
            run(root, "oversample", rare, args.epochs, loss={"weighting": "none"}, sampling={"strategy": "oversample"}),
        ]
        show(f"Imbalance: {RARE} at {100 * positives:.1f} % of training images", imbalance)

        other = dataset(root, ["Cardiomegaly", "Effusion"], args.patients // 2, "Cardiomegaly")
        pretrained = run(root, "pretrain-other-task", other, args.epochs)["checkpoint"]
        weights = os.path.join(pretrained, MODEL_FILE)
        transfer = [
            run(root, f"transfer-{freeze}", rare, args.epochs, model={"weights": weights, "freeze": freeze})
            for freeze in ("head_only", "full")
        ]
        show(f"Transfer from Cardiomegaly/Effusion to {RARE}", transfer)


if __name__ == "__main__":
    main()
