"""A look at the augmentation before training with it: a few training images, each as decoded for
training and beside several draws of the configured policy (``medray augment-preview``; the report's
data section shows the same grid). A policy that flips a chest film or turns a fundus photo's colours
is seen here before it costs a training run. A whole-slide run (``wsi.patches`` set) shows training
patches from the extracted shards, so that the stain jitter of ``histo`` is seen on real patches.
The title lists the policy's parameters that are switched on.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from medray.config import JobConfig
from medray.data.manifest import read_manifest
from medray.data.patches import decode_patches, shard_uris
from medray.errors import DataError
from medray.io import images, storage
from medray.io.figures import plt, png
from medray.training.augment import augment_batch, resolve


def preview(config: JobConfig, count: int = 4, draws: int = 5) -> bytes:
    """PNG: ``count`` training images (drawn with ``train.seed``) in rows, the original first, then ``draws``
    augmented versions at ``data.image_size`` with ``data.in_channels`` channels. Unreadable images are passed over."""
    d, channels = config.data, config.model.in_channels
    originals = _training_patches(config, count) if config.wsi.patches else _training_images(config, count)
    stack = np.stack([image for image in originals for _ in range(draws)])
    augmented = augment_batch(stack, d.augment, d.augment_params, seed=config.train.seed).reshape(len(originals), draws, *stack.shape[1:])
    fig, axes = plt.subplots(len(originals), draws + 1, figsize=(1.7 * (draws + 1), 1.8 * len(originals)), squeeze=False)
    cmap = "gray" if channels == 1 else None
    for row, (original, variants) in enumerate(zip(originals, augmented)):
        for col, image in enumerate([original, *variants]):
            ax = axes[row, col]
            ax.imshow(image, cmap=cmap, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("original" if col == 0 else f"draw {col}", fontsize=8)
    switched_on = "  ".join(f"{key}={value:g}" for key, value in resolve(d.augment, d.augment_params).items() if value)
    fig.suptitle(f"augmentation policy '{d.augment}' at {d.image_size} px\n{switched_on or 'identity'}", fontsize=9)
    return png(fig)


def _training_images(config: JobConfig, count: int) -> list[np.ndarray]:
    manifest = read_manifest(config.manifest)
    frame = manifest.split("train") if "split" in manifest.frame else manifest.frame
    if len(frame) == 0:
        raise DataError(f"{config.manifest}: no training images to preview")
    chosen = frame.sample(frac=1.0, random_state=config.train.seed)["image"]
    originals = []
    for uri in chosen:
        try:
            originals.append(images.load(uri, config.data.image_size, config.model.in_channels))
        except images.ImageError:
            continue  # the quarantine and the audit speak of unreadable images; a preview shows readable ones
        if len(originals) == count:
            break
    if not originals:
        raise DataError(f"{config.manifest}: none of the training images could be decoded")
    return originals


def _training_patches(config: JobConfig, count: int) -> list[np.ndarray]:
    """Training patches from shards drawn in a seeded order, reading only as many shards as it takes."""
    patches = config.wsi.patches
    shards = shard_uris(patches)
    rng = np.random.default_rng(config.train.seed)
    originals: list[np.ndarray] = []
    for i in rng.permutation(len(shards)):
        frame = pd.read_parquet(io.BytesIO(storage.read_bytes(shards[i])), columns=["patch", "split"])
        train = frame.loc[frame["split"] == "train", "patch"].sample(frac=1.0, random_state=config.train.seed)
        pixels, bad = decode_patches(train.tolist()[: count - len(originals)], config.data.image_size, config.model.in_channels)
        originals.extend(pixels[~bad])
        if len(originals) == count:
            break
    if not originals:
        raise DataError(f"{patches}: no readable training patches to preview; run `medray extract-patches` first")
    return originals
