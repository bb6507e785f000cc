"""Grad-CAM: where in the image the model looked for a label (MONAI's ``GradCAM``).

``overlays(checkpoint, images, label)`` gives heat maps over the images as PNG bytes, and
``write_overlays`` writes them as files — the one function the report's error gallery, ``medray
explain`` and batch scoring call. The target layer is the backbone's last feature stage (from the
backbone table in ``models.py``), where the maps are coarse but class-specific.

A Grad-CAM map shows what raised this output's logit, not why the finding is there: it is a check
for shortcuts (a marker, a necklace, the text on a film), not an explanation a clinician should trust.
"""

from __future__ import annotations

import hashlib
import io
import posixpath

import numpy as np
import torch
from PIL import Image

from medray.io import images, storage
from medray.training import checkpoint
from medray.training.models import Classifier, to_input


def target_layer(model: Classifier) -> str:
    """The last module of the backbone's last feature stage (the head's own norm layers excluded)."""
    last = [path for path in model.spec.stages[-1] if not path.startswith(model.spec.head.split(".")[0] + ".")]
    return "backbone." + (last or list(model.spec.stages[-1]))[-1]


def output_index(task: str, labels: list[str], label: str) -> int:
    """The model output whose logit stands for ``label`` (ordinal: the output "grade ≥ label")."""
    if label not in labels:
        raise ValueError(f"unknown label {label!r}; the model's labels are {labels}")
    index = labels.index(label)
    return max(index - 1, 0) if task == "ordinal" else index


class Explainer:
    """A model loaded once, giving Grad-CAM maps for batches of images."""

    def __init__(self, checkpoint_uri: str):
        # Importing MONAI takes seconds: only pay for it when used.
        from monai.visualize import GradCAM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.meta = checkpoint.load_model(checkpoint_uri)
        self.model = model.to(self.device)
        self.cam = GradCAM(nn_module=self.model, target_layers=target_layer(self.model))

    def load(self, uri: str) -> np.ndarray:
        return images.load(uri, self.meta["image_size"], self.meta["in_channels"])

    def heatmaps(self, pixels: np.ndarray, label: str) -> np.ndarray:
        """uint8 images ``(B, H, W[, C])`` → maps ``(B, H, W)`` in [0, 1]."""
        index = output_index(self.meta["task"], self.meta["labels"], label)
        x = to_input(torch.from_numpy(np.ascontiguousarray(pixels)), self.device)
        with torch.enable_grad():
            maps = self.cam(x, class_idx=index)
        return maps[:, 0].detach().cpu().numpy()


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """The image in gray with the heat map in a jet colour scale on top, as PNG bytes."""
    from matplotlib import colormaps

    gray = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255
    mixed = ((1 - alpha) * gray + alpha * heat).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(mixed).save(buffer, format="PNG")
    return buffer.getvalue()


def overlays(checkpoint_uri: str, image_uris: list[str], label: str, explainer: Explainer | None = None) -> list[bytes]:
    """Grad-CAM overlays of ``label`` on each image, as PNG bytes, in the order given."""
    explainer = explainer or Explainer(checkpoint_uri)
    if not image_uris:
        return []
    pixels = np.stack([explainer.load(uri) for uri in image_uris])
    return [overlay(p, m) for p, m in zip(pixels, explainer.heatmaps(pixels, label))]


def overlay_name(image_uri: str, label: str) -> str:
    """``<image stem>.<8 hex digits>.gradcam.<label>.png``: the digits (of the image's full URI) keep
    same-named images of different folders (``a/1.png``, ``b/1.png``) from overwriting each other."""
    stem = posixpath.splitext(posixpath.basename(str(image_uri)))[0]
    return f"{stem}.{hashlib.sha256(str(image_uri).encode()).hexdigest()[:8]}.gradcam.{label}.png"


def write_overlays(checkpoint_uri: str, image_uris: list[str], out_dir: str, labels: list[str] | None = None) -> list[str]:
    """``<out_dir>/<overlay_name>`` for each image and label (default: all the model's labels);
    returns the written URIs. Usable locally and with ``s3://``."""
    explainer = Explainer(checkpoint_uri)
    written = []
    if not image_uris:
        return written
    pixels = np.stack([explainer.load(uri) for uri in image_uris])  # decoded once, explained per label
    for label in labels or explainer.meta["labels"]:
        for uri, image, heat in zip(image_uris, pixels, explainer.heatmaps(pixels, label)):
            target = storage.join(out_dir, overlay_name(uri, label))
            storage.write_bytes(target, overlay(image, heat))
            written.append(target)
    return written
