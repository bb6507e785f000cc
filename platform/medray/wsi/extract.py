"""Patch extraction in one streaming pass over the cluster: slides → tissue mask and grid → chunks of patches → Parquet shards.

Each slide gets a Ray task that plans it (tissue mask on a low-resolution level, patch grid, patch
labels), reads and writes its first chunk of ``chunk_patches`` patches, and hands the rest of its grid
back (a few bytes a patch); each further chunk is read by a task of its own. A slide of one chunk — most
slides at low magnification — is thus a single task, a large slide spreads over the cluster, reading
starts with the first slide planned rather than after the last, and a task's memory is one chunk of
patches whatever the slide's size. The driver keeps twice as many tasks in flight as the cluster has CPUs,
a waiting chunk before any new slide, so neither its memory nor Ray's queue grows with the archive.

Why plain Ray tasks and not Ray Data here (measured with ``benchmarks/wsi_extract.py``,
docs/benchmarks.md): a slide is one row that fans out into a data-dependent number of chunks, and a Ray
Data pass costs tens of ms per task and a barrier between planning and reading, which on the 12 default
slides made the job slower than a plain loop; a Ray task costs a few ms.

Output under ``out``: ``patches/<slide key>/chunk-*.parquet`` (PNG patch, slide and patient ids,
split, level-0 coordinates, tissue and tumour shares, labels), ``tissue/<key>.jpg`` (mask overlay for
review), ``thumbs/<key>.jpg`` (for heatmaps), ``slides.parquet`` (one row per slide with its status),
``errors.parquet`` (slides that could not be used, each with its URI and reason) and
``done/<key>.json``, written last for each slide. A rerun skips slides with a done marker and clears
whatever a killed run left of the others, so no patch is ever written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import deque
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
from medray.wsi.tissue import detect, overlay

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


def jpeg(pixels: np.ndarray) -> bytes:
    """Review images (thumbnails, tissue overlays) are for eyes, not models: JPEG is ~25x faster to
    encode than PNG at this size and ~8x smaller, which planning a slide feels (benchmarks/wsi_extract.py)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def read_thumbnail(out: str, uri: str) -> np.ndarray | None:
    """A slide's thumbnail as extraction saved it under ``out`` (PNG before medray wrote JPEG), or None."""
    for ext in ("jpg", "png"):
        path = storage.join(out, "thumbs", f"{slide_key(uri)}.{ext}")
        if storage.exists(path):
            return np.asarray(Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB"))
    return None


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
        storage.write_bytes(storage.join(out, "tissue", f"{key}.jpg"), jpeg(overlay(tissue)))
        storage.write_bytes(storage.join(out, "thumbs", f"{key}.jpg"), jpeg(tissue.thumbnail))
    tumour = spec.tumour_label or labels[0]
    slide_labels = {label: float(row[label]) for label in labels}
    grid = pd.concat(
        [grid, patch_labels(grid, slide_labels, tumour if spec.labels_from == "annotation" else None, spec.tumour_threshold)], axis=1
    )
    return grid, info


def _chunks(grid: pd.DataFrame, chunk_patches: int) -> list[pd.DataFrame]:
    """A slide's grid cut into consecutive chunks of at most ``chunk_patches`` positions: one shard each."""
    return [grid.iloc[i : i + chunk_patches] for i in range(0, len(grid), chunk_patches)]


def _failure(uri: str, err: BaseException) -> str:
    """Why a slide failed: a ``SlideError`` names its URI already; anything else (a corrupt slide can fail
    anywhere in a codec) is prefixed with it."""
    return str(err) if isinstance(err, SlideError) else f"{uri}: {err.__class__.__name__}: {err}"


@dataclass
class _Done:
    """What one task did for one slide: patches written, patches kept unnormalised, shards written, and
    the slide's error if it failed."""

    uri: str
    patches: int = 0
    stain_kept: int = 0
    shards: int = 0
    error: str = ""


@dataclass
class _Planned(_Done):
    """A slide task's answer: besides its first shard, the slide's facts, how many shards it has in all,
    and the chunks still to read."""

    info: dict = field(default_factory=dict)
    total: int = 0
    rest: list[pd.DataFrame] = field(default_factory=list)


def _read_chunk(uri: str, chunk: int, grid: pd.DataFrame, meta: dict, labels: list[str], spec: ExtractSpec, out: str) -> _Done:
    """Read one chunk of patches and write it as one Parquet shard."""
    normalise = StainNormaliser(spec.stain)
    try:
        with open_slide(uri, spec.default_mpp, spec.cache_bytes) as slide:
            read = [normalise(read_patch(slide, r, spec.grid.patch_size)) for r in grid.to_dict("records")]
    except Exception as err:  # noqa: BLE001 — a bad tile can fail anywhere in a codec: its slide's error, never the job's
        return _Done(uri, error=_failure(uri, err))
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
    return _Done(uri, patches=len(frame), stain_kept=kept, shards=1)


def _slide(row: dict, meta: dict, labels: list[str], spec: ExtractSpec, out: str) -> _Planned:
    """A slide task: plan the slide, read its first chunk, and hand back the rest of its grid (a few bytes
    a patch) for chunk tasks. A slide of one chunk — most slides at low magnification — is one task."""
    uri = str(row["image"])
    try:
        grid, info = plan_slide(row, labels, spec, out)
    except Exception as err:  # noqa: BLE001 — whatever one slide raises is that slide's error, never the job's
        return _Planned(uri, error=_failure(uri, err), info={"key": slide_key(uri), "grid_cells": 0})
    if grid.empty:
        return _Planned(uri, error=STATUS_EMPTY, info=info)
    first, *rest = _chunks(grid, spec.chunk_patches)
    done = _read_chunk(uri, 0, first, meta, labels, spec, out)
    return _Planned(**asdict(done), info=info, total=1 + len(rest), rest=[] if done.error else rest)


class _Tasks:
    """Slide and chunk tasks, at most ``limit`` in flight, a chunk before any slide not yet begun: what
    waits in the driver is at most a large slide's coordinates, never thousands of tasks queued in Ray."""

    def __init__(self, limit: int, slides: list[tuple]):
        self.limit = limit
        self.slides, self.chunks = deque(slides), deque()
        self.running: dict[ray.ObjectRef, str] = {}
        self.slide_task, self.chunk_task = ray.remote(num_cpus=1)(_slide), ray.remote(num_cpus=1)(_read_chunk)

    def __bool__(self) -> bool:
        return bool(self.slides or self.chunks or self.running)

    def add_chunks(self, chunks: list[tuple]) -> None:
        self.chunks.extend(chunks)

    def drop_chunks(self, uri: str) -> None:
        """A failed slide's chunks not yet begun are not read."""
        self.chunks = deque(c for c in self.chunks if c[0] != uri)

    def next_done(self) -> _Done:
        """Start what the limit allows, then wait for one task to finish and return what it did."""
        while len(self.running) < self.limit and (self.chunks or self.slides):
            if self.chunks:
                args = self.chunks.popleft()
                self.running[self.chunk_task.remote(*args)] = args[0]
            else:
                args = self.slides.popleft()
                self.running[self.slide_task.remote(*args)] = args[0]["image"]
        (ref,), _ = ray.wait(list(self.running), num_returns=1)
        uri = self.running.pop(ref)
        try:
            return ray.get(ref)
        except Exception as err:  # noqa: BLE001 — a task that died however often Ray retried it: its slide's error
            return _Done(uri, error=f"{uri}: an extraction task failed ({err.__class__.__name__})")


def _extract(todo: pd.DataFrame, labels: list[str], spec: ExtractSpec, out: str, progress: bool) -> tuple[dict, dict, dict, int]:
    """Extract the slides of ``todo`` in one streaming pass. Returns each slide's facts, patch count and
    error (if any), and how many patches of the extracted slides kept their pixels unnormalised."""
    if not ray.is_initialized():
        ray.init()  # as Ray Data would on first use
    meta = todo.set_index("image")[[c for c in ("slide_id", "patient_id", "split") if c in todo]].to_dict("index")
    rows = todo[["image", "mask", *labels]].to_dict("records")
    tasks = _Tasks(2 * max(1, int(ray.cluster_resources().get("CPU", 1))), [(r, meta[r["image"]], labels, spec, out) for r in rows])
    info: dict[str, dict] = {}
    patches, kept, shards_left = dict.fromkeys(todo["image"], 0), dict.fromkeys(todo["image"], 0), dict.fromkeys(todo["image"], 0)
    slide_error: dict[str, str] = {}
    bar = tqdm(total=len(todo), unit="slide", desc="extracting", disable=None if progress else True)
    while tasks:
        done = tasks.next_done()
        uri = done.uri
        if isinstance(done, _Planned):
            info[uri], shards_left[uri] = done.info, done.total
            tasks.add_chunks([(uri, i, chunk, meta[uri], labels, spec, out) for i, chunk in enumerate(done.rest, start=1)])
        patches[uri] += done.patches
        kept[uri] += done.stain_kept
        shards_left[uri] -= done.shards
        if uri in slide_error:
            continue  # a chunk of a slide that has already failed: cleared with the rest of it
        if done.error:
            slide_error[uri] = done.error
            tasks.drop_chunks(uri)
            bar.update(1)
        elif shards_left[uri] == 0:
            # Written last: a slide counts as done only once every one of its shards is on storage.
            storage.write_text(done_marker(out, uri), json.dumps({"patches": patches[uri], **info[uri]}))
            bar.update(1)
    bar.close()
    return info, patches, slide_error, sum(n for uri, n in kept.items() if uri not in slide_error)


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

    info, written, slide_error, stain_kept = _extract(todo, labels, spec, out, progress) if len(todo) else ({}, {}, {}, 0)

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
        rows.append({"image": uri, "status": status, "patches": 0 if error else written[uri], "reason": error})
    _record(out, frame, rows, errors, labels, spec)
    statuses = pd.Series([r["status"] for r in rows], dtype=object)
    return ExtractResult(
        out=out,
        slides=len(frame),
        done=int((statuses == STATUS_DONE).sum()),
        skipped=int(done.sum()),
        empty=int((statuses == STATUS_EMPTY).sum()),
        errors=len(errors),
        patches=sum(r["patches"] for r in rows),
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
