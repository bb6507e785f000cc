"""Patch extraction as a Ray Data job: slides → tissue mask and grid → chunks of patches → Parquet shards.

Two passes, both spread over the cluster. The first plans each slide in its own task (tissue mask on
a low-resolution level, patch grid, patch labels) and cuts the grid into chunks of ``chunk_patches``
coordinates. The second reads one chunk per task and writes it as one Parquet shard, so a task's
memory is one chunk of patches whatever the slide's size; the driver only ever holds counts.

Output under ``out``: ``patches/<slide key>/chunk-*.parquet`` (PNG patch, slide and patient ids,
split, level-0 coordinates, tissue and tumour shares, labels), ``tissue/<key>.png`` (mask overlay for
review), ``thumbs/<key>.png`` (for heatmaps), ``slides.parquet`` (one row per slide with its status),
``errors.parquet`` (slides that could not be used, each with its URI and reason) and
``done/<key>.json``, written last for each slide. A rerun skips slides with a done marker and clears
whatever a killed run left of the others, so no patch is ever written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from tqdm import tqdm

from medray.data.manifest import LABELS_KEY, TASK_KEY, Manifest
from medray.io import storage
from medray.wsi.grid import GridSpec, patch_grid, patch_labels
from medray.wsi.slides import SlideError, open_slide
from medray.wsi.stain import StainNormaliser, StainSpec
from medray.wsi.tissue import detect, overlay_png

log = logging.getLogger(__name__)
STATUS_DONE, STATUS_EMPTY, STATUS_ERROR = "done", "no tissue found", "error"


@dataclass(frozen=True)
class ExtractSpec:
    grid: GridSpec = field(default_factory=GridSpec)
    labels_from: str = "slide"  # or "annotation": the tumour label of annotated slides comes from their mask
    tumour_label: str | None = None
    tumour_threshold: float = 0.5
    thumbnail_side: int = 512
    min_region_um2: float = 20_000.0
    default_mpp: float | None = None
    chunk_patches: int = 64
    cache_bytes: int = 20 * 2**30
    stain: StainSpec = field(default_factory=StainSpec)  # fitted once per job (medray.wsi.stain.fit_stain)


@dataclass
class ExtractResult:
    out: str
    slides: int
    done: int
    skipped: int
    empty: int
    errors: int
    patches: int
    grid_cells: int  # every grid position over the slides extracted in this run, tissue or not
    stain_kept: int = 0  # patches stain normalisation was asked for but could not be fitted to (original pixels kept)

    @property
    def background_skipped(self) -> float:
        return 1 - self.patches / self.grid_cells if self.grid_cells else float("nan")


def slide_key(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def read_patch(slide, row, patch_size: int) -> np.ndarray:
    pixels = slide.read_region(row["x"], row["y"], row["level"], row["read_size"], row["read_size"])
    if pixels.shape[0] != patch_size:
        pixels = np.asarray(Image.fromarray(pixels).resize((patch_size, patch_size), Image.Resampling.BILINEAR, reducing_gap=2.0))
    return pixels


def _annotation(uri: str) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("L")) > 127
    except (OSError, FileNotFoundError) as err:
        raise SlideError(f"{uri}: annotation mask cannot be read ({err.__class__.__name__})") from None


def plan_slide(row: dict, labels: list[str], spec: ExtractSpec, out: str | None = None) -> tuple[pd.DataFrame, dict]:
    """One slide's patch grid with its labels, and facts about the slide; writes its overlay under ``out``."""
    key = slide_key(row["image"])
    with open_slide(row["image"], spec.default_mpp, spec.cache_bytes) as slide:
        tissue = detect(slide, spec.thumbnail_side, spec.min_region_um2)
        mask_uri = row.get("mask") or ""
        annotation = _annotation(mask_uri) if mask_uri and spec.labels_from == "annotation" else None
        grid = patch_grid(slide.pyramid, tissue.mask, tissue.downsample, spec.grid, annotation)
        width, height = slide.pyramid.dimensions[0]
        factor = spec.grid.target_mpp / slide.pyramid.mpp
        step = (spec.grid.stride or spec.grid.patch_size) * factor
        size = spec.grid.patch_size * factor
        cells = int(np.floor((width - size) / step + 1) * np.floor((height - size) / step + 1)) if min(width, height) >= size else 0
        info = {"key": key, "backend": slide.backend, "mpp": slide.pyramid.mpp, "width": width, "height": height,
                "tissue_fraction": tissue.fraction, "thumb_downsample": tissue.downsample, "grid_cells": cells}  # fmt: skip
    if out is not None:
        storage.write_bytes(storage.join(out, "tissue", f"{key}.png"), overlay_png(tissue))
        storage.write_bytes(storage.join(out, "thumbs", f"{key}.png"), png(tissue.thumbnail))
    tumour = spec.tumour_label or labels[0]
    slide_labels = {label: float(row[label]) for label in labels}
    grid = pd.concat(
        [grid, patch_labels(grid, slide_labels, tumour if spec.labels_from == "annotation" else None, spec.tumour_threshold)], axis=1
    )
    return grid, info


