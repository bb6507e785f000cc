"""``medray <verb>``: the command line, and ``run_job`` for the thin ``jobs/*.py`` entrypoints.

Jobs that run on Ray (train, evaluate, score, demo) take one YAML config plus ``--set`` overrides
and write the resolved config next to their outputs.
"""

from __future__ import annotations

import argparse
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


def _run(verb: str, args: argparse.Namespace) -> None:
    _setup_logging()
    try:
        config = load_config(args.config, args.set)
    except ConfigError as err:
        sys.exit(f"medray {verb}: {err}")
    init_ray()
    save_config(config, storage.join(config.run_dir, f"{verb}.config.yaml"))
    JOBS[verb](config)


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
    ingest.add_argument("source", help="the dataset's label file, local or s3://")
    ingest.add_argument("out", help="manifest to write, e.g. data/manifest.parquet")
    ingest.add_argument("--format", default="nih-cxr14", choices=["nih-cxr14"])
    ingest.add_argument("--labels", help="comma-separated subset of the dataset's labels")

    split = verbs.add_parser("split", help="patient-level train/val/test split")
    split.add_argument("manifest")
    split.add_argument("out")
    for name, default in (("--val", 0.15), ("--test", 0.15), ("--min-positive", 0.5), ("--train-keeps-positive", 0.5)):
        split.add_argument(name, type=float, default=default)
    split.add_argument("--label", help="label(s) whose positives val and test are enriched with, comma-separated")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--sites", help="comma-separated values of the 'site' column held out as test (cross-site)")
    split.add_argument("--folds", type=int, help="grouped stratified k-fold over the patients outside test (column 'fold')")

    audit = verbs.add_parser("audit", help="leakage audit of a split manifest: patients, studies, near-duplicate images")
    audit.add_argument("manifest")
    audit.add_argument("--out", help="folder for audit.json, audit.md and the near-duplicate table; default <run>/audit")
    audit.add_argument("--max-distance", type=int, help="near-duplicate Hamming distance (of 256 bits); default audit.max_distance")
    _job_arguments(audit)

    for verb in JOBS:
        _job_arguments(verbs.add_parser(verb, help=f"run the {verb} job"))

    args = parser.parse_args(argv)
    if args.verb in JOBS:
        return _run(args.verb, args)
    _setup_logging()
    if args.verb == "demo-data":
        from medray.demo_data import generate

        print(generate(args.out, args.patients, args.image_size, args.seed))
    elif args.verb == "ingest":
        from medray.datasets import FORMATS

        init_ray()
        labels = args.labels.split(",") if args.labels else None
        result = FORMATS[args.format](storage.absolute(args.source), storage.absolute(args.out), labels)
        print(f"{result.images} images → {result.manifest}; {result.quarantined} quarantined → {result.quarantine}")
    elif args.verb == "split":
        from medray.manifest import Manifest, read_manifest, write_manifest
        from medray.splits import split_by_patient, summary

        manifest = read_manifest(storage.absolute(args.manifest))
        label = args.label.split(",") if args.label else None
        sites = args.sites.split(",") if args.sites else None
        frame = split_by_patient(
            manifest, args.val, args.test, args.min_positive, label, args.seed, args.train_keeps_positive, sites, args.folds
        )
        write_manifest(Manifest(frame, manifest.labels, manifest.task), storage.absolute(args.out))
        print(summary(frame, manifest.labels).round(3).to_string())
    elif args.verb == "audit":
        _audit(args)


def _audit(args: argparse.Namespace) -> None:
    from medray.audit import audit

    try:
        config = load_config(args.config, args.set)
    except ConfigError as err:
        sys.exit(f"medray audit: {err}")
    init_ray()
    out = storage.absolute(args.out) if args.out else storage.join(config.run_dir, "audit")
    distance = config.audit.max_distance if args.max_distance is None else args.max_distance
    try:
        result = audit(storage.absolute(args.manifest), out, distance, config.audit.thumbnails)
    except ValueError as err:  # a manifest that cannot be audited: missing, unsplit, invalid
        sys.exit(f"medray audit: {err}")
    for check in result.checks:
        print(f"{'pass' if check['passed'] else 'FAIL'}  {check['name']:<16} {check['count']:>6}  {check['detail']}")
    print(f"{'passed' if result.passed else 'FAILED'}: {result.paths['audit.md']}")
    if not result.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
