"""``medray <verb>``: the command line, and ``run_job`` for the thin ``jobs/*.py`` entrypoints.

One table, ``COMMANDS``, holds every verb. A verb with settings takes ``--config FILE`` and ``--set
section.key=value``; its own flags are shorthands for config keys (``medray split --val 0.2`` is
``--set split.val=0.2``), so a YAML and the flags can never disagree. Heavy libraries (torch, Ray,
pandas) are imported by the verb that runs, never by ``medray --help``.

A user's mistake (``MedrayError``) is printed as one line and exits 2 (1 when a check failed);
anything else is a bug and keeps its traceback. ``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medray.errors import CheckFailed, DataError, MedrayError

log = logging.getLogger("medray")
CONFIG_KEY = "config:"  # argparse dest prefix of the flags that stand for a config key


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace, Any], None]  # (arguments, JobConfig or None)
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    config: bool = True  # takes --config / --set
    ray: bool = False  # runs on Ray: the S3 settings are applied first, then Ray starts
    job: bool = False  # a job of jobs/*.py: its resolved config is saved under the run


def _setting(parser: argparse.ArgumentParser, flag: str, key: str, **kwargs) -> None:
    """A flag that overrides the config key ``key`` (default: the config's value)."""
    parser.add_argument(flag, dest=CONFIG_KEY + key, default=None, **kwargs)


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = [f"{k[len(CONFIG_KEY) :]}={json.dumps(v)}" for k, v in vars(args).items() if k.startswith(CONFIG_KEY) and v is not None]
    return [*args.set, *flags]  # JSON is YAML, so --set parses the flags' values exactly


# --- the verbs ---------------------------------------------------------------------------------------


def _demo_data(args, config) -> None:
    from medray.data.demo_data import generate

    d = config.demo_data
    print(generate(args.out, d.patients, d.image_size, d.seed))


def _demo_data_arguments(parser) -> None:
    parser.add_argument("out")
    _setting(parser, "--patients", "demo_data.patients", type=int)
    _setting(parser, "--image-size", "demo_data.image_size", type=int)
    _setting(parser, "--seed", "demo_data.seed", type=int)


def _ingest(args, config) -> None:
    from medray.data.datasets import ingest
    from medray.io import storage

    try:
        result = ingest(storage.absolute(args.source), storage.absolute(args.out), config.ingest, config.dicomweb)
    except MedrayError:
        raise
    except ValueError as err:  # the adapters (medray.data.datasets) report unusable input as ValueError
        raise DataError(str(err)) from err
    print(f"{result.balance}\n{result.pseudonyms}\nmanifest: {result.manifest}\nquarantine: {result.quarantine}")


def _ingest_arguments(parser) -> None:
    parser.add_argument("source", help="the dataset's label file, .npz or folder, local or s3://; or dicomweb://host:port/root?filters")
    parser.add_argument("out", help="manifest to write, e.g. data/manifest.parquet")
    _setting(parser, "--format", "ingest.format", choices=["nih-cxr14", "chexpert", "medmnist", "csv", "folder", "dicomweb"],
             help="default: ingest.format of the config (nih-cxr14)")  # fmt: skip
    _setting(parser, "--labels", "ingest.labels", type=_names, help="comma-separated subset of the dataset's labels")


def _split(args, config) -> None:
    from medray.data.manifest import Manifest, read_manifest, write_manifest
    from medray.data.splits import split_with_config, summary
    from medray.io import storage

    manifest = read_manifest(storage.absolute(args.manifest))
    frame = split_with_config(manifest, config.split, args.force)
    write_manifest(Manifest(frame, manifest.labels, manifest.task), storage.absolute(args.out))
    print(summary(frame, manifest.labels).round(3).to_string())


def _split_arguments(parser) -> None:
    parser.add_argument("manifest")
    parser.add_argument("out")
    for flag in ("val", "test", "min-positive", "train-keeps-positive"):
        _setting(parser, f"--{flag}", f"split.{flag.replace('-', '_')}", type=float)
    _setting(
        parser, "--label", "split.labels", type=_names, help="label(s) whose positives val and test are enriched with, comma-separated"
    )
    _setting(parser, "--seed", "split.seed", type=int)
    _setting(
        parser, "--sites", "split.sites", type=_names, help="comma-separated values of the 'site' column held out as test (cross-site)"
    )
    _setting(parser, "--folds", "split.folds", type=int, help="grouped stratified k-fold over the patients outside test (column 'fold')")
    parser.add_argument("--force", action="store_true", help="replace a split the manifest already has (e.g. an official one)")


def _audit(args, config) -> None:
    from medray.data.audit import audit
    from medray.io import storage

    out = storage.absolute(args.out) if args.out else storage.join(config.run_dir, "audit")
    result = audit(storage.absolute(args.manifest), out, config.audit.max_distance, config.audit.thumbnails)
    for check in result.checks:
        print(f"{check['status']:<4}  {check['name']:<16} {'–' if check['count'] is None else check['count']:>6}  {check['detail']}")
    if not result.passed:
        raise CheckFailed(f"leakage found across splits: see {result.paths['audit.md']}")
    print(f"passed: {result.paths['audit.md']}")


def _audit_arguments(parser) -> None:
    parser.add_argument("manifest")
    parser.add_argument("--out", help="folder for audit.json, audit.md and the near-duplicate table; default <run>/audit")
    _setting(parser, "--max-distance", "audit.max_distance", type=int, help="near-duplicate Hamming distance (of 256 bits)")


def _consensus(args, config) -> None:
    import io

    import pandas as pd

    from medray.data.labels import agreement_summary, attach, cohen_pairs, dawid_skene
    from medray.data.manifest import read_manifest, write_manifest
    from medray.io import storage

    votes = pd.read_csv(io.BytesIO(storage.read_bytes(storage.absolute(args.votes))))
    manifest = read_manifest(storage.absolute(args.manifest))
    named = [label for label in manifest.labels if label in votes]
    result = attach(manifest, votes, args.image_column, args.rater_column, args.tie, not args.keep_labels, args.method)
    write_manifest(result, storage.absolute(args.out))
    print(agreement_summary(result.frame, named).round(3).to_string())
    pairs = cohen_pairs(votes, named, args.image_column, args.rater_column)
    print(pairs.groupby("label")["cohen_kappa"].agg(["mean", "min", "max"]).round(3).rename(columns=lambda c: f"cohen {c}").to_string())
    if args.method == "dawid-skene":
        raters = pd.concat({label: dawid_skene(votes, label, args.image_column, args.rater_column)[1] for label in named}, names=["label"])
        print("each rater's sensitivity and specificity as Dawid-Skene estimates them:")
        print(raters.round(3).to_string())
    print(f"→ {args.out}")


def _consensus_arguments(parser) -> None:
    parser.add_argument("votes", help="CSV with one row per (image, rater) and a 0/1 column per label")
    parser.add_argument("manifest")
    parser.add_argument("out", help="manifest to write (may be the same file)")
    parser.add_argument("--image-column", default="Image Index")
    parser.add_argument("--rater-column", default="Rater")
    parser.add_argument("--tie", default="unknown", choices=["unknown", "positive", "negative"], help="majority: what a tie becomes")
    parser.add_argument("--method", default="majority", choices=["majority", "dawid-skene"],
                        help="dawid-skene weighs each rater by their estimated sensitivity and specificity and adds posterior_<label>")
    parser.add_argument("--keep-labels", action="store_true", help="add agreement only; keep the manifest's labels")


def _explain(args, config) -> None:
    from medray.evaluation.explain import write_overlays
    from medray.io import storage
    from medray.training.checkpoint import locate

    uri = locate(storage.absolute(args.checkpoint))
    labels = _names(args.labels) if args.labels else None
    for path in write_overlays(uri, [storage.absolute(i) for i in args.images], storage.absolute(args.out), labels):
        print(path)


def _explain_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its best checkpoint)")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", default="gradcam", help="folder or s3:// prefix for the PNGs")
    parser.add_argument("--labels", help="comma-separated labels (default: all)")


