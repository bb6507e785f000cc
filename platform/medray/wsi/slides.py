"""Opening a whole-slide image: OpenSlide first, tifffile for the plain pyramidal TIFFs it refuses.

A slide on S3 is copied, by the task that needs it, into a local cache bounded in bytes (least
recently used slides are evicted first), because OpenSlide reads only local files. Regions are read
tile by tile, so memory follows the region asked for, never the slide's size.

Only the slide's pyramid is ever read. Its label and macro images (``associated_images`` in
OpenSlide, separate series in tifffile) carry patient identifiers and are never touched.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from medray.errors import MedrayError
from medray.io import storage

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide")
_UNIT_CM = {2: 2.54, 3: 1.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre, in cm per unit


class SlideError(MedrayError, ValueError):
    """A slide that cannot be used; the message names its URI and what is wrong."""


@dataclass(frozen=True)
class Pyramid:
    dimensions: list[tuple[int, int]]  # (width, height) per level, level 0 first
    downsamples: list[float]
    mpp: float  # microns per pixel at level 0

    def best_level(self, downsample: float) -> int:
        """The coarsest level at least as fine as ``downsample``: resizing down, never up."""
        fine_enough = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.001]
        return max(fine_enough, key=lambda i: self.downsamples[i]) if fine_enough else 0


class Slide:
    """A slide's pyramid: ``read_region`` in level-0 coordinates returns ``(h, w, 3)`` uint8 RGB."""

    uri: str
    backend: str
    pyramid: Pyramid

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.pyramid.dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _mpp_from_tiff(x_resolution, unit) -> float | None:
    """Microns per pixel from TIFF XResolution (pixels per unit) and ResolutionUnit."""
    if x_resolution is None or unit not in _UNIT_CM:
        return None
    num, den = x_resolution if isinstance(x_resolution, tuple) else (float(x_resolution), 1)
    if not num:
        return None
    return _UNIT_CM[unit] * 1e4 * den / num


class _OpenSlide(Slide):
    backend = "openslide"

    def __init__(self, uri: str, path: str, mpp: float | None):
        import openslide

        self.uri, self._slide = uri, openslide.OpenSlide(path)
        props = self._slide.properties
        found = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp = float(found) if found else mpp
        if not mpp:
            raise SlideError(f"{uri}: no microns per pixel in the slide's properties; set wsi.default_mpp")
        self.pyramid = Pyramid(list(self._slide.level_dimensions), [float(d) for d in self._slide.level_downsamples], mpp)

    def read_region(self, x, y, level, width, height):
        import openslide

        try:
            rgba = self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.uri}: cannot read region at ({x}, {y}) level {level}: {err}") from None
        rgba = np.asarray(rgba)
        # OpenSlide returns transparent pixels outside the scanned area; they are glass, so white.
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def close(self):
        self._slide.close()


