"""Ray Data pipelines: every pass over image pixels runs here."""

from medray.data.pipeline import augmented, check_images, decoded, resampled, rows

__all__ = ["augmented", "check_images", "decoded", "resampled", "rows"]
