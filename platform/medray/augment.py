"""Augmentation policies by modality, built from torchvision's v2 transforms.

Each policy makes only changes that keep an image's labels true.

``cxr`` (chest X-ray): small rotations, shifts and zooms, brightness and contrast — what changes
between two exposures of the same chest. Never a left-right flip: the heart sits on the patient's
left, and a mirrored film shows dextrocardia, a different diagnosis; laterality markers would lie too.
That is why ``cxr`` has no ``hflip`` parameter to switch on.

``derm`` (dermoscopy): any rotation and both flips, since a skin lesion has no canonical
orientation, and colour jitter with hue and saturation kept small because colour is itself a
diagnostic sign (blue-white veil, red vessels).

``fundus`` (retinal photographs): rotation, flips, brightness and contrast. A horizontal flip makes a
right eye look like a left one (the optic disc changes side): harmless for grading tasks such as
diabetic retinopathy, but laterality labels, or labels tied to one side of the retina, need
``hflip=0`` and ``vflip=0``.

``histo`` (histopathology patches): quarter turns and flips (a patch under the microscope can lie in
any of its eight orientations), random crops resized back to the input size, and hue/saturation
jitter standing in for the stain differences between labs (a cheap stand-in for HED stain jitter).

``none``: the identity.

Parameters (``POLICIES`` has each policy's own, with defaults; 0 switches a transform off):
``degrees`` largest rotation either way; ``translate`` largest shift, as a fraction of the side;
``scale`` largest zoom in or out, as a fraction; ``hflip``/``vflip`` flip probabilities; ``rot90``
probability of a quarter turn (square images only: a turn would swap height and width); ``crop``
largest fraction of each side a crop cuts away; ``brightness``/``contrast``/``saturation``/``hue`` as
in ``ColorJitter`` (hue and saturation leave grayscale images alone).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

POLICIES: dict[str, dict[str, float]] = {
    "cxr": {"degrees": 7, "translate": 0.06, "scale": 0.08, "brightness": 0.2, "contrast": 0.2},
    "derm": {
        "hflip": 0.5, "vflip": 0.5, "degrees": 180,
        "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.03,
    },
    "fundus": {"hflip": 0.5, "vflip": 0.5, "degrees": 30, "brightness": 0.2, "contrast": 0.2},
    "histo": {
        "rot90": 0.5, "hflip": 0.5, "vflip": 0.5, "crop": 0.15,
        "brightness": 0.1, "contrast": 0.1, "saturation": 0.2, "hue": 0.04,
    },
    "none": {},
}


class _RandomQuarterTurn(v2.Transform):
    """With flips at 0.5 each, a quarter turn at 0.5 makes all eight orientations equally likely."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"rot90 must be a probability in [0, 1], got {p}")
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"turn": height == width and torch.rand(()).item() < self.p}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return torch.rot90(inpt, 1, dims=(-2, -1)) if params["turn"] else inpt


class _RandomCropResizedBack(v2.Transform):
    # Height and width lose the same fraction so that cells keep their shape; RandomResizedCrop
    # would distort the aspect and needs the output size up front.
    def __init__(self, crop: float):
        super().__init__()
        if not 0 <= crop < 1:
            raise ValueError(f"crop must be in [0, 1), got {crop}")
        self.crop = crop

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        keep = 1 - self.crop * torch.rand(()).item()
        h, w = max(1, round(height * keep)), max(1, round(width * keep))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w, "size": [height, width]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resized_crop(inpt, **params, antialias=True)


def policy(name: str, params: dict[str, float] | None = None) -> v2.Transform:
    """The transform for policy ``name``, with ``params`` overriding its defaults by name."""
    if name not in POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; known: {', '.join(POLICIES)}")
    defaults = POLICIES[name]
    merged = dict(defaults)
    for key, value in (params or {}).items():
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise ValueError(f"unknown parameter {key!r} for augmentation policy {name!r}; valid: {valid}")
        try:
            merged[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"augmentation parameter {key!r} must be a number, got {value!r}") from None
    return _build(tuple(sorted(merged.items())))  # a hashable cache key


@functools.cache
def _build(params: tuple[tuple[str, float], ...]) -> v2.Transform:
    p = dict(params)
    steps: list[v2.Transform] = []
    if p.get("rot90"):
        steps.append(_RandomQuarterTurn(p["rot90"]))
    if p.get("hflip"):
        steps.append(v2.RandomHorizontalFlip(p["hflip"]))
    if p.get("vflip"):
        steps.append(v2.RandomVerticalFlip(p["vflip"]))
    if p.get("crop"):
        steps.append(_RandomCropResizedBack(p["crop"]))
    degrees, translate, scale = p.get("degrees", 0), p.get("translate", 0), p.get("scale", 0)
    if degrees or translate or scale:
        steps.append(
            v2.RandomAffine(
                degrees=degrees,
                translate=(translate, translate) if translate else None,
                scale=(1 - scale, 1 + scale) if scale else None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    jitter = {key: p[key] for key in ("brightness", "contrast", "saturation", "hue") if p.get(key)}
    if jitter:
        steps.append(v2.ColorJitter(**jitter))
    # Steps left out rather than run at 0, so that all-zero parameters give exactly the input back.
    return v2.Compose(steps) if steps else v2.Identity()


def augment_batch(pixels: np.ndarray, name: str, params: dict[str, float] | None = None) -> np.ndarray:
    """``(B, H, W)`` grayscale or ``(B, H, W, 3)`` RGB uint8 → the same shape and dtype, each image
    with its own random draw."""
    gray = pixels.ndim == 3
    if pixels.dtype != np.uint8 or not (gray or (pixels.ndim == 4 and pixels.shape[-1] == 3)):
        raise ValueError(f"expected uint8 (B, H, W) or (B, H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    transform = policy(name, params)
    images = torch.from_numpy(np.ascontiguousarray(pixels))
    images = images.unsqueeze(1) if gray else images.permute(0, 3, 1, 2)
    out = torch.stack([transform(image) for image in images])
    out = out.squeeze(1) if gray else out.permute(0, 2, 3, 1)
    return np.ascontiguousarray(out.numpy())
