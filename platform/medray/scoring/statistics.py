"""What a scoring run's inputs and scores looked like, kept in its ``_summary.json`` for drift monitoring.

Nothing here needs a label or a second look at an image. The scoring actors record, per input, what the
decoder saw on the way (``medray.io.images.Facts``: stored width and height, bits per sample, the mean gray
level of the 8-bit image the model is given, and for DICOM the Modality and ViewPosition codes and a digest
of the institution), as extra columns of the score Parquet (``medray.evaluation.predict.FACT_COLUMNS``).
When the run ends, ``summarise`` streams its parts (part by part, so memory stays flat however large the
archive) into fixed-bin counts:

- per label: a histogram of the probabilities (``PROBABILITY_BINS`` equal bins on [0, 1]) and the share at
  or above the operating threshold (``drift.threshold`` / ``drift.thresholds``);
- numeric inputs (width, height, mean intensity): count, mean, standard deviation, minimum, maximum, and
  for mean intensity a histogram (``INTENSITY_BINS`` bins on [0, 256));
- categories (bit depth, modality, view, site): counts; ``none`` where the input does not record one
  (a PNG has no modality);
- inputs and errors.

Failed rows count as errors only: their facts and probabilities do not exist. Parts written before the
fact columns existed are summarised without them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from medray.io import storage

VERSION = 1
PROBABILITY_BINS = 50  # 0.02 wide: fine enough to merge into the deciles PSI uses, and exact at thresholds on its edges
INTENSITY_BINS = 64  # 4 gray levels wide
NUMERIC = ("width", "height", "mean_intensity")
CATEGORICAL = ("bit_depth", "modality", "view", "site")
NONE = "none"


def probability_edges() -> np.ndarray:
    return np.linspace(0.0, 1.0, PROBABILITY_BINS + 1)


def intensity_edges() -> np.ndarray:
    return np.linspace(0.0, 256.0, INTENSITY_BINS + 1)


def part_files(output: str) -> list[str]:
    """The score parts of ``output`` (``part-*.parquet``), in order; drift reports and Grad-CAM files are not parts."""
    return [uri for uri in storage.list_files(output, (".parquet",)) if storage.basename(uri).startswith("part-")]


def iter_parts(output: str, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Each part as a frame of those of ``columns`` it has (all when None)."""
    for uri in part_files(output):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            part = pq.ParquetFile(f)
            names = part.schema_arrow.names
            wanted = names if columns is None else [c for c in columns if c in names]
            yield part.read(columns=wanted).to_pandas()


def read_rows(output: str, columns: list[str]) -> pd.DataFrame:
    """The rows of every part, ``columns`` only (those a part lacks are missing, i.e. NaN)."""
    frames = list(iter_parts(output, columns))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _labels(columns) -> list[str]:
    return [c.removeprefix("prob_") for c in columns if c.startswith("prob_")]


class _Numeric:
    def __init__(self, edges: np.ndarray | None = None):
        self.n, self.total, self.squares, self.lo, self.hi = 0, 0.0, 0.0, np.inf, -np.inf
        self.edges = edges
        self.histogram = np.zeros(len(edges) - 1, dtype=np.int64) if edges is not None else None

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.n += len(values)
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
        if self.edges is not None:
            self.histogram += np.histogram(np.clip(values, self.edges[0], self.edges[-1]), self.edges)[0]

    def result(self) -> dict:
        if not self.n:
            return {"n": 0}
        mean = self.total / self.n
        out = {"n": self.n, "mean": mean, "std": max(self.squares / self.n - mean * mean, 0.0) ** 0.5, "min": self.lo, "max": self.hi}
        if self.histogram is not None:
            out["histogram"] = self.histogram.tolist()
        return out


def summarise(output: str, thresholds: dict[str, float], threshold: float = 0.5) -> dict:
    """The statistics of the scored rows in ``output`` (see the module's docstring); ``thresholds`` per label,
    ``threshold`` for the others."""
    rows = errors = 0
    labels: dict[str, dict] = {}
    numeric = {name: _Numeric(intensity_edges() if name == "mean_intensity" else None) for name in NUMERIC}
    categories: dict[str, Counter] = {name: Counter() for name in CATEGORICAL}
    for part in iter_parts(output):
        ok = (part["error"].fillna("").astype(str) == "").to_numpy()
        rows, errors = rows + len(part), errors + int((~ok).sum())
        good = part[ok]
        for label in _labels(part.columns):
            p = good[f"prob_{label}"].to_numpy(dtype=float)
            p = p[np.isfinite(p)]
            cut = thresholds.get(label, threshold)
            entry = labels.setdefault(label, {"threshold": cut, "n": 0, "above": 0, "histogram": np.zeros(PROBABILITY_BINS, np.int64)})
            entry["n"] += len(p)
            entry["above"] += int((p >= cut).sum())
            entry["histogram"] += np.histogram(np.clip(p, 0.0, 1.0), probability_edges())[0]
        for name in NUMERIC:
            if name in good:
                values = good[name].to_numpy(dtype=float)
                numeric[name].add(values if name == "mean_intensity" else values[values > 0])
        for name in CATEGORICAL:
            if name in good:
                values = good[name].astype(str)
                unknown = values.isin(["", "0"] if name == "bit_depth" else [""])  # bit depth 0: not in the header
                categories[name].update(values.mask(unknown, NONE).tolist())
    return {
        "version": VERSION,
        "rows": rows,
        "errors": errors,
        "error_rate": errors / rows if rows else 0.0,
        "probability_bins": PROBABILITY_BINS,
        "labels": {
            label: {
                "threshold": e["threshold"],
                "n": e["n"],
                "above_threshold": e["above"] / e["n"] if e["n"] else None,
                "histogram": e["histogram"].tolist(),
            }
            for label, e in labels.items()
        },
        "numeric": {name: acc.result() for name, acc in numeric.items()},
        "categorical": {name: dict(sorted(counts.items())) for name, counts in categories.items() if counts},
    }
