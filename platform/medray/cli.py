"""``medray <verb>``: the command line, and ``run_job`` for the thin ``jobs/*.py`` entrypoints.

Jobs that run on Ray (train, evaluate, score, demo) take one YAML config plus ``--set`` overrides
and write the resolved config next to their outputs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys

from medray import storage
from medray.config import ConfigError, JobConfig, load_config, save_config

log = logging.getLogger("medray")


def init_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local Ray."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` (or by the user, for a running cluster); without it,
        # start a local Ray rather than attach to whatever cluster last ran on this machine.
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", logging_level=logging.WARNING)
    # Ray Data prints every execution plan at INFO; its progress bars (and its log file) are enough.
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _train(config: JobConfig) -> None:
    from medray.train import train

    result = train(config)
    print(f"best checkpoint (val mean AUROC {result.metrics['val_auroc_mean']:.3f}): {result.best_checkpoint}")


def _evaluate(config: JobConfig) -> None:
    from medray.evaluate import evaluate

    evaluation = evaluate(config)
    print(evaluation.table[["auroc", "sensitivity", "specificity", "prevalence"]].round(3).to_string())
    print(f"mean test AUROC {evaluation.mean_auroc:.3f}\nreport: {evaluation.paths['report.html']}")


def _score(config: JobConfig) -> None:
    from medray.score import score

    s = score(config)
    print(f"scored {s.inputs} inputs: {s.scored} scored, {s.errors} errors → {s.output}")


def _tune(config: JobConfig) -> None:
    from medray.tune import run_sweep

    if not config.tune.space:
        raise SystemExit("medray tune: set tune.space to a search space, e.g. --set tune.space=tune_spaces/imbalance.yaml")
    result = run_sweep(config, config.tune.space, config.tune.seeds)
    print(result.trials.head(10).to_string())
    print(f"ranking: {result.paths['ranking.md']}\nbest config: {result.best_config}")


def _demo(config: JobConfig) -> None:
    from medray.demo import run_demo

    run_demo(config)


JOBS = {"train": _train, "tune": _tune, "evaluate": _evaluate, "score": _score, "demo": _demo}


def _extract_patches(config: JobConfig) -> None:
    from medray.wsi.job import extract_job

    r, _ = extract_job(config)
    print(
        f"{r.slides} slides: {r.done} extracted, {r.skipped} already done, {r.empty} without tissue, {r.errors} unreadable; "
        f"{r.patches} patches ({r.background_skipped:.0%} of grid positions skipped as background) → {r.out}"
    )
    if r.errors:
        print(f"unreadable slides and why: {storage.join(r.out, 'errors.parquet')}")


JOBS.update({"extract-patches": _extract_patches})


def _prepare(config: JobConfig) -> None:
    from medray.cache import prepare

    d = config.data
    result = prepare(config.manifest, d.cache, d.image_size, config.model.in_channels)
    print(f"{result.images} images decoded at {d.image_size} px in {result.seconds:.0f} s, {result.unreadable} unreadable → {result.uri}")


JOBS["prepare"] = _prepare


def run_job(verb: str, argv: list[str] | None = None) -> None:
    """Entry for ``jobs/<verb>.py``: ``--config FILE [--set a.b=v ...]``."""
    parser = argparse.ArgumentParser(prog=f"medray {verb}")
    _job_arguments(parser)
    _run(verb, parser.parse_args(argv))


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (see jobs/configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")


def _start(verb: str, config_path: str | None, overrides: list[str]) -> JobConfig:
    """The validated config (or a one-line error naming the field), then Ray — with the S3 endpoint set
    first, so that Ray's workers inherit it."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as err:
        sys.exit(f"medray {verb}: {err}")
    storage.configure_s3(config.s3.endpoint_url, config.s3.region)
    init_ray()
    return config


def _run(verb: str, args: argparse.Namespace) -> None:
    _setup_logging()
    config = _start(verb, args.config, args.set)
    save_config(config, storage.join(config.run_dir, f"{verb}.config.yaml"))
    JOBS[verb](config)


