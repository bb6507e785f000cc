"""What every adapter shares: finding image files, the quarantine, pseudonyms, and the final count.

An adapter turns its layout into candidate rows (``image``, ``patient_id``, labels, metadata) and a
list of rows it already refused; ``finish`` then refuses rows without a patient, duplicate rows and
images that do not decode (one Ray Data pass, which also reads patient/study IDs from DICOM headers
when asked), pseudonymises IDs, writes the manifest and its quarantine table, and states
``N in = kept + quarantined`` — a count that must balance, so nothing is ever dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from medray.data import metadata
from medray.data.datasets import keys
from medray.data.manifest import Manifest, write_manifest, write_quarantine
from medray.io import images, listing, storage
from medray.io.dicom import header_ids, is_dicom

log = logging.getLogger("medray.ingest")
SALT_ENV = keys.SALT_ENV


@dataclass
class IngestResult:
    manifest: str
    quarantine: str
    images: int
    quarantined: int
    rows_in: int = 0
    pseudonyms: str = ""  # whether the IDs were pseudonymised, and with the key from where (never the key)

    @property
    def balance(self) -> str:
        return f"{self.rows_in} in = {self.images} kept + {self.quarantined} quarantined"


@dataclass
class Options:
    """Adapter-independent ingest options (from the ``ingest`` config section)."""

    check: bool = True
    pseudonymise: bool | None = None  # None: the IDs read from DICOM headers; True: every ID; False: none
    salt: str | None = field(default=None, repr=False)  # never printed, never logged
    salt_file: str | None = None  # the key file when no salt is given (see datasets.keys)
    ids_from_dicom: bool = False  # take patient_id / study_id from DICOM headers
    encoding: str | None = None  # of label CSVs without a byte-order mark (see datasets.encoding)

    def key(self, out: str) -> tuple[bytes | None, str]:
        """(the pseudonym key, where it came from), or (None, "") when no ID is to be pseudonymised."""
        if self.pseudonymise is False or (self.pseudonymise is None and not self.ids_from_dicom):
            return None, ""
        return keys.resolve(self.salt, self.salt_file, out)


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _pseudonyms(options: Options, keyed_by: str, from_headers: int, images: int) -> str:
    """What a reader of the manifest must know: are these IDs real ones?"""
    if options.pseudonymise is False:
        return "IDs kept as they are (ingest.pseudonymise: false)"
    if options.pseudonymise:
        return f"IDs pseudonymised with the key from {keyed_by}"
    parts = [f"IDs from DICOM headers pseudonymised ({_images(from_headers)}) with the key from {keyed_by}"] if from_headers else []
    if kept := images - from_headers:
        parts.append(
            f"IDs from the table or file names kept as they are ({_images(kept)}; ingest.pseudonymise: true pseudonymises them too)"
        )
    return "; ".join(parts)


def pseudonym(value: str, salt: bytes) -> str:
    """A keyed hash (HMAC-SHA256): stable for one salt, so one patient keeps one pseudonym across
    ingests, and not reversible by hashing a list of candidate IDs without the salt."""
    return hmac.new(salt, str(value).encode(), hashlib.sha256).hexdigest()[:20]


class Rejects:
    """The quarantine table being built: every refused input with its reason."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, image: str, reason: str) -> None:
        self.rows.append({"image": str(image), "reason": reason})

    def __len__(self) -> int:
        return len(self.rows)


