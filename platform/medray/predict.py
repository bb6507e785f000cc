"""Batch inference on Ray Data: an actor pool, each actor loading the model once.

Used by evaluation and scoring alike. Every input row comes out with one probability per label
and an ``error`` column: an image that cannot be decoded gets NaN probabilities and the reason,
never a missing row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from medray import checkpoint, images
from medray.calibration import load_temperature
from medray.losses import head_size, probabilities
from medray.models import to_input


class Predictor:
    def __init__(self, checkpoint_uri: str, calibrated: bool = True, decode_threads: int = 1, encoded: str | None = None):
        # ``encoded``: a column of encoded image bytes (e.g. whole-slide patches) to score instead of the
        # files the ``image`` column names; it is dropped from the output.
        self.encoded = encoded
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.meta = checkpoint.load_model(checkpoint_uri)
        if self.device.type == "cuda":
            model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model
        self.labels, self.size, self.channels = self.meta["labels"], self.meta["image_size"], self.meta["in_channels"]
        # The checkpoint's calibration.json (see medray.calibration); evaluation reads raw outputs to fit it.
        self.temperature = None
        temperature = load_temperature(checkpoint_uri) if calibrated else None
        if temperature is not None:
            outputs = head_size(self.meta["task"], len(self.labels))
            if len(temperature) != outputs:
                raise checkpoint.CheckpointError(f"{checkpoint_uri}: {len(temperature)} temperatures for {outputs} model outputs")
            self.temperature = torch.tensor(temperature, dtype=torch.float32, device=self.device)
        # Pillow releases the GIL while decoding and resizing, so threads keep a GPU actor fed.
        self.pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None

    def _load(self, source) -> np.ndarray | str:
        uri = "encoded image" if self.encoded else source
        try:
            if self.encoded:
                return images.decode(source, uri, self.size, self.channels)
            return images.load(str(uri), self.size, self.channels)
        except images.ImageError as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 — one odd file must not fail the batch; no content in its reason
            return f"{uri}: cannot be decoded ({err.__class__.__name__})"

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image"])
        shape = (n, self.size, self.size) if self.channels == 1 else (n, self.size, self.size, self.channels)
        pixels = np.zeros(shape, dtype=np.uint8)
        errors = np.full(n, "", dtype=object)
        sources = batch[self.encoded] if self.encoded else batch["image"]
        loaded = self.pool.map(self._load, sources) if self.pool else map(self._load, sources)
        for i, result in enumerate(loaded):
            if isinstance(result, str):
                errors[i] = result
            else:
                pixels[i] = result
        ok = errors == ""
        probs = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        if ok.any():
            x = to_input(torch.from_numpy(pixels[ok]), self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(x).float()
                if self.temperature is not None:
                    logits = logits / self.temperature
                probs[ok] = probabilities(self.meta["task"], logits).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != self.encoded}
        out.update({f"prob_{label}": probs[:, j] for j, label in enumerate(self.labels)})
        out["error"] = errors
        out["model_sha256"] = np.full(n, self.meta["sha256"], dtype=object)  # which model made each score
        return out


def predict(
    ds: ray.data.Dataset,
    checkpoint_uri: str,
    batch_size: int = 64,
    actors: int = 1,
    calibrated: bool = True,
    cpus: float = 1.0,
    encoded: str | None = None,
) -> ray.data.Dataset:
    """``ds`` must have an ``image`` column of URIs (or ``encoded``, a column of image bytes); other
    columns pass through. ``calibrated`` applies the checkpoint's temperatures where it has them; each
    actor decodes with one thread per CPU it is given."""
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "calibrated": calibrated, "decode_threads": max(1, int(cpus)),
                               "encoded": encoded},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus,
    )


def prob_columns(labels: list[str]) -> list[str]:
    return [f"prob_{label}" for label in labels]
