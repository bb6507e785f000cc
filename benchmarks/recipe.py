"""The training recipe on a small, imbalanced, low-resolution dataset: each ingredient against the old defaults.

    .venv/bin/python benchmarks/recipe.py [--patients 200] [--size 28] [--seeds 2]

The data: demo chest X-rays (four findings, Mass rare), ``--patients`` patients, trained at ``--size`` px —
MedMNIST's scale, where most published medical baselines live. Split by patient (test and val 20 % each).
Each recipe trains a resnet18 from scratch with one Ray Train worker; its best checkpoint (by val mean
AUROC) is scored on the test split, and the script prints the test mean AUROC and mean accuracy at 0.5
per recipe, averaged over ``--seeds`` seeds, with the old defaults as the baseline of the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np

BASE = {"train": {"epochs": 8, "warmup_epochs": 0, "ema": 0.0}, "loss": {"label_smoothing": 0.0}}
RECIPES = {
    "old defaults (8 epochs, cosine)": BASE,
    "+ warm-up (1 epoch)": {**BASE, "train": {**BASE["train"], "warmup_epochs": 1}},
    "+ EMA of weights (0.98)": {**BASE, "train": {**BASE["train"], "ema": 0.98}},
    "+ label smoothing (0.05)": {**BASE, "loss": {"label_smoothing": 0.05}},
    "24 epochs, warm-up, EMA, patience 6": {"train": {"epochs": 24, "warmup_epochs": 1, "ema": 0.98, "patience": 6},
                                            "loss": {"label_smoothing": 0.0}},  # fmt: skip
}


def merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def test_scores(checkpoint_uri: str, test, labels: list[str]) -> tuple[float, float, int]:
    from sklearn.metrics import roc_auc_score

    from medray.data import rows
    from medray.evaluation.predict import predict

    scored = predict(rows(test[["image", *labels]]), checkpoint_uri, 128, calibrated=False).to_pandas()
    aurocs, accuracies = [], []
    for label in labels:
        y, p = scored[label].to_numpy(float), scored[f"prob_{label}"].to_numpy(float)
        known = ~np.isnan(y)
        if len(set(y[known])) == 2:
            aurocs.append(roc_auc_score(y[known], p[known]))
        accuracies.append(((p[known] >= 0.5) == (y[known] == 1)).mean())
    return float(np.mean(aurocs)), float(np.mean(accuracies)), len(scored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    from medray.config import build_config
    from medray.data.datasets import ingest_nih
    from medray.data.demo_data import FINDINGS, generate
    from medray.data.manifest import Manifest, read_manifest, write_manifest
    from medray.data.splits import split_by_patient
    from medray.training.trainer import train

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, list] = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as work:
        generate(work, args.patients, 64, seed=0, prevalence={"Mass": 0.08})
        ingested = ingest_nih(os.path.join(work, "Data_Entry_2017.csv"), os.path.join(work, "m.parquet"), labels=list(FINDINGS))
        manifest = read_manifest(ingested.manifest)
        frame = split_by_patient(manifest, val=0.2, test=0.2, min_positive=0.3, label="Mass", seed=0)
        uri = write_manifest(Manifest(frame, manifest.labels), os.path.join(work, "split.parquet"))
        test = frame[frame["split"] == "test"]
        for seed in range(args.seeds):
            for i, (name, recipe) in enumerate(RECIPES.items()):
                raw = merged({
                    "name": f"r{i}-s{seed}", "storage": os.path.join(work, "runs"),
                    "data": {"manifest": uri, "image_size": args.size},
                    "train": {"workers": 1, "cpus_per_worker": max(1, args.cpus - 1), "batch_size": 32, "seed": seed},
                }, recipe)  # fmt: skip
                result = train(build_config(raw))
                auroc, accuracy, n = test_scores(result.best_checkpoint, test, manifest.labels)
                results[name].append((auroc, accuracy, result.metrics["epoch"] + 1))
                print(f"seed {seed} {name}: test AUROC {auroc:.3f}, accuracy {accuracy:.3f} (best epoch {result.metrics['epoch'] + 1})", flush=True)
    ray.shutdown()

    base = np.mean([r[0] for r in results[next(iter(RECIPES))]])
    print(f"\n{len(frame)} images of {args.patients} patients at {args.size}px, {len(test)} test images, {args.seeds} seeds")
    print(f"{'recipe':40s} {'test AUROC':>10s} {'accuracy':>9s} {'Δ AUROC':>8s}")
    for name, runs in results.items():
        auroc, accuracy = np.mean([r[0] for r in runs]), np.mean([r[1] for r in runs])
        print(f"{name:40s} {auroc:10.3f} {accuracy:9.3f} {auroc - base:+8.3f}")


if __name__ == "__main__":
    main()
