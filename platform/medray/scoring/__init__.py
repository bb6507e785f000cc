"""Batch scoring of whole archives: one output row per input, exactly once, resumable."""
