"""Ray Data pipelines: every pass over image pixels runs here."""

from medray.data.pipeline import augmented, decoded, resampled, rows

__all__ = ["augmented", "decoded", "resampled", "rows"]
