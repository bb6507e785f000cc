"""Sweeps with Ray Tune over the training config: each trial is a function that runs a ``TorchTrainer``
(the Ray Train V2 pattern), forwarding its epoch reports to Tune so ASHA can stop poor trials early.

The sweep lives under ``<storage>/<name>/tune/``; running the same command again restores it with
``Tuner.restore`` and runs only what had not finished. Results: ``trials.parquet`` / ``trials.csv``
(config, metric, epochs run, time, seed of every trial), ``ranking.md``, ``metric_by_dimension.png``,
and ``best.yaml`` — a complete training config for the best trial, which ``medray train`` accepts as is.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import pandas as pd
import yaml

from medray.config import ConfigError, JobConfig, build_config, merge
from medray.evaluation.report.document import markdown_table
from medray.evaluation.report.plots import metric_by_dimension
from medray.io import storage
from medray.sweeps.space import SweepSpec, load_space, nest, to_tune

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    trials: pd.DataFrame
    best_config: str
    paths: dict[str, str]


def _trial(params: dict, base: dict, sweep_dir: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medray.training.trainer import train

    trial_id = tune.get_context().get_trial_id()
    marker = storage.join(sweep_dir, "finished", f"{trial_id}.json")
    if storage.exists(marker):
        # It finished, but the sweep was interrupted before Tune recorded that: report, don't retrain.
        tune.report(json.loads(storage.read_text(marker)))
        return
    config = build_config(merge(base, {**nest(params), "name": trial_id, "storage": storage.join(sweep_dir, "trials")}))
    result = train(config, callbacks=[TuneReportCallback()])
    # A marker written last: a trial that has it finished, and a restored sweep must not run it again.
    storage.write_text(marker, json.dumps(result.metrics, default=float))


def _tuner(spec: SweepSpec, base: dict, sweep_dir: str, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, sweep_dir=sweep_dir),
        {"cpu": 0.01},  # the trial only waits on its TorchTrainer, whose workers hold the real resources
    )
    fs, path = storage.filesystem(sweep_dir)
    fs = fs if storage.is_s3(sweep_dir) else None
    experiment = storage.join(path, "sweep")
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming the sweep in %s", sweep_dir)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    scheduler = None
    if spec.scheduler == "asha":
        # max_t past the last epoch: a trial that survives every rung ends on its own and records its result,
        # instead of being stopped by ASHA at its final report.
        scheduler = ASHAScheduler(max_t=epochs + 1, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
    search_alg = None
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # needs the optuna package

        search_alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space=to_tune(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent, scheduler=scheduler, search_alg=search_alg,
        ),  # fmt: skip
        run_config=tune.RunConfig(name="sweep", storage_path=path, storage_filesystem=fs, verbose=1),
    )


def _table(results, spec: SweepSpec, seed: int) -> pd.DataFrame:
    frame = results.get_dataframe(filter_metric=spec.metric, filter_mode=spec.mode)
    searched = [f"config/{key}" for key in spec.space]
    last = results.get_dataframe()[["trial_id", "training_iteration", "time_total_s"]]
    table = frame[["trial_id", *searched, spec.metric]].merge(last, on="trial_id")
    table = table.rename(columns={c: c.removeprefix("config/") for c in searched})
    table = table.rename(columns={"training_iteration": "epochs_run", "time_total_s": "seconds"})
    table["seed"] = seed
    return table.sort_values(spec.metric, ascending=spec.mode == "min").reset_index(drop=True)


def _markdown(table: pd.DataFrame, spec: SweepSpec) -> str:
    ranked = table[[*spec.space, spec.metric, "epochs_run", "seconds"]].set_index(pd.RangeIndex(1, len(table) + 1, name="rank"))
    return f"# Sweep ranked by {spec.metric} ({spec.mode})\n\n{markdown_table(ranked)}\n"


def run_sweep(config: JobConfig, space_uri: str, seeds: int = 0) -> SweepResult:
    """Run (or resume) the sweep described by ``space_uri`` around the base ``config``."""
    if config.model.head != "backbone":  # its trials train image models: a head would be silently ignored
        raise ConfigError(
            f"model.head is {config.model.head!r}: `medray tune` sweeps image models (model.head: backbone); "
            "a head on embeddings trains in seconds with `medray train`, once per setting"
        )
    base = config.model_dump(mode="json", exclude={"tune"})
    spec = load_space(space_uri, base)
    sweep_dir = storage.join(config.run_dir, "tune")
    results = _tuner(spec, base, sweep_dir, config.train.epochs).fit()
    if not len(results) or results.get_best_result() is None:
        raise RuntimeError(f"the sweep in {sweep_dir} produced no result")

    table = _table(results, spec, config.train.seed)
    best_params = {key: getattr(v, "item", lambda v=v: v)() for key, v in table.iloc[0][list(spec.space)].items()}
    best = build_config(merge(base, {**nest(best_params), "name": f"{config.name}-best"}))
    paths = {name: storage.join(sweep_dir, name) for name in ("trials.parquet", "trials.csv", "ranking.md", "metric_by_dimension.png", "best.yaml")}
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(paths["trials.parquet"], buffer.getvalue())
    storage.write_text(paths["trials.csv"], table.to_csv(index=False))
    storage.write_text(paths["ranking.md"], _markdown(table, spec))
    storage.write_bytes(paths["metric_by_dimension.png"], metric_by_dimension(table, list(spec.space), spec.metric))
    storage.write_text(paths["best.yaml"], yaml.safe_dump(best.model_dump(mode="json", exclude={"tune"}), sort_keys=False))
    if seeds:
        paths["seeds.csv"] = _rerun_with_seeds(best, seeds, spec.metric, sweep_dir)
    return SweepResult(table, paths["best.yaml"], paths)


def _rerun_with_seeds(best: JobConfig, seeds: int, metric: str, sweep_dir: str) -> str:
    """The winner trained again with other seeds: the spread says how much of its lead is luck."""
    from medray.training.trainer import train

    rows = []
    for seed in range(1, seeds + 1):
        config = best.model_copy(update={"name": f"seed-{seed}", "storage": storage.join(sweep_dir, "seeds"),
                                         "train": best.train.model_copy(update={"seed": seed})})  # fmt: skip
        rows.append({"seed": seed, metric: train(config).metrics.get(metric)})
    uri = storage.join(sweep_dir, "seeds.csv")
    frame = pd.DataFrame(rows)
    storage.write_text(uri, frame.to_csv(index=False))
    log.info("best config over %d seeds: %s = %.4f ± %.4f", seeds, metric, frame[metric].mean(), frame[metric].std())
    return uri