def _plan_batch(row: dict, labels: list[str], spec: ExtractSpec, out: str) -> dict:
    """One slide in, one row per chunk of its grid out (or one row saying why there is none)."""
    try:
        grid, info = plan_slide(row, labels, spec, out)
        error = STATUS_EMPTY if grid.empty else ""
    except SlideError as err:
        grid, info, error = pd.DataFrame(), {"key": slide_key(row["image"]), "grid_cells": 0}, str(err)
    except Exception as err:  # noqa: BLE001 — a corrupt slide can fail anywhere in a codec; it is reported, the job goes on
        grid, info, error = (
            pd.DataFrame(),
            {"key": slide_key(row["image"]), "grid_cells": 0},
            f"{row['image']}: {err.__class__.__name__}: {err}",
        )
    chunks = [grid.iloc[i : i + spec.chunk_patches] for i in range(0, len(grid), spec.chunk_patches)] or [grid]
    return {
        "image": [row["image"]] * len(chunks),
        "chunk": list(range(len(chunks))),
        "chunks": [0 if error else len(chunks)] * len(chunks),
        "coords": [c.to_json(orient="records") for c in chunks],
        "error": [error] * len(chunks),
        "info": [json.dumps(info)] * len(chunks),
    }


def _extract_batch(row: dict, slide_rows: dict, labels: list[str], spec: ExtractSpec, out: str) -> dict:
    """Read one chunk of patches and write it as one Parquet shard; return its count (or its error)."""
    uri, chunk = str(row["image"]), int(row["chunk"])
    meta = slide_rows[uri]
    grid = pd.read_json(io.StringIO(str(row["coords"])), orient="records")
    normalise = StainNormaliser(spec.stain)
    try:
        with open_slide(uri, spec.default_mpp, spec.cache_bytes) as slide:
            read = [normalise(read_patch(slide, r, spec.grid.patch_size)) for r in grid.to_dict("records")]
    except SlideError as err:
        return {"image": [uri], "chunk": [chunk], "patches": [0], "error": [str(err)], "stain_kept": [0]}
    except Exception as err:  # noqa: BLE001 — a bad tile can fail anywhere in a codec
        return {"image": [uri], "chunk": [chunk], "patches": [0], "error": [f"{uri}: {err.__class__.__name__}: {err}"], "stain_kept": [0]}
    normalised = np.array([done for _, done in read], dtype=bool)
    frame = pd.DataFrame(
        {
            "image": uri,
            "slide_id": meta["slide_id"],
            "patient_id": meta["patient_id"],
            "split": meta.get("split") or "",
            **{c: grid[c].to_numpy() for c in ("x", "y", "level", "size", "tissue")},
            "tumour_fraction": grid["tumour_fraction"].to_numpy(dtype=np.float32),
            **{label: grid[label].to_numpy(dtype=np.float32) for label in labels},
            "stain_normalised": normalised,
            "patch": [png(pixels) for pixels, _ in read],
        }
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({LABELS_KEY: json.dumps(labels).encode(), TASK_KEY: b"multi-label"})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(out, "patches", slide_key(uri), f"chunk-{chunk:05d}.parquet"), buffer.getvalue())
    kept = int((~normalised).sum()) if normalise.active else 0
    return {"image": [uri], "chunk": [chunk], "patches": [len(frame)], "error": [""], "stain_kept": [kept]}


def _each(rows: list[dict], fn, **kwargs) -> ray.data.Dataset:
    """``fn(row, **kwargs)`` over ``rows``, one task per row (per slide when planning, per chunk when
    reading), spread over every CPU. The rows travel once, as an argument in the object store; the
    dataset itself is only their indices (``from_pandas`` of many one-row frames costs seconds)."""
    return ray.data.range(len(rows), override_num_blocks=len(rows)).map_batches(
        _apply, batch_size=1, fn_kwargs={"rows": rows, "fn": fn, "kwargs": kwargs}
    )


def _apply(batch: dict, rows: list[dict], fn, kwargs: dict) -> dict:
    return fn(rows[int(batch["id"][0])], **kwargs)


