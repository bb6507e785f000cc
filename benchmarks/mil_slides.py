"""Slide-level AUROC of patch-label mean pooling vs attention-MIL (ABMIL) on the same frozen embeddings.

The whole path on real (synthetic, pyramidal TIFF) demo slides, as a user runs it:

1. two disjoint sets of demo slides: ``--slides`` to evaluate the two methods (seed ``--seed``), and
   ``--pretrain-slides`` from another seed, renamed to other patients, to train the encoder on;
   every positive slide has an annotation mask of its tumour;
2. ``extract-patches`` on both (split per patient; ``labels_from: annotation``, so each patch knows its
   tumour share and the attention can be scored against it);
3. the encoder: resnet18 trained from scratch by ``medray train`` on the patches of the pretraining slides
   (patch labels from their masks, the classic patch pipeline of jobs/configs/wsi_demo.yaml), then used
   frozen by ``medray embed`` (``embed.weights``: its best checkpoint) on the evaluation slides' patches;
   no weights from anywhere else, nothing downloaded, no evaluation slide or patient seen by it;
4. ABMIL (``model.head: abmil``) trained with Ray Train on the training slides' bags, evaluated with
   ``mil.baseline: true``: the same evaluation also fits the 2017 recipe on the same store (a logistic
   regression on patches that carry their slide's label, a slide scored by the mean of its patch
   probabilities) and compares the two on the same test slides by DeLong's test.

Printed: slide-level test AUROC of each method with its 95 % patient-bootstrap interval, DeLong's p,
the attention AUROC of ABMIL on the annotated test slides (does it look at the tumour?) and the wall
time of each stage. The slide report (``report.md``, heatmaps) stays in the work folder.

On the demo, a positive slide's lesion covers a few of its ~50 patches, the rest of it looks like a
negative slide: the regime where attention should matter. The figures rest on the test slides printed
beside them; rerun with ``--seed`` to see how much they move.

    PYTHONPATH=platform .venv/bin/python benchmarks/mil_slides.py   # about 6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

from medray import jobs
from medray.config import build_config
from medray.embeddings.embed import embed
from medray.evaluation import intervals
from medray.runtime import init_ray
from medray.wsi import demo_slides
from medray.wsi.job import extract_job


def pretraining_slides(folder: str, slides: int, width: int, height: int, seed: int) -> str:
    """Demo slides of other patients (``PRE…``) for the encoder, a quarter of the patients in val."""
    csv = demo_slides.generate(folder, slides, width, height, seed=seed, masks=1.0)
    frame = pd.read_csv(csv, dtype={"patient_id": str, "mask": str}, keep_default_na=False)
    number = frame["patient_id"].str.removeprefix("DEMO").astype(int)
    frame["patient_id"] = [f"PRE{n:03d}" for n in number]
    frame["slide_id"] = "pre_" + frame["slide_id"]
    frame["split"] = np.where(number % 4 == 3, "val", "train")
    frame.to_csv(csv, index=False)
    return csv


def wsi_section(args, slides: str, patches: str) -> dict:
    return {"slides": slides, "patches": patches, "target_mpp": args.target_mpp, "patch_size": args.patch_size,
            "labels_from": "annotation", "tumour_threshold": 0.5, "thumbnail_side": 256, "min_region_um2": 5000}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=128, help="demo slides the two methods are trained and tested on")
    parser.add_argument("--pretrain-slides", type=int, default=24, help="other demo slides (other patients) the encoder learns from")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--target-mpp", type=float, default=0.5, help="the demo slides are scanned at 0.5 µm/px: level 0")
    parser.add_argument("--val", type=float, default=0.2, help="share of the slides in val (thresholds, best epoch), whole patients")
    parser.add_argument("--test", type=float, default=0.35, help="share of the slides in test, whole patients")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20, help="ABMIL epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a pipe or a file
    began = time.perf_counter()
    work = args.work or tempfile.mkdtemp(prefix="mil-bench-")
    runs = os.path.join(work, "runs")
    quiet = {"tracking": {"tensorboard": False}}

    print(f"{args.slides} evaluation slides + {args.pretrain_slides} pretraining slides (other patients), {args.width}x{args.height} px "
          f"at 0.5 µm/px; patches {args.patch_size} px at {args.target_mpp} µm/px; split val {args.val} / test {args.test} of the "
          f"slides; encoder resnet18, {args.pretrain_epochs} epochs; ABMIL {args.epochs} epochs; seed {args.seed}; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; work folder {work}")
    seconds = {}

    started = time.perf_counter()
    slides_csv = demo_slides.generate(os.path.join(work, "slides"), args.slides, args.width, args.height, seed=args.seed, masks=1.0)
    pre_csv = pretraining_slides(os.path.join(work, "pretrain_slides"), args.pretrain_slides, args.width, args.height, args.seed + 1000)
    seconds["generate slides"] = time.perf_counter() - started

    init_ray()
    pretrain = build_config(
        {"name": "encoder", "storage": runs, "wsi": wsi_section(args, pre_csv, os.path.join(work, "pretrain_patches")),
         "data": {"image_size": args.patch_size, "augment": "histo"}, "model": {"backbone": "resnet18", "in_channels": 3, "weights": None},
         "train": {"epochs": args.pretrain_epochs, "batch_size": 32, "lr": 0.001, "workers": 2, "cpus_per_worker": 0.5, "seed": args.seed},
         **quiet}
    )  # fmt: skip
    patches = os.path.join(work, "patches")
    raw = {"name": "abmil", "storage": runs, "model": {"head": "abmil"},
         "split": {"val": args.val, "test": args.test, "min_positive": 0.5, "label": "tumour", "train_keeps_positive": 0.0, "seed": args.seed},
         "wsi": wsi_section(args, slides_csv, patches),
         "embed": {"backbone": "resnet18", "input": patches, "output": os.path.join(work, "embeddings"), "actors": 1, "cpus_per_actor": 1.0},
         "mil": {"bag_size": 128, "hidden": 64, "attention": 32, "dropout": 0.25, "baseline": True},
         "train": {"epochs": args.epochs, "lr": 0.0005, "workers": 1, "cpus_per_worker": 1.0, "seed": args.seed},
         "evaluate": {"bootstrap": 1000, "seed": args.seed}, **quiet}  # fmt: skip

    started = time.perf_counter()
    pre_extracted, _ = extract_job(pretrain, progress=False)
    extracted, _ = extract_job(build_config(raw), progress=False)
    seconds["extract patches"] = time.perf_counter() - started
    print(f"patches: {pre_extracted.patches} from the pretraining slides, {extracted.patches} from the evaluation slides")

    started = time.perf_counter()
    encoder = jobs.train(pretrain)
    seconds["pretrain encoder"] = time.perf_counter() - started
    print(f"encoder: val patch AUROC {encoder.metrics.get('val_auroc/tumour', float('nan')):.3f} on the pretraining slides' val patients")

    started = time.perf_counter()
    raw["embed"]["weights"] = encoder.best_checkpoint  # frozen: the encoder trained above, nothing else
    config = build_config(raw)
    embedded = embed(config)
    seconds["embed (frozen)"] = time.perf_counter() - started
    print(f"embedded {embedded.embedded} patches ({embedded.errors} errors), {embedded.dim}-dim")

    started = time.perf_counter()
    jobs.train(config)
    seconds["ABMIL train"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = jobs.evaluate(config)
    seconds["evaluate (both)"] = time.perf_counter() - started

    # Mean pooling's interval and DeLong's p, from the bag scores the evaluation saved, with its functions and seed.
    scored = pd.read_parquet(evaluation.paths["predictions"])
    test = scored[scored["split"] == "test"]
    y, patients = test["tumour"].to_numpy(float), test["patient_id"]
    pooled = intervals.bootstrap_intervals(y, test["baseline_tumour"].to_numpy(float), patients, 0.5, 1000, args.seed)["auroc"]
    a, b = test["prob_tumour"].to_numpy(float), test["baseline_tumour"].to_numpy(float)
    d, paired = intervals.delong(y, a, b), intervals.paired_bootstrap(y, a, b, patients, 1000, args.seed)
    row, summary = evaluation.table.loc["tumour"], evaluation.summary
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    slides = f"{len(y)} ({pos} / {neg})"
    table = pd.DataFrame(
        [
            ("ABMIL (gated attention)", slides, f"{row['auroc']:.3f} [{row['auroc_lo']:.3f}–{row['auroc_hi']:.3f}]", "",
             f"{summary['attention_auroc']:.3f} ({summary['attention_slides']} slides)"),
            ("patch-label mean pooling", slides, f"{d['auroc_b']:.3f} [{pooled[0]:.3f}–{pooled[1]:.3f}]", f"{d['p_value']:.3g}", "—"),
        ],
        columns=["method", "test slides (pos / neg)", "slide AUROC [95 % CI]", "DeLong p", "attention AUROC (annotated slides)"],
    ).set_index("method")  # fmt: skip
    print()
    print(f"same {embedded.dim}-dim embeddings; test: {test['patient_id'].nunique()} patients; "
          f"ABMIL − mean pooling = {d['difference']:+.3f} "
          f"[{paired['difference_lo']:+.3f} to {paired['difference_hi']:+.3f}, paired patient bootstrap]")  # fmt: skip
    print(table.to_string())
    print()
    print(pd.Series(seconds, name="seconds").round(1).to_frame().T.to_string(index=False))
    print(
        f"stages {sum(seconds.values()):.0f} s, wall {time.perf_counter() - began:.0f} s with Ray's start; report: {evaluation.paths['report.md']}"
    )
    metrics = {"seconds": seconds, "abmil": row[["auroc", "auroc_lo", "auroc_hi"]].to_dict(), "mean_pooling": [d["auroc_b"], *pooled],
               "delong_p": d["p_value"], "attention_auroc": summary["attention_auroc"], "attention_slides": summary["attention_slides"]}  # fmt: skip
    with open(os.path.join(work, "mil_slides.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=float)


if __name__ == "__main__":
    main()