def _ingest(args: argparse.Namespace) -> None:
    from medray.datasets import ingest

    overrides = list(args.set)
    if args.format:
        overrides.append(f"ingest.format={args.format}")
    if args.labels:
        overrides.append(f"ingest.labels={json.dumps(args.labels.split(','))}")
    config = _start("ingest", args.config, overrides)
    try:
        result = ingest(storage.absolute(args.source), storage.absolute(args.out), config.ingest)
    except ValueError as err:  # the user's table or settings: one line naming the file or field
        sys.exit(f"medray ingest: {err}")
    print(f"{result.balance}\nmanifest: {result.manifest}\nquarantine: {result.quarantine}")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medray", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo_data = verbs.add_parser("demo-data", help="write synthetic chest X-rays in the NIH ChestX-ray14 layout")
    demo_data.add_argument("out")
    demo_data.add_argument("--patients", type=int, default=600)
    demo_data.add_argument("--image-size", type=int, default=256)
    demo_data.add_argument("--seed", type=int, default=0)

    ingest = verbs.add_parser("ingest", help="dataset layout → canonical manifest (Parquet)")
    ingest.add_argument("source", help="the dataset's label file, .npz or folder, local or s3://")
    ingest.add_argument("out", help="manifest to write, e.g. data/manifest.parquet")
    ingest.add_argument("--format", choices=["nih-cxr14", "chexpert", "medmnist", "csv", "folder"],
                        help="default: ingest.format of the config (nih-cxr14)")  # fmt: skip
    ingest.add_argument("--labels", help="comma-separated subset of the dataset's labels")
    _job_arguments(ingest)

    split = verbs.add_parser("split", help="patient-level train/val/test split")
    split.add_argument("manifest")
    split.add_argument("out")
    for name, default in (("--val", 0.15), ("--test", 0.15), ("--min-positive", 0.5), ("--train-keeps-positive", 0.5)):
        split.add_argument(name, type=float, default=default)
    split.add_argument("--label", help="label(s) whose positives val and test are enriched with, comma-separated")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--sites", help="comma-separated values of the 'site' column held out as test (cross-site)")
    split.add_argument("--folds", type=int, help="grouped stratified k-fold over the patients outside test (column 'fold')")
    split.add_argument("--force", action="store_true", help="replace a split the manifest already has (e.g. an official one)")

    audit = verbs.add_parser("audit", help="leakage audit of a split manifest: patients, studies, near-duplicate images")
    audit.add_argument("manifest")
    audit.add_argument("--out", help="folder for audit.json, audit.md and the near-duplicate table; default <run>/audit")
    audit.add_argument("--max-distance", type=int, help="near-duplicate Hamming distance (of 256 bits); default audit.max_distance")
    _job_arguments(audit)

    consensus = verbs.add_parser("consensus", help="rater votes → consensus labels + agreement columns on a manifest")
    consensus.add_argument("votes", help="CSV with one row per (image, rater) and a 0/1 column per label")
    consensus.add_argument("manifest")
    consensus.add_argument("out", help="manifest to write (may be the same file)")
    consensus.add_argument("--image-column", default="Image Index")
    consensus.add_argument("--rater-column", default="Rater")
    consensus.add_argument("--tie", default="unknown", choices=["unknown", "positive", "negative"])
    consensus.add_argument("--keep-labels", action="store_true", help="add agreement only; keep the manifest's labels")

    explain = verbs.add_parser("explain", help="Grad-CAM overlays for any images")
    explain.add_argument("checkpoint", help="checkpoint directory, or a run directory (its best checkpoint)")
    explain.add_argument("images", nargs="+")
    explain.add_argument("--out", default="gradcam", help="folder or s3:// prefix for the PNGs")
    explain.add_argument("--labels", help="comma-separated labels (default: all)")

    compare = verbs.add_parser("compare", help="two checkpoints on the same test split: DeLong + paired bootstrap")
    compare.add_argument("a", help="checkpoint directory or run directory")
    compare.add_argument("b", help="checkpoint directory or run directory")
    _job_arguments(compare)

    demo_slides = verbs.add_parser("demo-slides", help="write synthetic pyramidal TIFF slides and a slide manifest")
    demo_slides.add_argument("out")
    demo_slides.add_argument("--slides", type=int, default=16)
    demo_slides.add_argument("--width", type=int, default=2048)
    demo_slides.add_argument("--height", type=int, default=1536)
    demo_slides.add_argument("--seed", type=int, default=0)

    tissue = verbs.add_parser("tissue", help="a slide's tissue mask, as a PNG overlay for review")
    tissue.add_argument("slide", help="slide file, local or s3://")
    tissue.add_argument("out", help="PNG to write")
    tissue.add_argument("--thumbnail-side", type=int, default=512)
    tissue.add_argument("--min-region-um2", type=float, default=20_000.0)

    for verb in JOBS:
        _job_arguments(verbs.add_parser(verb, help=f"run the {verb} job"))

    args = parser.parse_args(argv)
    if args.verb in JOBS:
        return _run(args.verb, args)
    _setup_logging()
    if args.verb in EXTRA_VERBS:
        return EXTRA_VERBS[args.verb](args)
    if args.verb == "demo-data":
        from medray.demo_data import generate

        print(generate(args.out, args.patients, args.image_size, args.seed))
    elif args.verb == "ingest":
        _ingest(args)
    elif args.verb == "demo-slides":
        from medray.wsi.demo_slides import generate as generate_slides

        print(generate_slides(args.out, args.slides, args.width, args.height, args.seed))
    elif args.verb == "tissue":
        from medray.wsi.slides import open_slide
        from medray.wsi.tissue import detect, overlay_png

        with open_slide(storage.absolute(args.slide)) as slide:
            mask = detect(slide, args.thumbnail_side, args.min_region_um2)
        storage.write_bytes(storage.absolute(args.out), overlay_png(mask))
        print(f"tissue covers {mask.fraction:.1%} of the slide{' — NO TISSUE FOUND' if mask.empty else ''} → {args.out}")
    elif args.verb == "split":
        from medray.manifest import Manifest, read_manifest, write_manifest
        from medray.splits import split_unless_split, summary

        manifest = read_manifest(storage.absolute(args.manifest))
        label = args.label.split(",") if args.label else None
        sites = args.sites.split(",") if args.sites else None
        frame = split_unless_split(manifest, args.force, val=args.val, test=args.test, min_positive=args.min_positive, label=label,
                                   seed=args.seed, train_keeps_positive=args.train_keeps_positive, sites=sites, folds=args.folds)  # fmt: skip
        write_manifest(Manifest(frame, manifest.labels, manifest.task), storage.absolute(args.out))
        print(summary(frame, manifest.labels).round(3).to_string())
    elif args.verb == "audit":
        _audit(args)


