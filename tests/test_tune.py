"""Sweeps on a real local Ray: ASHA early stopping, results, best.yaml, and resuming an interrupted sweep."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medray.config import build_config, load_config
from medray.sweeps.tune import run_sweep

REPO = Path(__file__).resolve().parents[1]


def base(tmp_path, manifest, name="sweep", epochs=2) -> dict:
    return {
        "name": name,
        "storage": str(tmp_path / "runs"),
        "data": {"manifest": manifest, "image_size": 32},
        "train": {"epochs": epochs, "workers": 1, "cpus_per_worker": 0.5, "batch_size": 16},
    }


@pytest.mark.timeout(1200)  # a hang guard for five trainings (four trials and a reseed), on a busy machine too
def test_a_sweep_stops_poor_trials_early_and_writes_a_ranked_table_and_best_config(tmp_path, split_manifest_path, ray_session):
    # Epoch length (train_samples) differs by sampling strategy and nothing else, so ASHA's decisions
    # are known in advance: undersampling, tried first, sets the bar the others miss at epoch 1.
    space = tmp_path / "imbalance-tiny.yaml"
    space.write_text(
        "metric: train_samples\nmode: min\nnum_samples: 1\nmax_concurrent: 1\nscheduler: asha\n"
        "grace_period: 1\nreduction_factor: 2\n"
        "space:\n  sampling.strategy: {grid: [undersample, none, oversample, balanced]}\n"
        "  loss.weighting: {choice: [seed]}\n"
    )
    config = build_config(base(tmp_path, split_manifest_path))
    result = run_sweep(config, str(space), seeds=1)

    trials = pd.read_parquet(result.paths["trials.parquet"])
    assert len(trials) == 4
    assert (trials["epochs_run"] < 2).any(), "ASHA stopped no trial early"
    assert trials.iloc[0]["sampling.strategy"] == "undersample"
    assert "| rank |" in Path(result.paths["ranking.md"]).read_text()
    assert Path(result.paths["metric_by_dimension.png"]).read_bytes()[:4] == b"\x89PNG"

    best = load_config(result.best_config)
    assert best.sampling.strategy == "undersample" and best.data.manifest == split_manifest_path
    assert yaml.safe_load(Path(result.best_config).read_text())["name"] == "sweep-best"
    seeds = pd.read_csv(result.paths["seeds.csv"])
    assert seeds["seed"].tolist() == [1] and seeds["train_samples"].notna().all()


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, split_manifest_path, ray_session):
    space = tmp_path / "weighting.yaml"
    space.write_text(
        "num_samples: 1\nmax_concurrent: 1\nscheduler: none\n"
        "space:\n  loss.weighting: {grid: [none, seed, pos_weight]}\n"
    )
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(base(tmp_path, split_manifest_path, "resumable", epochs=1)))
    command = [sys.executable, "jobs/tune.py", "--config", str(config), "--set", f"tune.space={space}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    finished = tmp_path / "runs" / "resumable" / "tune" / "finished"

    sweep = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                             stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 400
    while not (finished.exists() and any(finished.iterdir())):
        assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)
    os.killpg(sweep.pid, signal.SIGINT)  # as Ctrl-C, or a cluster going down mid-sweep
    sweep.wait(timeout=120)
    first = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    assert 1 <= len(first) < 3

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    assert len(after) == 3
    assert all(after[name] == mtime for name, mtime in first.items()), "a finished trial ran again"
    assert len(pd.read_csv(tmp_path / "runs" / "resumable" / "tune" / "trials.csv")) == 3
