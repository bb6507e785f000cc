"""Scoring with a head on embeddings: each image is embedded by the encoder the head was trained on, then
the head (and its calibration) turns the vector into probabilities — on the same Ray Data pipeline and
exactly-once parts as an image model's scores (medray.scoring.score, which takes ``predict_head`` in place
of ``medray.evaluation.predict.predict``).

The encoder is the store's: its backbone and input size come from the head's ``meta.json``, its weights from
``embed.weights`` (default: the file the head's training config named) and must have the sha256 the store
recorded, or scoring stops before it starts. Each actor embeds exactly as ``medray embed`` does (its
``Embedder``: the same autocast, vectors rounded to float16 as the store keeps them), so an image scored here
gets the probabilities the head gave its stored vector.
"""

from __future__ import annotations

import numpy as np
import ray

from medray.embeddings import heads
from medray.embeddings.backbones import Encoder, load_encoder
from medray.embeddings.embed import Embedder
from medray.embeddings.store import StoreInfo
from medray.evaluation import calibration
from medray.evaluation.predict import DECODE_BATCH, decode_batch, prob_columns
from medray.training import checkpoint
from medray.training.losses import head_size


def encoder_for(meta: dict, uri: str, weights: str | None, model_args: dict | None) -> tuple[Encoder, str | None, dict]:
    """The head's encoder, loaded on the driver and checked against what the store recorded; with the weights
    and model arguments it was loaded with (``embed.weights`` / ``embed.model_args``, else the head's record)."""
    info, recorded = StoreInfo(**meta["embedding"]), meta.get("encoder", {})
    weights = weights or recorded.get("weights")
    model_args = model_args or recorded.get("model_args") or {}
    encoder = load_encoder(info.backbone, weights, None, info.image_size, model_args)
    if (encoder.sha256, encoder.dim) != (info.weights_sha256, info.dim):
        raise heads.HeadError(
            f"embed.weights {weights or '(none)'}: {info.backbone} weights with sha256 {encoder.sha256[:12]}… ({encoder.dim}-dim), "
            f"but the head {uri} was trained on embeddings of weights {info.weights_sha256[:12]}… ({info.dim}-dim): "
            "set embed.weights to the file the store was embedded with"
        )
    return encoder, weights, model_args


class HeadPredictor:
    """The encoder and the head, loaded once per actor (the encoder on its GPU when it has one): decoded
    pixels → the stored kind of vector → one probability per label, calibrated when the head has a calibration."""

    def __init__(self, checkpoint_uri: str, encoder_args: dict, calibrated: bool = True):
        self.embedder = Embedder(**encoder_args)
        self.head, meta = heads.load_head(checkpoint_uri)
        self.sha256, task, labels = meta["sha256"], meta["task"], meta["labels"]
        self.columns = prob_columns(labels)
        self.calibration = calibration.load(checkpoint_uri, task, head_size(task, len(labels))) if calibrated else None

    def __call__(self, batch: dict) -> dict:
        batch = self.embedder(batch)
        vectors, errors = batch.pop("embedding"), batch["error"]
        ok = errors == ""
        probs = np.full((len(errors), len(self.columns)), np.nan, dtype=np.float32)
        if ok.any():
            p = self.head.probabilities(vectors[ok].astype(np.float32))
            # Evaluation fitted the calibration on these probabilities (medray.evaluation.calibration).
            probs[ok] = self.calibration.apply(p) if self.calibration is not None else p
        batch.update({column: probs[:, j] for j, column in enumerate(self.columns)})
        batch["model_sha256"] = np.full(len(errors), self.sha256, dtype=object)  # which head made each score
        return batch


def predict_head(
    ds: ray.data.Dataset, checkpoint_uri: str, batch_size: int = 64, actors: int = 1, calibrated: bool = True,
    cpus: float = 1.0, facts: bool = False, weights: str | None = None, model_args: dict | None = None,
    encoder: Encoder | None = None,
) -> ray.data.Dataset:  # fmt: skip
    """As ``medray.evaluation.predict.predict`` for an image model: ``ds``'s ``image`` column decoded on every
    free CPU, then ``actors`` actors (a GPU each when the cluster has them) embed and apply the head;
    ``error`` and one ``prob_<label>`` per label are added, the other columns pass through. ``encoder``: the
    one ``encoder_for`` gave for these ``weights`` and ``model_args``, when the caller checked it already."""
    if encoder is None:
        encoder, weights, model_args = encoder_for(checkpoint.read_meta(checkpoint_uri), checkpoint_uri, weights, model_args)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    total = ray.cluster_resources().get("CPU", 0)
    if not use_gpu and actors * cpus >= total:
        raise heads.HeadError(
            f"{actors} scoring actors × {cpus} CPUs take every CPU of the cluster ({total:g}), leaving none to "
            "decode images: lower score.actors or score.cpus_per_actor"
        )
    size, channels = encoder.image_size, encoder.in_channels
    args = {"backbone": encoder.backbone, "weights": weights, "in_channels": channels, "image_size": size,
            "model_args": model_args, "sha256": encoder.sha256}  # fmt: skip
    del encoder  # the actors load their own
    decoded = ds.map_batches(decode_batch, fn_kwargs={"size": size, "channels": channels, "facts": facts}, batch_size=DECODE_BATCH)
    return decoded.map_batches(
        HeadPredictor, fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "encoder_args": args, "calibrated": calibrated},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else cpus,
    )  # fmt: skip
