"""Batch scoring: every image under a folder or ``s3://`` prefix → one Parquet row with probabilities.

Exactly one row per input: unreadable files are rows with an ``error``, not gaps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from medray import checkpoint, storage
from medray.config import JobConfig
from medray.images import IMAGE_EXTENSIONS
from medray.predict import predict

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    output: str
    inputs: int
    scored: int
    errors: int


def score(config: JobConfig) -> ScoreSummary:
    if not config.score.input:
        raise ValueError("score.input is required: a folder or s3:// prefix of images")
    checkpoint_uri = checkpoint.resolve(config.score.checkpoint, config.run_dir)
    output = config.score.output or storage.join(config.run_dir, "scores")
    uris = storage.list_files(config.score.input, IMAGE_EXTENSIONS)
    if not uris:
        raise ValueError(f"{config.score.input}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    scored = predict(ray.data.from_items([{"image": u} for u in uris]), checkpoint_uri, config.score.batch_size, config.score.actors)
    fs, path = storage.filesystem(output)
    scored.write_parquet(path, filesystem=fs, mode="overwrite")

    written = ray.data.read_parquet(path, filesystem=fs, columns=["error"]).to_pandas()
    errors = int((written["error"] != "").sum())
    summary = ScoreSummary(output, len(uris), len(written) - errors, errors)
    if len(written) != len(uris):
        raise RuntimeError(f"scoring wrote {len(written)} rows for {len(uris)} inputs in {output}")
    return summary