class _TiffSlide(Slide):
    """A pyramidal TIFF read with tifffile, one tile (or strip) at a time."""

    backend = "tifffile"

    def __init__(self, uri: str, path: str, mpp: float | None):
        import tifffile

        self.uri, self._tif, self._lock = uri, tifffile.TiffFile(path), threading.Lock()
        try:
            series = self._tif.series[0]  # the pyramid; label and macro images are other series, never read
            self._pages = [level.pages[0] for level in series.levels]
        except (IndexError, AttributeError) as err:
            raise SlideError(f"{uri}: no image pyramid in this TIFF ({err})") from None
        dims = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        tags = self._pages[0].tags
        found = _mpp_from_tiff(
            tags["XResolution"].value if "XResolution" in tags else None, tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
        )
        mpp = found or mpp
        if not mpp:
            raise SlideError(f"{uri}: no microns per pixel in the TIFF resolution tags; set wsi.default_mpp")
        self.pyramid = Pyramid(dims, [dims[0][0] / w for w, _ in dims], mpp)

    def read_region(self, x, y, level, width, height):
        page = self._pages[level]
        scale = self.pyramid.downsamples[level]
        x0, y0 = int(x / scale), int(y / scale)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        seg_h, seg_w = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth)
        across = math.ceil(page.imagewidth / seg_w)
        rows = range(max(y0, 0) // seg_h, min(math.ceil((y0 + height) / seg_h), math.ceil(page.imagelength / seg_h)))
        cols = range(max(x0, 0) // seg_w, min(math.ceil((x0 + width) / seg_w), across))
        for r in rows:
            for c in cols:
                index = r * across + c
                try:
                    with self._lock:
                        self._tif.filehandle.seek(page.dataoffsets[index])
                        data = self._tif.filehandle.read(page.databytecounts[index])
                    tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
                except Exception as err:  # noqa: BLE001 — codecs raise many kinds; each means this tile is unreadable
                    raise SlideError(f"{self.uri}: cannot decode tile {index} of level {level}: {err.__class__.__name__}") from None
                if tile is None:
                    continue
                tile = tile.reshape(tile.shape[-3:])
                if tile.shape[-1] == 1:
                    tile = np.repeat(tile, 3, axis=-1)
                ty, tx = r * seg_h - y0, c * seg_w - x0
                sy, sx = max(0, -ty), max(0, -tx)
                dy, dx = max(0, ty), max(0, tx)
                h = min(tile.shape[0] - sy, height - dy)
                w = min(tile.shape[1] - sx, width - dx)
                if h > 0 and w > 0:
                    out[dy : dy + h, dx : dx + w] = tile[sy : sy + h, sx : sx + w, :3]
        # Tiles pad the image's right and bottom edges: what lies past the image is glass.
        out[:, max(0, page.imagewidth - x0) :] = 255
        out[max(0, page.imagelength - y0) :, :] = 255
        return out

    def close(self):
        self._tif.close()


def cache_dir() -> str:
    return os.environ.get("MEDRAY_SLIDE_CACHE") or os.path.join(tempfile.gettempdir(), "medray-slide-cache")


def _evict(folder: str, keep: str, max_bytes: int) -> None:
    files = [os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith(".")]
    files = sorted((f for f in files if os.path.isfile(f)), key=lambda f: os.stat(f).st_atime)
    total = sum(os.path.getsize(f) for f in files)
    for f in files:
        if total <= max_bytes:
            break
        if f != keep:
            total -= os.path.getsize(f)
            try:
                os.remove(f)
            except FileNotFoundError:  # another task evicted it first
                pass


def local_copy(uri: str, max_bytes: int = 20 * 2**30, folder: str | None = None) -> str:
    """A local path for ``uri``: the file itself, or its copy in the bounded slide cache."""
    if not storage.is_s3(uri):
        return storage.absolute(uri)
    folder = folder or cache_dir()
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(uri)[1].lower()
    path = os.path.join(folder, hashlib.sha1(uri.encode()).hexdigest()[:20] + suffix)
    if os.path.exists(path):
        os.utime(path)  # recently used: evicted last
        return path
    fs, key = storage.filesystem(uri)
    try:
        size = fs.get_file_info(key).size or 0
        _evict(folder, path, max(0, max_bytes - size))
        # Streamed to a temporary name, then renamed: a task killed mid-copy leaves no truncated slide.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".part-", delete=False) as tmp, fs.open_input_stream(key) as src:
            while chunk := src.read(8 << 20):
                tmp.write(chunk)
        os.replace(tmp.name, path)
    except (OSError, FileNotFoundError) as err:
        raise SlideError(f"{uri}: cannot be fetched ({err.__class__.__name__})") from None
    return path


def open_slide(uri: str, default_mpp: float | None = None, cache_bytes: int = 20 * 2**30) -> Slide:
    """OpenSlide, or tifffile for a pyramidal TIFF OpenSlide does not support; ``SlideError`` otherwise."""
    import openslide

    path = local_copy(uri, cache_bytes)
    if not os.path.exists(path):
        raise SlideError(f"{uri}: does not exist")
    try:
        return _OpenSlide(uri, path, default_mpp)
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as err:
        raise SlideError(f"{uri}: OpenSlide cannot open it: {err}") from None
    try:
        return _TiffSlide(uri, path, default_mpp)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 — tifffile raises many kinds for a file that is not a usable TIFF
        raise SlideError(f"{uri}: not a readable slide ({err.__class__.__name__})") from None
