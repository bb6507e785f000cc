"""Adapters from published dataset layouts to the canonical manifest, one module per format.

``ingest(source, out, config)`` picks the adapter named by ``config.format``; every adapter reads a
local path or ``s3://``, quarantines what it cannot use and returns an ``IngestResult`` whose
``balance`` reads ``N in = kept + quarantined``.
"""

from __future__ import annotations

from medray.data.datasets.chexpert import CHEXPERT_LABELS, ingest_chexpert
from medray.data.datasets.folder import ingest_folder
from medray.data.datasets.ingest import IngestResult, Options, pseudonym
from medray.data.datasets.medmnist import ingest_medmnist
from medray.data.datasets.nih import NIH_LABELS, ingest_nih
from medray.data.datasets.table import ingest_table


def _options(config) -> Options:
    dicom_ids = config.format == "folder" if config.dicom_ids is None else config.dicom_ids
    salt = config.salt.get_secret_value() if config.salt else None
    return Options(check=config.check, pseudonymise=config.pseudonymise, salt=salt, salt_file=config.salt_file,
                   ids_from_dicom=dicom_ids, encoding=config.encoding)  # fmt: skip


def _nih(source, out, config):
    return ingest_nih(source, out, config.labels, options=_options(config), val=config.official_val, seed=config.seed)


def _chexpert(source, out, config):
    return ingest_chexpert(
        source, out, config.labels, _options(config), config.uncertainty, config.uncertainty_per_label, config.views
    )


def _medmnist(source, out, config):
    return ingest_medmnist(source, out, config.labels, _options(config), config.task)


def _csv(source, out, config):
    task = "multi-label" if config.task in ("auto", "binary") else config.task
    return ingest_table(source, out, config.columns, task, config.grouping, config.images, _options(config))


def _folder(source, out, config):
    return ingest_folder(source, out, config.labels, _options(config))


FORMATS = {"nih-cxr14": _nih, "chexpert": _chexpert, "medmnist": _medmnist, "csv": _csv, "folder": _folder}


def ingest(source: str, out: str, config) -> IngestResult:
    """``config``: the ``ingest`` section of a job config (medray.config.IngestConfig)."""
    return FORMATS[config.format](source, out, config)


__all__ = [
    "CHEXPERT_LABELS", "FORMATS", "NIH_LABELS", "IngestResult", "Options", "ingest", "ingest_chexpert",
    "ingest_folder", "ingest_medmnist", "ingest_nih", "ingest_table", "pseudonym",
]  # fmt: skip