def _compare(args, config) -> None:
    from medray.evaluation.compare import compare
    from medray.io import storage

    table, paths = compare(config, storage.absolute(args.a), storage.absolute(args.b))
    print(table[["auroc_a", "auroc_b", "difference", "p_value", "difference_lo", "difference_hi"]].round(4).to_string())
    print(f"→ {paths['compare.md']}")


def _compare_arguments(parser) -> None:
    parser.add_argument("a", help="checkpoint directory or run directory")
    parser.add_argument("b", help="checkpoint directory or run directory")


def _demo_slides(args, config) -> None:
    from medray.wsi.demo_slides import generate

    print(generate(args.out, args.slides, args.width, args.height, args.seed))


def _demo_slides_arguments(parser) -> None:
    parser.add_argument("out")
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)


def _tissue(args, config) -> None:
    from medray.io import storage
    from medray.wsi.extract import png
    from medray.wsi.slides import open_slide
    from medray.wsi.tissue import detect, overlay

    with open_slide(storage.absolute(args.slide)) as slide:
        mask = detect(slide, config.wsi.thumbnail_side, config.wsi.min_region_um2)
    storage.write_bytes(storage.absolute(args.out), png(overlay(mask)))
    print(f"tissue covers {mask.fraction:.1%} of the slide{' — NO TISSUE FOUND' if mask.empty else ''} → {args.out}")