def _is_file(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


class FileIndex:
    """All files under a root, listed once (one S3 listing instead of a request per row) and only
    when a relative path or a bare name is first looked up; listed by medray.io.listing, so entries
    that are not regular files are not found, and ``reason`` says why."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if storage.is_s3(root) else storage.absolute(root)

    @functools.cached_property
    def _listing(self) -> list[listing.Entry]:
        return list(listing.walk(self.root))

    @functools.cached_property
    def files(self) -> set[str]:
        return {entry.uri for entry in self._listing if not entry.skipped}

    @functools.cached_property
    def skipped(self) -> dict[str, str]:
        return {entry.uri: entry.skipped for entry in self._listing if entry.skipped}

    def reason(self, uri: str) -> str:
        """Why ``uri`` was not found: the listing's reason for skipping it or a folder above it, or
        that it does not exist."""
        if uri in self.skipped:
            return self.skipped[uri]
        folder = storage.parent(uri)
        while folder.startswith(self.root + "/"):
            if folder in self.skipped:
                return f"under {folder}, a {self.skipped[folder]}"
            folder = storage.parent(folder)
        return "image file not found"

    @functools.cached_property
    def by_name(self) -> dict[str, str]:
        by_name: dict[str, str] = {}
        for uri in sorted(self.files):
            by_name.setdefault(posixpath.basename(uri), uri)
        return by_name

    def resolve(self, path: str) -> tuple[str, bool]:
        """``path`` → (URI, found). An ``s3://`` URI or an absolute local path is used as it is; a
        relative path starts at the root, and may start with the root folder's own name, as
        CheXpert's ``Path`` column does (``CheXpert-v1.0-small/train/…``); a bare file name is
        looked up anywhere below the root (HAM10000 spreads its images over two folders)."""
        path = str(path).strip()
        if storage.is_s3(path) or os.path.isabs(path):
            uri = path if storage.is_s3(path) else os.path.normpath(path)
            return uri, uri in self.files if uri.startswith(self.root + "/") else _is_file(uri)
        candidates = [storage.join(self.root, path)]
        head, _, rest = path.partition("/")
        if rest and head == posixpath.basename(self.root):
            candidates.insert(0, storage.join(self.root, rest))
        for uri in candidates:
            if uri in self.files:
                return uri, True
        if "/" not in path and path in self.by_name:
            return self.by_name[path], True
        return candidates[-1], False

    def by_basename(self, name: str) -> str | None:
        return self.by_name.get(str(name).strip())


def parse_binary(value) -> float | None:
    """A 0/1 label cell → 1.0, 0.0 or NaN (blank); None when it is something else."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    text = str(value).strip().lower()
    if text in ("", "nan", "na"):
        return np.nan
    if text in ("1", "1.0", "true", "yes"):
        return 1.0
    if text in ("0", "0.0", "false", "no"):
        return 0.0
    return None


def _read(uri: str, ids_from_dicom: bool) -> tuple[str | None, str | None]:
    """Decode fully; then a DICOM file's header IDs ("" when absent), None for other files."""
    data = images.read(uri)  # read once: decoded here, and its DICOM header parsed below
    images.decode(data, uri)
    if not ids_from_dicom or not is_dicom(data):
        return None, None
    return header_ids(data, uri, images.MAX_BYTES)


def _inspect(uri: str, ids_from_dicom: bool, salt: bytes | None) -> tuple[str, str | None, str | None]:
    """(reason or "", patient, study), by the rule scoring follows too (``images.attempt``): whatever
    reading the file raises is its reason. Header IDs leave the worker only as pseudonyms when a salt is set."""
    found = images.attempt(uri, _read, uri, ids_from_dicom)
    if isinstance(found, str):
        return found, None, None
    patient, study = found
    if salt is not None and patient is not None:
        patient = pseudonym(patient, salt) if patient else ""
        study = pseudonym(study, salt) if study else ""
    return "", patient, study


def _inspect_batch(batch: dict, ids_from_dicom: bool, salt: bytes | None) -> dict:
    found = [_inspect(str(uri), ids_from_dicom, salt) for uri in batch["image"]]
    return {
        "image": batch["image"],
        "reason": np.array([f[0] for f in found], dtype=object),
        "dicom_patient": np.array([f[1] for f in found], dtype=object),
        "dicom_study": np.array([f[2] for f in found], dtype=object),
    }


def inspect_images(uris: list[str], ids_from_dicom: bool = False, salt: bytes | None = None) -> pd.DataFrame:
    """Decode every image once in parallel (Ray Data): reason it is unusable, and DICOM IDs if asked."""
    from medray.data import rows

    if not uris:
        return pd.DataFrame(columns=["image", "reason", "dicom_patient", "dicom_study"])
    kwargs = {"ids_from_dicom": ids_from_dicom, "salt": salt}
    ds = rows(pd.DataFrame({"image": uris})).map_batches(_inspect_batch, fn_kwargs=kwargs, batch_size=64)
    return ds.to_pandas()


def quarantine_uri(out: str) -> str:
    return out.removesuffix(".parquet") + ".quarantine.parquet"


def _blank(series: pd.Series) -> pd.Series:
    return series.isna() | (series.astype(str).str.strip().isin(["", "nan", "None"]))


def finish(
    frame: pd.DataFrame,
    rejects: Rejects,
    labels: list[str],
    task: str,
    out: str,
    rows_in: int,
    options: Options,
    source: str,
) -> IngestResult:
    """Refuse what cannot be used, write the manifest and the quarantine, and balance the count."""
    frame = frame.reset_index(drop=True)
    salt, keyed_by = options.key(out)
    for column in ("image", "patient_id"):  # an adapter that kept no row returns a frame without columns
        if column not in frame:
            frame[column] = pd.Series(dtype=object)

    frame["_pseudonymised"] = False  # IDs read from DICOM headers arrive pseudonymised already

    if len(frame) and (options.check or options.ids_from_dicom):  # header IDs need the same pass
        found = inspect_images(frame["image"].unique().tolist(), options.ids_from_dicom, salt).drop_duplicates("image")
        found = frame[["image"]].merge(found, on="image", how="left")
        bad = (found["reason"].fillna("") != "").to_numpy()
        for uri, reason in zip(frame["image"][bad], found["reason"][bad]):
            rejects.add(uri, reason)
        header = found["dicom_patient"].notna().to_numpy()  # a DICOM file: its header is the source
        frame.loc[header, "patient_id"] = found["dicom_patient"][header].to_numpy()
        frame.loc[header, "_pseudonymised"] = salt is not None
        studies = (found["dicom_study"].fillna("") != "").to_numpy()
        if studies.any():
            frame.loc[studies, "study_id"] = found["dicom_study"][studies].to_numpy()
        frame = frame[~bad]

    missing = _blank(frame["patient_id"]).to_numpy()
    for uri in frame["image"][missing]:
        rejects.add(uri, "missing patient id")
    frame = frame[~missing]

    duplicate = frame.duplicated("image", keep="first").to_numpy()
    for uri in frame["image"][duplicate]:
        rejects.add(uri, "duplicate row: the same image is listed more than once (the first row is kept)")
    frame = frame[~duplicate].reset_index(drop=True)

    frame["patient_id"] = frame["patient_id"].astype(str).str.strip()
    from_headers = int(frame["_pseudonymised"].sum())
    if options.pseudonymise:
        fresh = ~frame["_pseudonymised"].to_numpy(dtype=bool)
        frame.loc[fresh, "patient_id"] = [pseudonym(p, salt) for p in frame.loc[fresh, "patient_id"]]
        if "study_id" in frame:
            studies = fresh & ~_blank(frame["study_id"]).to_numpy()
            frame.loc[studies, "study_id"] = [pseudonym(s, salt) for s in frame.loc[studies, "study_id"]]
    frame = frame.drop(columns="_pseudonymised")

    if len(frame) + len(rejects) != rows_in:  # an adapter lost or invented rows: a bug, never a user error
        raise AssertionError(f"{source}: {rows_in} rows in but {len(frame)} kept + {len(rejects)} quarantined")
    result = IngestResult(out, quarantine_uri(out), len(frame), len(rejects), rows_in,
                          _pseudonyms(options, keyed_by, from_headers, len(frame)))  # fmt: skip
    write_quarantine(rejects.rows, result.quarantine)
    if frame.empty:
        raise ValueError(f"{source}: no usable rows ({result.balance}; reasons in {result.quarantine})")
    write_manifest(Manifest(metadata.normalise(frame, source), list(labels), task), out)
    never = [label for label in labels if not (frame[label] == 1).any()]
    if never:
        log.warning("labels with no positive image: %s", never)
    log.info("ingested %d images of %d patients", len(frame), frame["patient_id"].nunique())
    log.info("%s (quarantine: %s)", result.balance, result.quarantine)
    log.info("%s", result.pseudonyms)
    return result
