"""Adapters from published dataset layouts to the canonical manifest."""

from medray.datasets.nih import NIH_LABELS, ingest_nih

FORMATS = {"nih-cxr14": ingest_nih}

__all__ = ["FORMATS", "NIH_LABELS", "ingest_nih"]