def _tissue_arguments(parser) -> None:
    parser.add_argument("slide", help="slide file, local or s3://")
    parser.add_argument("out", help="PNG to write")
    _setting(parser, "--thumbnail-side", "wsi.thumbnail_side", type=int)
    _setting(parser, "--min-region-um2", "wsi.min_region_um2", type=float)


def _train(args, config) -> None:
    from medray.jobs import train

    result = train(config)
    print(f"best checkpoint (val mean AUROC {result.metrics['val_auroc_mean']:.3f}): {result.best_checkpoint}")


def _tune(args, config) -> None:
    from medray.config import ConfigError
    from medray.sweeps.tune import run_sweep

    if not config.tune.space:
        raise ConfigError("tune.space: set a search space, e.g. --set tune.space=tune_spaces/imbalance.yaml")
    result = run_sweep(config, config.tune.space, config.tune.seeds)
    print(result.trials.head(10).to_string())
    print(f"ranking: {result.paths['ranking.md']}\nbest config: {result.best_config}")


def _evaluate(args, config) -> None:
    from medray.jobs import evaluate

    evaluation = evaluate(config)
    print(evaluation.table[["auroc", "sensitivity", "specificity", "prevalence"]].round(3).to_string())
    print(f"mean test AUROC {evaluation.mean_auroc:.3f}\nreport: {evaluation.paths['report.html']}")


def _validate_external(args, config) -> None:
    from medray.evaluation.external import validate_external

    result = validate_external(config)
    shown = ["prevalence_internal", "prevalence_external", "auroc_internal", "auroc_external", "delong_p", "citl_external"]
    print(result.table[shown].round(3).to_string())
    print(f"labels that moved: {', '.join(result.summary['labels_moved']) or 'none'}\nreport: {result.paths['report.html']}")


def _score(args, config) -> None:
    from medray.jobs import score

    s = score(config)
    print(f"scored {s.inputs} inputs: {s.scored} scored, {s.errors} errors → {s.output}")


def _embed(args, config) -> None:
    from medray.embeddings.embed import embed

    s = embed(config)
    print(f"embedded {s.inputs} {s.kind} with {s.backbone} ({s.dim}-dim): {s.embedded} embedded, {s.errors} errors → {s.output}")


def _demo(args, config) -> None:
    from medray.demo import run_demo

    run_demo(config)


def _extract_patches(args, config) -> None:
    from medray.io import storage
    from medray.wsi.job import extract_job

    r, _ = extract_job(config)
    print(
        f"{r.slides} slides: {r.done} extracted, {r.skipped} already done, {r.empty} without tissue, {r.errors} unreadable; "
        f"{r.patches} patches ({r.background_skipped:.0%} of grid positions skipped as background) → {r.out}"
    )
    if r.errors:
        print(f"unreadable slides and why: {storage.join(r.out, 'errors.parquet')}")
    if r.stain_kept:
        method = config.wsi.stain_normalise
        print(f"{r.stain_kept} patches kept their original colours: too little stain to fit {method} (stain_normalised: false)")


