"""Where training metrics go besides Ray Train's own files: TensorBoard, and MLflow when configured.

Only rank 0 tracks. TensorBoard event files land in ``<run>/tensorboard`` (for an ``s3://`` run
they are written locally and copied there after every epoch). MLflow is optional and not a
dependency: setting ``tracking.mlflow_uri`` without the package installed is an error before any
work starts. Only numbers are logged — metrics per epoch, never images, paths or patient data.
"""

from __future__ import annotations

import os
import tempfile

from medray.config import JobConfig, TrackingConfig
from medray.errors import MedrayError
from medray.io import storage


class TrackingError(MedrayError, RuntimeError):
    pass


def check(tracking: TrackingConfig) -> None:
    """Fail early, on the driver, when MLflow is asked for but cannot be used."""
    if tracking.mlflow_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrackingError(
                f"tracking.mlflow_uri is set ({tracking.mlflow_uri}) but the mlflow package is not installed: "
                "`pip install mlflow`, or unset tracking.mlflow_uri"
            ) from None


class Tracker:
    def __init__(self, config: JobConfig):
        self.run_dir, self.writer, self.mlflow, self.local = config.run_dir, None, None, None
        t = config.tracking
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            target = storage.join(self.run_dir, "tensorboard")
            self.local = tempfile.mkdtemp(prefix="medray-tb-") if storage.is_s3(self.run_dir) else target
            self.writer = SummaryWriter(self.local)
        if t.mlflow_uri:
            check(t)
            import mlflow

            mlflow.set_tracking_uri(t.mlflow_uri)
            mlflow.set_experiment(t.mlflow_experiment)
            self.mlflow = mlflow
            mlflow.start_run(run_name=config.name)

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
            if storage.is_s3(self.run_dir):
                self._upload()
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in numbers.items()}, step=step)

    def _upload(self) -> None:
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, "tensorboard", name), f.read())

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            self.mlflow.end_run()
