"""Starting a job: the validated config, the S3 and DICOMweb settings every client must share, then Ray.

``start`` is what the command line does before each verb, and what a Python user calls before the
job functions (``medray.start("job.yaml")``), so that both see the same S3 endpoint and the same Ray.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from medray.config import JobConfig, load_config
from medray.io import dicomweb, storage


def start(config: JobConfig | str | None = None, overrides: list[str] | None = None, ray: bool = True) -> JobConfig:
    """The config (a ``JobConfig``, or a YAML path plus ``--set``-style overrides), with its S3 and DICOMweb settings
    applied to this process's environment *before* Ray starts, so that Ray's local workers inherit them."""
    if not isinstance(config, JobConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise TypeError("overrides apply to a config file; edit a JobConfig with model_copy(update=...)")
    s3 = config.s3
    storage.configure_s3(s3.endpoint_url, s3.region, s3.connect_timeout, s3.read_timeout, s3.attempts)
    dicomweb.configure(config.dicomweb.authorization_env, config.dicomweb.page_size, config.dicomweb.timeout)
    if ray:
        init_ray()
    return config


def init_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local Ray, quietly: Ray's own
    logs stay in its session files, and Ray Data draws progress bars only on a terminal."""
    import ray
    import ray.data

    if not ray.is_initialized():
        _drop_notices()
        # Workers' output stays in their log files: Ray's actors print notices there that nobody running a job
        # needs (errors come back as exceptions). The training loop sends its epoch lines through a queue.
        if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by the user for a running cluster
            ray.init(logging_level=logging.WARNING, log_to_driver=False)
        else:  # a local Ray of its own, never whatever cluster last ran on this machine
            ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, runtime_env=local_runtime_env())
    # Redrawn bars are hundreds of lines in a log file or a pipe; the datasets built from here on (and the
    # actors that run them, such as Ray Train's split coordinator) take this context with them.
    ray.data.DataContext.get_current().enable_progress_bars = _terminal()
    # Ray Data prints every execution plan at INFO; its log file keeps them.
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


class _Notice(logging.Filter):
    """Drops one of Ray's informational notices (matched by its start), keeping every other record."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _drop_notices() -> None:
    """Two notices Ray prints on every start: that token authentication is on (the safe default; the warning
    that it is *off* still shows) and that Ray Data's progress bars are off (medray's choice, off a terminal)."""
    notices = {
        "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
        "ray.data._internal.progress": "Progress bars disabled",
    }
    for name, start in notices.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Notice) for f in logger.filters):
            logger.addFilter(_Notice(start))


def _terminal() -> bool:
    return sys.stdout.isatty()


def local_runtime_env() -> dict:
    """The runtime environment of a local Ray's workers (see ``pin_state_api`` and ``_quiet_ray_data``)."""
    return {"env_vars": _quiet_ray_data(), "worker_process_setup_hook": "medray.runtime.pin_state_api"}


def pin_state_api() -> None:
    """Runs in every worker of a local Ray as it starts: Ray's state API, called with no address, scans the
    machine for Ray instances and gives up when it finds several (another user's, a second job's). Ray Train's
    placement-group cleaner asks it whether a finished run's controller is alive; failing, it never frees that
    run's CPUs, and on a small machine the next trial of a sweep then waits forever for a whole CPU. Each
    worker is pointed at its own cluster instead."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _quiet_ray_data() -> dict[str, str]:
    """Environment of a local Ray's processes: Ray Data's console at WARNING (its log file keeps the rest)
    and, off a terminal, no progress bars in datasets that workers create themselves."""
    env = {"RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml"))}
    if not _terminal():
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env
