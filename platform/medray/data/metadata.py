"""The manifest's subgroup metadata in one form: ``age`` in years (float, NaN when unknown) and
``sex`` as ``M`` / ``F`` / ``unknown``. Ingest writes it so; evaluation applies the same rules to
manifests written before, so that a free-text column never reaches a numeric operation.

Ages are read conservatively. A number (``58``, ``58.5``) or a DICOM age string (``058Y``, ``006M``,
``010W``, ``003D``) is an age; anything else — blank or redacted, a range or an open bound (``50+``,
``>89``, ``early 40s``) — is unknown: it names no one age, and a guessed age would put the image in an
age band it may not belong to. Values outside 0–130 years are unknown too.
"""

from __future__ import annotations

import logging

import pandas as pd

log = logging.getLogger(__name__)
AGE = r"^(\d{1,3}(?:\.\d+)?)\s*([YyMmWwDd])?$"
PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}
SEXES = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}
UNKNOWN_SEX = "unknown"
BLANK = ("", "nan", "none", "null", "na", "n/a", "unknown")


def _text(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    text = values.astype("string").str.strip()
    return text, (text.isna() | text.str.lower().isin(BLANK)).astype(bool)


def is_blank(values: pd.Series) -> pd.Series:
    """Not recorded: missing, empty, or a word for unknown."""
    return _text(values)[1]


def ages(values: pd.Series) -> tuple[pd.Series, int]:
    """Ages in years, and how many non-blank values could not be read as one."""
    if pd.api.types.is_numeric_dtype(values):
        years = values.astype(float)
        blank = years.isna()
    else:
        text, blank = _text(values)
        parts = text.str.extract(AGE)
        unit = parts[1].str.upper().map(PER_YEAR).astype(float).fillna(1.0)
        years = pd.to_numeric(parts[0], errors="coerce").astype(float) / unit
    years = years.where((years >= 0) & (years <= 130))
    return years.astype(float), int((years.isna() & ~blank).sum())


def sexes(values: pd.Series) -> tuple[pd.Series, int]:
    """``M`` / ``F`` / ``unknown`` (from m/f/male/female in any case), and how many non-blank values
    were neither."""
    text, blank = _text(values)
    sex = text.str.lower().map(SEXES).astype(object)
    unread = int((sex.isna() & ~blank).sum())
    return sex.where(sex.notna(), UNKNOWN_SEX), unread


def normalise(frame: pd.DataFrame, source: str = "") -> pd.DataFrame:
    """``frame`` with ``age`` and ``sex`` (where present) normalised; counts of what could not be
    read are logged — counts only, never the values, which are patient data."""
    frame = frame.copy()
    where = f"{source}: " if source else ""
    if "age" in frame:
        frame["age"], unread = ages(frame["age"])
        if unread:
            log.warning("%s%d of %d ages are not a number of years (a range, a bound or words) and are left unknown",
                        where, unread, len(frame))  # fmt: skip
    if "sex" in frame:
        frame["sex"], unread = sexes(frame["sex"])
        if unread:
            log.warning("%s%d of %d sex values are not M/F (male/female) and are recorded as unknown", where, unread, len(frame))
    return frame
