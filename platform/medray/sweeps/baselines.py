"""Single-task baselines: one model per label, trained with the multi-label run's own recipe, set beside it.

Good practice starts from single-label models, so that a multi-label model's gain or loss on each
finding is known. ``medray baselines --config run.yaml`` writes each label's one-label manifest, trains
one model per label as the trials of one Ray Tune run (Tune as the parallel runner: as many trials at
once as the cluster holds; rerunning resumes), then scores every model and the run's own best
checkpoint on the same test images and compares each label's AUROCs with DeLong's test. Results:
``<run>/baselines/baselines.json`` and ``baselines.md``; ``medray evaluate`` shows the table in its
report when it is there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pandas as pd

from medray.config import ConfigError, JobConfig
from medray.data import rows
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.evaluation import intervals
from medray.evaluation.compare import baselines_note, baselines_uri
from medray.evaluation.predict import predict
from medray.evaluation.report.document import markdown_table
from medray.io import storage
from medray.sweeps.tune import _trial
from medray.training import checkpoint

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    table: pd.DataFrame  # per label: single-task and multi-label AUROC, DeLong's difference and p-value
    paths: dict[str, str]


def _manifests(manifest: Manifest, labels: list[str], out: str) -> dict[str, str]:
    """Per label, the manifest with that label alone (its vote and agreement columns go with the others)."""
    uris = {}
    for label in labels:
        others = [c for c in manifest.frame if any(c == o or c.endswith(f"_{o}") for o in manifest.labels if o != label)]
        single = Manifest(manifest.frame.drop(columns=others), [label], manifest.task)
        uris[label] = write_manifest(single, storage.join(out, "manifests", f"{label}.parquet"))
    return uris


TRIAL_CPU = 0.01  # a trial only waits on its TorchTrainer, whose workers hold the real resources


def _concurrent(config: JobConfig) -> int:
    """As many trials at once as the cluster's CPUs hold with a whole CPU left over: each trial's training
    reads its data through Ray Data tasks of one CPU, which wait forever when no CPU is free."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    per_trial = config.train.workers * config.train.cpus_per_worker + TRIAL_CPU
    concurrent = int((total - 1) // per_trial)
    if concurrent < 1:
        raise ConfigError(f"the cluster's {total:g} CPUs cannot hold one baseline training (train.workers × train.cpus_per_worker = "
                          f"{per_trial - TRIAL_CPU:g}) and keep a CPU free for its data: lower train.cpus_per_worker")  # fmt: skip
    return concurrent


def _train_all(config: JobConfig, manifests: dict[str, str], out: str, concurrent: int) -> dict[str, str]:
    """One Tune trial per label; the best checkpoint of each label's trial."""
    from ray import tune

    base = config.model_dump(mode="json", exclude={"tune"})
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, sweep_dir=out), {"cpu": TRIAL_CPU})
    fs, path = storage.filesystem(out)
    fs = fs if storage.is_s3(out) else None
    experiment = storage.join(path, "sweep")
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"data.manifest": tune.grid_search(list(manifests.values()))},
            tune_config=tune.TuneConfig(metric="val_auroc_mean", mode="max", max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="sweep", storage_path=path, storage_filesystem=fs, verbose=0),
        )
    results = tuner.fit()
    label_of = {uri: label for label, uri in manifests.items()}
    best = {}
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"the single-task trial for {result.config.get('data.manifest')} failed: {result.error}")
        label = label_of[result.config["data.manifest"]]
        best[label] = checkpoint.resolve(None, storage.join(out, "trials", result.metrics["trial_id"]))
    return best


def run_baselines(config: JobConfig, labels: list[str] | None = None) -> BaselineResult:
    """Train the single-task models of ``labels`` (default: all) and compare each with the run's model."""
    if config.model.head != "backbone":  # the baselines are image models, compared with the run's image model
        raise ConfigError(f"model.head is {config.model.head!r}: `medray baselines` compares image models; set model.head: backbone")
    manifest = read_manifest(config.manifest)
    if manifest.task != "multi-label":
        raise ConfigError(f"{config.manifest}: single-task baselines compare a multi-label model's labels; this task is {manifest.task}")
    labels = labels or manifest.labels
    unknown = sorted(set(labels) - set(manifest.labels))
    if unknown:
        raise ConfigError(f"--labels {unknown} are not labels of {config.manifest}: {manifest.labels}")
    multi = checkpoint.resolve(config.evaluate.checkpoint, config.run_dir)  # before the slow part: the run must be trained
    out = storage.join(config.run_dir, "baselines")
    single = _train_all(config, _manifests(manifest, labels, out), out, _concurrent(config))

    test = manifest.split("test")[["image", "patient_id", *labels]]
    scored = {"multi": predict(rows(test), multi, config.evaluate.batch_size).to_pandas().set_index("image").loc[test["image"]]}
    rows_ = []
    for label in labels:
        one = predict(rows(test), single[label], config.evaluate.batch_size).to_pandas().set_index("image").loc[test["image"]]
        ok = (one["error"] == "").to_numpy() & (scored["multi"]["error"] == "").to_numpy()
        y = test[label].to_numpy(float)[ok]
        result = intervals.delong(y, one[f"prob_{label}"].to_numpy(float)[ok], scored["multi"][f"prob_{label}"].to_numpy(float)[ok])
        rows_.append({"label": label, "single_task_auroc": result["auroc_a"], "multi_label_auroc": result["auroc_b"],
                      "difference": result["difference"], "p_value": result["p_value"], "images": int(ok.sum()),
                      "positives": int(y[~pd.isna(y)].sum()), "checkpoint": single[label]})  # fmt: skip
    table = pd.DataFrame(rows_).set_index("label")
    paths = {"baselines.json": baselines_uri(config.run_dir), "baselines.md": storage.join(out, "baselines.md")}
    storage.write_text(paths["baselines.json"], json.dumps({"multi_label_checkpoint": multi, "labels": json.loads(table.to_json(orient="index"))}, indent=2))
    storage.write_text(paths["baselines.md"], f"# Single-task baselines\n\n{baselines_note(len(test))}\n\n{markdown_table(table.drop(columns='checkpoint'))}\n")
    return BaselineResult(table, paths)
