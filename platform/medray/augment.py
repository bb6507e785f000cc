"""Augmentation policies by modality, built from torchvision's v2 transforms.

``cxr``: small rotations, shifts and zooms, brightness and contrast — what changes between two
exposures of the same chest. Never a left-right flip: the heart sits on the patient's left, and a
mirrored film shows dextrocardia, a different diagnosis; laterality markers would lie too.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchvision.transforms import v2

POLICIES = ("cxr", "none")


@functools.cache
def policy(name: str) -> v2.Transform:
    if name == "cxr":
        return v2.Compose(
            [
                v2.RandomAffine(degrees=7, translate=(0.06, 0.06), scale=(0.92, 1.08)),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        )
    if name == "none":
        return v2.Identity()
    raise ValueError(f"unknown augmentation policy {name!r}; known: {', '.join(POLICIES)}")


def augment_batch(pixels: np.ndarray, name: str) -> np.ndarray:
    """``(B, H, W)`` uint8 → the same shape, each image with its own random draw."""
    transform = policy(name)
    out = np.empty_like(pixels)
    for i, image in enumerate(torch.from_numpy(np.ascontiguousarray(pixels))):
        out[i] = transform(image.unsqueeze(0)).squeeze(0).numpy()
    return out