def _clear(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass  # nothing left behind


def _write_parquet(frame: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(uri, buffer.getvalue())


def done_marker(out: str, uri: str) -> str:
    return storage.join(out, "done", f"{slide_key(uri)}.json")


def extract_patches(manifest: Manifest, out: str, spec: ExtractSpec | None = None, progress: bool = True) -> ExtractResult:
    """Extract the patches of every slide in ``manifest`` (one row per slide) into ``out``; resumable."""
    spec = spec or ExtractSpec()
    labels, frame = manifest.labels, manifest.frame.reset_index(drop=True)
    if "slide_id" not in frame:
        frame["slide_id"] = [slide_key(u) for u in frame["image"]]
    if "mask" not in frame:
        frame["mask"] = ""
    frame["mask"] = frame["mask"].fillna("")
    frame["key"] = [slide_key(u) for u in frame["image"]]
    done = frame["image"].map(lambda u: storage.exists(done_marker(out, u)))
    todo = frame[~done].reset_index(drop=True)
    log.info("%d slides: %d already extracted, %d to do", len(frame), int(done.sum()), len(todo))
    for uri in todo["image"]:
        _clear(storage.join(out, "patches", slide_key(uri)))  # what a killed run left of this slide

    columns = ["image", "mask", *labels]
    plans = (
        _each(todo[columns].to_dict("records"), _plan_batch, labels=labels, spec=spec, out=out).to_pandas()
        if len(todo)
        else pd.DataFrame(columns=["image", "chunk", "chunks", "coords", "error", "info"])
    )
    slide_error = plans.groupby("image")["error"].first().to_dict()
    info = {uri: json.loads(i) for uri, i in plans.groupby("image")["info"].first().items()}
    expected = plans.groupby("image")["chunks"].first().to_dict()
    work = plans[plans["error"] == ""]
    meta = todo.set_index("image")[[c for c in ("slide_id", "patient_id", "split") if c in todo]].to_dict("index")

    written: dict[str, int] = {uri: 0 for uri in todo["image"]}
    stain_kept = 0
    chunks_ok: dict[str, int] = {uri: 0 for uri in todo["image"]}
    if len(work):
        kwargs = {"slide_rows": meta, "labels": labels, "spec": spec, "out": out}
        results = _each(work[["image", "chunk", "coords"]].to_dict("records"), _extract_batch, **kwargs)
        bar = tqdm(total=int(work["coords"].map(lambda c: len(json.loads(c))).sum()), unit="patch", desc="extracting", disable=None if progress else True)
        for r in results.iter_rows():
            uri = r["image"]
            if r["error"]:
                slide_error[uri] = slide_error.get(uri) or r["error"]
                continue
            written[uri] += int(r["patches"])
            stain_kept += int(r["stain_kept"])
            chunks_ok[uri] += 1
            bar.update(int(r["patches"]))
            if chunks_ok[uri] == expected[uri] and not slide_error.get(uri):
                # Written last: a slide counts as done only once every one of its shards is on storage.
                storage.write_text(done_marker(out, uri), json.dumps({"patches": written[uri], **info[uri]}))
        bar.close()

    rows, errors = [], []
    for uri in todo["image"]:
        error = slide_error.get(uri, "")
        if error == STATUS_EMPTY:
            log.warning("no tissue found on a slide: %s", uri)
            storage.write_text(done_marker(out, uri), json.dumps({"patches": 0, **info[uri]}))
            status = STATUS_EMPTY
        elif error:
            log.warning("slide not extracted: %s", error)
            _clear(storage.join(out, "patches", slide_key(uri)))  # no half slide reaches training
            errors.append({"image": uri, "reason": error})
            status = STATUS_ERROR
        else:
            status = STATUS_DONE
        rows.append({"image": uri, "status": status, "patches": written[uri], "reason": error})
    _record(out, frame, rows, errors, labels, spec)
    statuses = pd.Series([r["status"] for r in rows], dtype=object)
    return ExtractResult(
        out=out,
        slides=len(frame),
        done=int((statuses == STATUS_DONE).sum()),
        skipped=int(done.sum()),
        empty=int((statuses == STATUS_EMPTY).sum()),
        errors=len(errors),
        patches=sum(written.values()),
        grid_cells=sum(i.get("grid_cells", 0) for uri, i in info.items() if not slide_error.get(uri)),
        stain_kept=stain_kept,
    )


def _record(out: str, frame: pd.DataFrame, rows: list[dict], errors: list[dict], labels: list[str], spec: ExtractSpec) -> None:
    """``slides.parquet`` (every slide, this run's and earlier runs'), ``errors.parquet`` and ``extract.json``."""
    status = pd.DataFrame(rows, columns=["image", "status", "patches", "reason"]).set_index("image")
    slides = frame.copy()
    for column in ("status", "patches", "reason", "thumb_downsample"):
        slides[column] = None
    for i, uri in enumerate(slides["image"]):
        if uri in status.index:
            slides.loc[i, ["status", "patches", "reason"]] = status.loc[uri].tolist()
        marker = done_marker(out, uri)
        if storage.exists(marker):
            facts = json.loads(storage.read_text(marker))
            slides.loc[i, "thumb_downsample"] = facts.get("thumb_downsample")
            if uri not in status.index:
                slides.loc[i, ["status", "patches", "reason"]] = [STATUS_DONE if facts["patches"] else STATUS_EMPTY, facts["patches"], ""]
    _write_parquet(slides, storage.join(out, "slides.parquet"))
    _write_parquet(pd.DataFrame(errors, columns=["image", "reason"]), storage.join(out, "errors.parquet"))
    spec_json = {"labels": labels, **asdict(spec)}
    storage.write_text(storage.join(out, "extract.json"), json.dumps(spec_json, indent=2))
