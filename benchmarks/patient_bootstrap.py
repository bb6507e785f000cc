"""Patient-bootstrap AUROC intervals: medray's vectorised weights vs a loop of scikit-learn calls.

Both draw the same patients; the baseline builds each resample's image list and calls
``roc_auc_score`` once per resample, as a straightforward implementation would. Prints both times,
the ratio, and the largest difference between the two sets of AUROCs (should be ~1e-15).

    .venv/bin/python benchmarks/patient_bootstrap.py [--images 3000] [--patients 1000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from medray.evaluation.intervals import patient_weights, weighted_auroc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    patients = rng.integers(0, args.patients, args.images)
    y = rng.integers(0, 2, args.images)
    p = np.clip(0.3 * y + rng.random(args.images), 0, 1)

    start = time.perf_counter()
    w = patient_weights(patients, args.resamples, seed=1)
    fast = weighted_auroc(y, p, w)
    vectorised = time.perf_counter() - start

    start = time.perf_counter()
    slow = np.empty(args.resamples)
    for b in range(args.resamples):
        index = np.repeat(np.arange(args.images), w[b])  # each image as often as its patient was drawn
        slow[b] = roc_auc_score(y[index], p[index])
    loop = time.perf_counter() - start

    print(f"{args.resamples} resamples of {args.patients} patients / {args.images} images")
    print(f"vectorised weights: {vectorised:.3f} s   scikit-learn loop: {loop:.3f} s   ratio {loop / vectorised:.1f}x")
    print(f"largest AUROC difference: {np.max(np.abs(fast - slow)):.2e}")


if __name__ == "__main__":
    main()
