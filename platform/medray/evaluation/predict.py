"""Batch inference on Ray Data: an actor pool, each actor loading the model once.

Used by evaluation and scoring alike. Decoding (CPU tasks) and the model (actors, on GPUs where
there are any) are separate stages, so that a GPU is fed by every CPU of the cluster. Every input row comes out with one probability per label
and an ``error`` column: an image that cannot be decoded gets NaN probabilities and the reason,
never a missing row.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from medray.evaluation import calibration
from medray.io import images
from medray.training import checkpoint
from medray.training.losses import head_size, probabilities
from medray.training.models import to_input

DECODE_BATCH = 32  # rows per decoding task: small enough to spread over every CPU


FACT_COLUMNS = ("width", "height", "bit_depth", "mean_intensity", "modality", "view", "site")


def _load(source, uri: str, size: int, channels: int, encoded: bool):
    """(pixels, ``images.Facts``), or the reason there are none: ingest's rule (``images.attempt``), so one
    odd file never fails the batch."""
    if encoded:
        return images.attempt(uri, images.decode_with_facts, source, uri, size, channels)
    return images.attempt(uri, images.load_with_facts, str(source), size, channels)


def decode_batch(batch: dict, size: int, channels: int, encoded: str | None = None, facts: bool = False) -> dict:
    """Ray Data UDF (CPU tasks): each row's image, decoded and resized, in ``pixels``; ``error`` says
    why a row has none. ``encoded`` names a column of image bytes to decode instead of the files.
    ``facts`` adds the ``FACT_COLUMNS`` (``images.Facts``: size, bit depth, mean intensity, DICOM codes)
    that drift monitoring keeps; off by default, as a manifest's own ``view`` and ``site`` pass through."""
    n = len(batch["image"])
    pixels = np.zeros((n, size, size) if channels == 1 else (n, size, size, channels), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    found: list[images.Facts | None] = [None] * n
    sources = batch[encoded] if encoded else batch["image"]
    for i, source in enumerate(sources):
        result = _load(source, "encoded image" if encoded else str(source), size, channels, bool(encoded))
        if isinstance(result, str):
            errors[i] = result
        else:
            pixels[i], found[i] = result
    out = {k: v for k, v in batch.items() if k != encoded}
    if facts:
        out.update(_fact_columns(found))
    return {**out, "pixels": pixels, "error": errors}


def _fact_columns(found: list) -> dict:
    """One array per fact; a row without an image has 0 sizes, a NaN mean and empty codes."""
    empty = images.Facts(0, 0, 0, float("nan"))
    rows = [f or empty for f in found]
    columns = {name: np.array([getattr(f, name) for f in rows], dtype=object) for name in ("modality", "view", "site")}
    columns |= {name: np.array([getattr(f, name) for f in rows], dtype=np.int32) for name in ("width", "height", "bit_depth")}
    columns["mean_intensity"] = np.array([f.mean_intensity for f in rows], dtype=np.float32)
    return {name: columns[name] for name in FACT_COLUMNS}


class Predictor:
    """The model, loaded once per actor (on its GPU when it has one), turning decoded pixels into probabilities."""

    def __init__(self, checkpoint_uri: str, calibrated: bool = True):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.meta = checkpoint.load_model(checkpoint_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last if self.device.type == "cuda" else torch.preserve_format)
        self.labels = self.meta["labels"]
        # The checkpoint's calibration.json (see medray.evaluation.calibration); evaluation reads raw outputs to fit it.
        outputs = head_size(self.meta["task"], len(self.labels))
        self.calibration = calibration.load(checkpoint_uri, self.meta["task"], outputs) if calibrated else None

    def __call__(self, batch: dict) -> dict:
        pixels, errors = batch.pop("pixels"), batch["error"]
        n = len(errors)
        ok = errors == ""
        probs = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        if ok.any():
            x = to_input(torch.from_numpy(np.ascontiguousarray(pixels[ok])), self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(x).float()
            if self.calibration is not None:  # a few numbers per image: on the CPU, where its maps live
                probs[ok] = self.calibration.from_logits(logits.cpu().numpy())
            else:
                probs[ok] = probabilities(self.meta["task"], logits).cpu().numpy()
        batch.update({f"prob_{label}": probs[:, j] for j, label in enumerate(self.labels)})
        batch["model_sha256"] = np.full(n, self.meta["sha256"], dtype=object)  # which model made each score
        return batch


def predict(
    ds: ray.data.Dataset,
    checkpoint_uri: str,
    batch_size: int = 64,
    actors: int = 1,
    calibrated: bool = True,
    cpus: float = 1.0,
    encoded: str | None = None,
    facts: bool = False,
) -> ray.data.Dataset:
    """``ds`` must have an ``image`` column of URIs (or ``encoded``, a column of image bytes); other
    columns pass through, and ``error`` and one ``prob_<label>`` per label are added.

    Decoding runs in Ray Data tasks on every free CPU, the model in ``actors`` actors (one GPU each
    when the cluster has GPUs, else ``cpus`` CPUs each for torch's threads) taking ``batch_size`` images
    at a time: the model never waits for one actor's own decoding. ``calibrated`` applies the
    checkpoint's calibration where it has one; ``facts`` adds ``decode_batch``'s input facts."""
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    total = ray.cluster_resources().get("CPU", 0)
    if not use_gpu and actors * cpus >= total:
        raise ValueError(
            f"{actors} scoring actors × {cpus} CPUs take every CPU of the cluster ({total:g}), leaving none to "
            "decode images: lower score.actors or score.cpus_per_actor"
        )
    meta = checkpoint.read_meta(checkpoint_uri)
    checkpoint.check_image_model(checkpoint_uri, meta)
    decode = {"size": meta["image_size"], "channels": meta["in_channels"], "encoded": encoded, "facts": facts}
    return ds.map_batches(decode_batch, fn_kwargs=decode, batch_size=DECODE_BATCH).map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "calibrated": calibrated},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else cpus,
    )


def prob_columns(labels: list[str]) -> list[str]:
    return [f"prob_{label}" for label in labels]
