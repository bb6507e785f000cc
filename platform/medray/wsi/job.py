"""The ``extract-patches`` job: slide manifest → patient-level split → patches, from one validated config.

The split comes before extraction, per patient, so that every patch of a slide — and every slide of
a patient — lands on one side; a manifest that already has a ``split`` column keeps it.
"""

from __future__ import annotations

from medray.config import JobConfig
from medray.data.manifest import Manifest, write_manifest
from medray.data.splits import assert_patient_disjoint, split_by_patient, summary
from medray.io import storage
from medray.wsi.extract import ExtractResult, ExtractSpec, extract_patches
from medray.wsi.grid import GridSpec
from medray.wsi.manifest import read_slide_manifest
from medray.wsi.stain import fit_stain


def spec_from_config(config: JobConfig) -> ExtractSpec:
    w = config.wsi
    grid = GridSpec(w.target_mpp, w.patch_size, w.stride, w.min_tissue, w.max_patches, w.cap_by, config.split.seed)
    return ExtractSpec(
        grid, w.labels_from, w.tumour_label, w.tumour_threshold, w.thumbnail_side, w.min_region_um2,
        w.default_mpp, w.chunk_patches, int(w.cache_gb * 2**30), fit_stain(w.stain_normalise, w.stain_reference),
    )  # fmt: skip


def patches_uri(config: JobConfig) -> str:
    return config.wsi.patches or storage.join(config.run_dir, "patches")


def split_slides(config: JobConfig) -> Manifest:
    """The slide manifest with a patient-level ``split`` column (made here unless it has one)."""
    if not config.wsi.slides:
        raise ValueError("wsi.slides: set the slide manifest (CSV or Parquet), e.g. --set wsi.slides=slides/slides.csv")
    manifest = read_slide_manifest(config.wsi.slides)
    frame = manifest.frame
    if "split" not in frame or frame["split"].isna().any():
        s = config.split
        frame = split_by_patient(manifest, s.val, s.test, s.min_positive, s.label, s.seed, s.train_keeps_positive)
    assert_patient_disjoint(frame)
    return Manifest(frame, manifest.labels, manifest.task)


def extract_job(config: JobConfig, progress: bool = True) -> tuple[ExtractResult, Manifest]:
    spec = spec_from_config(config)  # first: a stain reference that cannot be used stops the job before anything is written
    manifest = split_slides(config)
    out = patches_uri(config)
    write_manifest(manifest, storage.join(out, "slide_manifest.parquet"))
    print(summary(manifest.frame, manifest.labels).rename(columns={"images": "slides"}).round(3).to_string())
    return extract_patches(manifest, out, spec, progress), manifest
