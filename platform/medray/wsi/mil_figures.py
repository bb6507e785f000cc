"""Attention heatmaps of attention-MIL over each test slide's thumbnail (drawn by ``slide_eval.heatmap``).

The thumbnails are the ones ``extract-patches`` saved (``thumbs/<slide key>.jpg``, scale in
``slides.parquet``'s ``thumb_downsample``), found in the patch folder the store was embedded from.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from medray.config import JobConfig
from medray.evaluation.report import Figure
from medray.io import storage
from medray.io.figures import plt, png
from medray.wsi.extract import read_thumbnail
from medray.wsi.slide_eval import heatmap

PER_PAGE, MAX_PAGES = 12, 4


def patch_folder(config: JobConfig) -> str | None:
    """The extract-patches folder behind the store (``embed.input``, else ``wsi.patches``), if it has ``slides.parquet``."""
    for uri in (config.embed.input, config.wsi.patches):
        if uri and storage.exists(storage.join(uri, "slides.parquet")):
            return uri
    return None


def _outline_tumour(ax, patches: pd.DataFrame, downsample: float, threshold: float) -> None:
    for x, y, size in patches.loc[patches["tumour_fraction"] >= threshold, ["x", "y", "size"]].itertuples(index=False):
        ax.add_patch(
            Rectangle((x / downsample - 0.5, y / downsample - 0.5), size / downsample, size / downsample, fill=False, lw=0.6, ec="black")
        )


def _page(panels: list[tuple], label: str, threshold: float, title: str) -> bytes:
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    shown = None
    for ax, (thumb, downsample, slide_patches, heading) in zip(axes.flat, panels):
        shown = heatmap(thumb, downsample, slide_patches, f"attention_scaled_{label}", ax)
        if slide_patches["tumour_fraction"].notna().any():
            _outline_tumour(ax, slide_patches, downsample, threshold)
        ax.set_title(heading, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.6, label=f"attention for {label} (÷ the bag's largest)")
    fig.suptitle(title)
    return png(fig)


def heatmap_pages(
    test: pd.DataFrame, patches: pd.DataFrame, looks: pd.DataFrame, folder: str, label: str, threshold: float, level: str = "slide"
) -> list[Figure]:
    """One panel per test slide (pages of ``PER_PAGE``, at most ``MAX_PAGES``), titled with its slide id, its
    bag's label and probability and, when annotated, its attention AUROC; slides without a thumbnail are left out."""
    slides = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(folder, "slides.parquet"))))
    scale = slides.set_index("image")["thumb_downsample"].dropna().astype(float).to_dict()
    bag_of = test.set_index("key")
    key_column = "image" if level == "slide" else "patient_id"  # what a bag's key is
    auc = looks.set_index("image")["attention_auroc"].to_dict() if len(looks) else {}
    panels = []
    for (image, slide_id), slide_patches in patches.groupby(["image", "slide_id"], sort=True):
        thumb = read_thumbnail(folder, image) if image in scale else None
        if thumb is None:
            continue
        bag = bag_of.loc[slide_patches[key_column].iloc[0]]
        truth = "?" if pd.isna(bag[label]) else int(bag[label])
        heading = f"{slide_id}  {label}={truth}  P {bag[f'prob_{label}']:.2f}"
        if not pd.isna(auc.get(image, np.nan)):
            heading += f"\nattention AUROC {auc[image]:.2f}"
        panels.append((thumb, scale[image], slide_patches, heading))
    total = len(panels)
    panels = panels[: PER_PAGE * MAX_PAGES]
    figures = []
    for page, start in enumerate(range(0, len(panels), PER_PAGE), 1):
        title = f"Attention over the test slides ({start + 1}–{min(start + PER_PAGE, len(panels))} of {total})"
        name = f"attention_{page}.png"
        figures.append(Figure(name, _page(panels[start : start + PER_PAGE], label, threshold, title), title))
    return figures
