"""medray: distributed training, evaluation and batch scoring of medical image classifiers on Ray.

The job functions take one validated config (``medray.load_config`` or ``medray.start``)::

    import medray

    config = medray.start("jobs/configs/demo.yaml", ["train.epochs=2"])  # S3 settings, then Ray
    result = medray.train(config)
    evaluation = medray.evaluate(config)

Importing ``medray`` is light: each name below is imported (with torch, Ray or pandas as it needs)
the first time it is used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medray")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# public name → module that defines it
_EXPORTS = {
    "JobConfig": "medray.config",
    "load_config": "medray.config",
    "ConfigError": "medray.config",
    "MedrayError": "medray.errors",
    "start": "medray.runtime",
    "ingest": "medray.data.datasets",
    "split_with_config": "medray.data.splits",
    "audit": "medray.data.audit",
    "prepare": "medray.data.cache",
    "train": "medray.jobs",
    "run_sweep": "medray.sweeps.tune",
    "evaluate": "medray.jobs",
    "score": "medray.scoring.score",
    "compare": "medray.evaluation.compare",
    "extract_job": "medray.wsi.job",
    "run_demo": "medray.demo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