def _baselines(args, config) -> None:
    from medray.sweeps.baselines import run_baselines

    result = run_baselines(config, _names(args.labels) if args.labels else None)
    print(result.table.drop(columns="checkpoint").round(4).to_string())
    print(f"→ {result.paths['baselines.md']}")


def _baselines_arguments(parser) -> None:
    parser.add_argument("--labels", help="comma-separated labels (default: all of the manifest's)")


def _augment_preview(args, config) -> None:
    from medray.io import storage
    from medray.training.preview import preview

    out = storage.absolute(args.out) if args.out else storage.join(config.run_dir, "augment_preview.png")
    storage.write_bytes(out, preview(config, args.images, args.draws))
    print(f"'{config.data.augment}' on {args.images} training images, {args.draws} draws each → {out}")


def _augment_preview_arguments(parser) -> None:
    parser.add_argument("--out", help="PNG to write (default: <run>/augment_preview.png)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--draws", type=int, default=5)


def _prepare(args, config) -> None:
    from medray.data.cache import prepare

    d = config.data
    result = prepare(config.manifest, d.cache, d.image_size, config.model.in_channels)
    print(f"{result.images} images decoded at {d.image_size} px in {result.seconds:.0f} s, {result.unreadable} unreadable → {result.uri}")


def _drift(args, config) -> None:
    from medray.scoring.drift import describe, drift

    result = drift(args.run_a, args.run_b, config.drift, args.out, args.allow_different_models)
    for check in result.flagged:  # one line each, for a scheduler's alert
        print(f"DRIFT {describe(check)}")
    if result.flagged:
        flagged, md = len(result.flagged), result.paths["drift.md"]
        raise CheckFailed(f"{flagged} of {len(result.checks)} drift checks exceed their limits: see {md}")
    print(f"no drift beyond the limits ({len(result.checks)} checks): {result.paths['drift.md']}")


def _drift_arguments(parser) -> None:
    parser.add_argument("run_a", help="the reference scoring run: a score output folder (local or s3://) with _summary.json")
    parser.add_argument("run_b", help="the scoring run to check against it")
    parser.add_argument("--out", help="folder for drift.json, drift.md and drift.png (default <RUN_B>/_drift)")
    parser.add_argument("--allow-different-models", action="store_true", help="compare runs whose model_sha256 differs")
    _setting(parser, "--psi", "drift.psi", type=float, help="limit of the population stability index")
    _setting(parser, "--ks", "drift.ks", type=float, help="limit of the Kolmogorov–Smirnov statistic")


