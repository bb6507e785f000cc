"""Ray Data pipelines: every pass over image pixels runs here."""

from medray.data.pipeline import decoded, resampled, rows

__all__ = ["decoded", "resampled", "rows"]
