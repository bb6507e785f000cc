"""Search spaces for sweeps: YAML files under ``tune_spaces/``, checked before any trial starts.

Keys are the training config's own dotted field names, so a space reads like a set of ``--set``
overrides with ranges::

    metric: val_auroc_mean        # or val_auroc/<label>, val_sens_at_spec90/<label>
    mode: max
    num_samples: 8                # samples drawn (each grid point is tried this many times)
    max_concurrent: 2
    scheduler: asha               # early stopping on the metric; or none
    grace_period: 1               # epochs every trial gets before ASHA may stop it
    reduction_factor: 2
    searcher: random              # or optuna (when installed)
    space:
      loss.weighting: {choice: [none, seed, pos_weight]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      train.batch_size: {randint: [16, 65]}
      model.lr_decay: {uniform: [0.3, 1.0]}
      sampling.strategy: {grid: [none, oversample]}

Every value a trial could draw is validated against the training config: a typo in a key, an empty
choice, reversed bounds or a value the config would refuse is an error naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medray import safe_yaml
from medray.config import ConfigError, JobConfig, build_config, merge
from medray.errors import MedrayError
from medray.io import storage

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchSpaceError(MedrayError, ValueError):
    pass


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = "val_auroc_mean"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(2, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    searcher: Literal["random", "optuna"] = "random"
    space: dict[str, dict[str, list[Any]]]


def _check_key(key: str) -> None:
    model: type[BaseModel] = JobConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise SearchSpaceError(f"space key {key!r}: {'.'.join(parts[: i + 1])!r} is not a training config field")
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise SearchSpaceError(f"space key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            model = annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise SearchSpaceError(f"space key {key!r} is a whole section; search one of its fields")


def _check_distribution(key: str, spec: dict[str, list[Any]]) -> list[Any]:
    """The values a trial could see at the edges of this distribution (to validate them)."""
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SearchSpaceError(f"space key {key!r}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {list(spec)}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not args:
            raise SearchSpaceError(f"space key {key!r}: {kind} has no values")
        return list(args)
    if len(args) != 2:
        raise SearchSpaceError(f"space key {key!r}: {kind} takes [lower, upper], got {args}")
    lower, upper = args
    if not lower < upper:
        raise SearchSpaceError(f"space key {key!r}: lower bound {lower} is not below upper bound {upper}")
    if kind == "loguniform" and lower <= 0:
        raise SearchSpaceError(f"space key {key!r}: loguniform needs a positive lower bound, got {lower}")
    return [lower, upper - 1] if kind == "randint" else [lower, upper]


def nest(flat: dict[str, Any]) -> dict:
    """``{"loss.weighting": "seed"}`` → ``{"loss": {"weighting": "seed"}}``."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_space(uri: str, base: dict) -> SweepSpec:
    """Read and validate a search space against the base training config ``base`` (a raw dict)."""
    try:
        raw = safe_yaml.load(storage.read_text(uri))  # bounded: a user's file, like the config
        spec = SweepSpec.model_validate(raw)
    except FileNotFoundError:
        raise SearchSpaceError(f"search space {uri} does not exist") from None
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"invalid search space {uri}: {safe_yaml.problem(err)}") from None
    except ValidationError as err:
        raise SearchSpaceError(f"invalid search space {uri}: {safe_yaml.cut(str(err), 2000)}") from None
    if not spec.space:
        raise SearchSpaceError(f"{uri}: the space is empty")
    for key, distribution in spec.space.items():
        _check_key(key)
        for value in _check_distribution(key, distribution):
            try:
                build_config(merge(base, nest({key: value})))
            except ConfigError as err:
                raise SearchSpaceError(f"space key {key!r}: value {value!r} is refused by the config:\n{err}") from None
    return spec


def to_tune(spec: SweepSpec) -> dict:
    """The Ray Tune param_space: one flat key per searched field."""
    from ray import tune

    make = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {key: make[kind](args) for key, d in spec.space.items() for kind, args in d.items()}
