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
import sys
import types
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
    "ingest": "medray.datasets",
    "split_with_config": "medray.splits",
    "audit": "medray.audit",
    "prepare": "medray.cache",
    "train": "medray.train",
    "run_sweep": "medray.tune",
    "evaluate": "medray.evaluate",
    "score": "medray.score",
    "compare": "medray.compare",
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


class _Package(types.ModuleType):
    """``medray.train`` is the function even after ``medray/train.py`` is imported: the import system
    binds each submodule on its package, which would shadow the job functions of the same name
    (train, evaluate, score, audit, compare). ``from medray.train import X`` is unaffected."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