COMMANDS: dict[str, Command] = {
    "demo-data": Command(_demo_data, "write synthetic chest X-rays in the NIH ChestX-ray14 layout", _demo_data_arguments),
    "ingest": Command(_ingest, "dataset layout → canonical manifest (Parquet)", _ingest_arguments, ray=True),
    "split": Command(_split, "patient-level train/val/test split", _split_arguments),
    "audit": Command(_audit, "leakage audit of a split manifest: patients, studies, near-duplicate images", _audit_arguments, ray=True),
    "consensus": Command(
        _consensus, "rater votes → consensus labels + agreement columns on a manifest", _consensus_arguments, config=False
    ),
    "explain": Command(_explain, "Grad-CAM overlays for any images", _explain_arguments, config=False),
    "compare": Command(_compare, "two checkpoints on the same test split: DeLong + paired bootstrap", _compare_arguments, ray=True),
    "demo-slides": Command(
        _demo_slides, "write synthetic pyramidal TIFF slides and a slide manifest", _demo_slides_arguments, config=False
    ),
    "tissue": Command(_tissue, "a slide's tissue mask, as a PNG overlay for review", _tissue_arguments),
    "train": Command(_train, "train a classifier (Ray Train, DDP)", ray=True, job=True),
    "tune": Command(_tune, "hyperparameter sweep (Ray Tune) over tune.space", ray=True, job=True),
    "baselines": Command(
        _baselines, "one single-label model per label (Ray Tune), each compared with the run's model (DeLong)", _baselines_arguments,
        ray=True, job=True,
    ),
    "evaluate": Command(_evaluate, "test-split metrics with intervals, calibration, subgroups and a report", ray=True, job=True),
    "validate-external": Command(
        _validate_external, "the frozen model, thresholds and calibration on another site's manifest (validate.manifest)", ray=True, job=True
    ),
    "score": Command(_score, "score an image archive (Ray Data), exactly once per input", ray=True, job=True),
    "drift": Command(_drift, "what moved between two scoring runs of one model (PSI, KS, inputs); exit 1 if flagged", _drift_arguments),
    "embed": Command(
        _embed, "a frozen backbone's embeddings of a manifest or patch store (Ray Data), exactly once per input", ray=True, job=True
    ),
    "demo": Command(_demo, "the end-to-end demo on generated data", ray=True, job=True),
    "extract-patches": Command(_extract_patches, "whole-slide images → tissue patches (Ray, one streaming pass)", ray=True, job=True),
    "augment-preview": Command(_augment_preview, "a grid of training images and draws of the augmentation policy (PNG)", _augment_preview_arguments),
    "prepare": Command(_prepare, "decode and resize a manifest's images once into training shards", ray=True, job=True),
}


# --- running a verb ----------------------------------------------------------------------------------


def _add_verb(parser: argparse.ArgumentParser, command: Command) -> None:
    command.arguments(parser)
    if command.config:
        parser.add_argument("--config", help="YAML job config (see jobs/configs/demo.yaml and docs/config.md)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")


def _parser() -> argparse.ArgumentParser:
    from medray import __version__

    parser = argparse.ArgumentParser(
        prog="medray", description="Distributed training, evaluation and batch scoring of medical image classifiers on Ray."
    )
    parser.add_argument("--version", action="version", version=f"medray {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, command in COMMANDS.items():
        _add_verb(verbs.add_parser(verb, help=command.help, description=command.help), command)
    return parser


def _setup_logging() -> None:
    # medray's own lines (one per stage); other libraries only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)


def _execute(verb: str, args: argparse.Namespace) -> None:
    command = COMMANDS[verb]
    _setup_logging()
    try:
        config = None
        if command.config:
            from medray.runtime import start

            config = start(args.config, _overrides(args), ray=command.ray)
        if command.job:
            from medray.config import save_config
            from medray.io import storage

            save_config(config, storage.join(config.run_dir, f"{verb}.config.yaml"))
        command.run(args, config)
    except Exception as err:
        mistake = _user_error(err)
        if mistake is None or args.debug:
            raise
        print(f"medray {verb}: {mistake}", file=sys.stderr)
        raise SystemExit(getattr(mistake, "exit_code", 2)) from None


def _user_error(err: Exception) -> Exception | None:
    """The user's mistake behind ``err``, or None for a bug. A missing file the user named is a usage error
    too (its message names the path), and so is an S3 store that does not answer, wherever it was called."""
    cause = getattr(err, "cause", None)  # a Ray task's error carries the one raised in the worker
    if isinstance(cause, Exception):
        err = cause
    if isinstance(err, (MedrayError, FileNotFoundError)):
        return err
    from medray.io.storage import as_store_error

    return as_store_error(err)


def main(argv: list[str] | None = None) -> None:
    """``medray <verb> ...``; exits 2 on a usage error, 1 when a check failed."""
    args = _parser().parse_args(argv)
    _execute(args.verb, args)


def run_job(verb: str, argv: list[str] | None = None) -> None:
    """Entry for ``jobs/<verb>.py``: ``--config FILE [--set a.b=v ...]``."""
    parser = argparse.ArgumentParser(prog=f"medray {verb}", description=COMMANDS[verb].help)
    _add_verb(parser, COMMANDS[verb])
    _execute(verb, parser.parse_args(argv))


if __name__ == "__main__":
    main()