def _audit(args: argparse.Namespace) -> None:
    from medray.audit import audit

    config = _start("audit", args.config, args.set)
    out = storage.absolute(args.out) if args.out else storage.join(config.run_dir, "audit")
    distance = config.audit.max_distance if args.max_distance is None else args.max_distance
    try:
        result = audit(storage.absolute(args.manifest), out, distance, config.audit.thumbnails)
    except ValueError as err:  # a manifest that cannot be audited: missing, unsplit, invalid
        sys.exit(f"medray audit: {err}")
    for check in result.checks:
        print(f"{check['status']:<4}  {check['name']:<16} {'–' if check['count'] is None else check['count']:>6}  {check['detail']}")
    print(f"{'passed' if result.passed else 'FAILED'}: {result.paths['audit.md']}")
    if not result.passed:
        sys.exit(1)


def _consensus(args: argparse.Namespace) -> None:
    import pandas as pd

    from medray.labels import agreement_summary, attach, cohen_pairs
    from medray.manifest import read_manifest, write_manifest

    votes = pd.read_csv(io.BytesIO(storage.read_bytes(storage.absolute(args.votes))))
    manifest = read_manifest(storage.absolute(args.manifest))
    named = [label for label in manifest.labels if label in votes]
    result = attach(manifest, votes, args.image_column, args.rater_column, args.tie, not args.keep_labels)
    write_manifest(result, storage.absolute(args.out))
    print(agreement_summary(result.frame, named).round(3).to_string())
    pairs = cohen_pairs(votes, named, args.image_column, args.rater_column)
    print(pairs.groupby("label")["cohen_kappa"].agg(["mean", "min", "max"]).round(3).rename(columns=lambda c: f"cohen {c}").to_string())
    print(f"→ {args.out}")


def _explain(args: argparse.Namespace) -> None:
    from medray.checkpoint import locate
    from medray.explain import write_overlays

    uri = locate(storage.absolute(args.checkpoint))
    labels = args.labels.split(",") if args.labels else None
    for path in write_overlays(uri, [storage.absolute(i) for i in args.images], storage.absolute(args.out), labels):
        print(path)


def _compare(args: argparse.Namespace) -> None:
    from medray.compare import compare

    config = _start("compare", args.config, args.set)
    table, paths = compare(config, storage.absolute(args.a), storage.absolute(args.b))
    print(table[["auroc_a", "auroc_b", "difference", "p_value", "difference_lo", "difference_hi"]].round(4).to_string())
    print(f"→ {paths['compare.md']}")


EXTRA_VERBS = {"consensus": _consensus, "explain": _explain, "compare": _compare}


if __name__ == "__main__":
    main()
