"""Figures as PNG bytes: matplotlib without a display, for every room that draws (audit, report, sweeps, slides)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

__all__ = ["plt", "png"]


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed, so that long jobs do not collect open figures."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
