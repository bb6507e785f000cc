"""Fault tolerance: a killed training worker costs at most the epoch in progress; a checkpoint cut short
is never taken as complete; metrics reach TensorBoard; MLflow asked for but missing is a clear error."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from medray.config import build_config
from medray.training import checkpoint, tracking
from medray.training.models import build_model
from medray.training.trainer import train

LABELS = ["Mass", "Nodule", "Cardiomegaly", "Effusion"]


@pytest.fixture
def saved(tmp_path):
    meta = {"backbone": "resnet18", "labels": LABELS, "task": "multi-label", "in_channels": 1, "image_size": 32}
    checkpoint.save(str(tmp_path), {"model": build_model("resnet18", len(LABELS), 1).state_dict()}, meta)
    return tmp_path


def test_a_complete_checkpoint_loads(saved):
    _, meta = checkpoint.load_model(str(saved))
    assert checkpoint.is_complete(str(saved)) and meta["sha256"] == checkpoint.identity(str(saved))


def test_a_checkpoint_without_its_manifest_is_refused(saved):
    (saved / checkpoint.MANIFEST_FILE).unlink()  # cut short before the manifest, which is written last
    assert not checkpoint.is_complete(str(saved))
    with pytest.raises(checkpoint.CheckpointError, match="not a complete medray checkpoint"):
        checkpoint.load_model(str(saved))


def test_a_checkpoint_with_truncated_weights_is_refused(saved):
    weights = saved / checkpoint.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an upload cut short
    with pytest.raises(checkpoint.CheckpointError, match="model.pt does not match"):
        checkpoint.load_state(str(saved))


def test_mlflow_configured_but_not_installed_fails_before_any_work(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # as if not installed, even where it is
    config = build_config({"tracking": {"mlflow_uri": "http://mlflow.example:5000"}})
    with pytest.raises(tracking.TrackingError, match="mlflow package is not installed"):
        tracking.check(config.tracking)


def _marking_registered_checkpoints(folder: Path):
    """A Ray Train callback that touches ``folder/<checkpoint dir>`` once the controller has registered
    that checkpoint (user callbacks run after its checkpoint manager): the event the killer waits for.
    Defined in a function so that it travels to the controller by value."""
    from ray.train import UserCallback

    class MarkRegistered(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(checkpoint.path).name).touch()

    return MarkRegistered()


def _kill_a_worker_mid_run(run_dir: Path, registered: Path, last_epoch: int, killed: dict) -> None:
    """SIGKILL rank 1 while it runs an epoch that is not the last, once the checkpoint before that epoch is
    registered: events both (the worker's status file, written as each epoch starts, and the callback's mark)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for status_file in (run_dir / "workers").glob("rank1-*.json"):
            try:
                status = json.loads(status_file.read_text())
            except ValueError:
                continue  # being written
            epoch = status["epoch"]
            # The checkpoint of epoch index e-1 sits in folder epoch_<e> (folders count from 1, as the logs do).
            if 1 <= epoch < last_epoch and (registered / f"epoch_{epoch:03d}").exists():
                os.kill(status["pid"], signal.SIGKILL)
                killed.update(status)
                return
        time.sleep(0.05)  # how often to look; the window to act in is a whole epoch


def test_a_killed_worker_costs_at_most_the_epoch_since_the_last_checkpoint(tmp_path, split_manifest_path, ray_session):
    epochs = 3
    config = build_config({
        "name": "killed", "storage": str(tmp_path / "runs"),
        "data": {"manifest": split_manifest_path, "image_size": 32},
        "train": {"epochs": epochs, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 16, "max_failures": 2},
    })  # fmt: skip
    run_dir, registered = Path(config.run_dir), tmp_path / "registered"
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_mid_run, args=(run_dir, registered, epochs - 1, killed), daemon=True)
    killer.start()

    result = train(config, callbacks=[_marking_registered_checkpoints(registered)])
    killer.join(timeout=1)

    assert killed and killed["epoch"] < epochs - 1, f"no worker was killed before the last epoch: {killed}"
    statuses = [json.loads(p.read_text()) for p in (run_dir / "workers").glob("*.json")]
    restarted = [s for s in statuses if s["pid"] != killed["pid"] and s["first_epoch"] > 0]
    assert restarted, f"no worker group was started again after the kill: {killed} {statuses}"
    resumed_from = min(s["first_epoch"] for s in restarted)
    # Resumed from the checkpoint before the killed epoch (or, if the kill landed after that epoch's
    # checkpoint was registered, from that one): at most the killed epoch's work is lost.
    assert resumed_from in (killed["epoch"], killed["epoch"] + 1)
    epochs_saved = sorted(json.loads((d / "meta.json").read_text())["epoch"] for d in (run_dir / "train").glob("epoch_*"))
    assert epochs_saved[-1] == epochs - 1 and 0 <= result.metrics["epoch"] < epochs
    assert all(checkpoint.is_complete(str(d)) for d in (run_dir / "train").glob("epoch_*"))

    # The run's metrics reached TensorBoard once per epoch, across the restart.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps |= {e.step for e in accumulator.Scalars("train_loss")} if "train_loss" in accumulator.Tags()["scalars"] else set()
    assert steps == set(range(epochs))
