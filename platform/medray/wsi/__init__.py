"""Whole-slide images: slides, tissue masks, patch grids, patch extraction on Ray Data, slide-level results."""

from medray.wsi.extract import ExtractResult, ExtractSpec, extract_patches
from medray.wsi.grid import GridSpec, patch_grid
from medray.wsi.manifest import read_slide_manifest
from medray.wsi.slides import SlideError, open_slide
from medray.wsi.tissue import detect

__all__ = [
    "ExtractResult",
    "ExtractSpec",
    "GridSpec",
    "SlideError",
    "detect",
    "extract_patches",
    "open_slide",
    "patch_grid",
    "read_slide_manifest",
]
