"""Adapters from published dataset layouts to the canonical manifest, one module per format.

``ingest(source, out, config)`` picks the adapter named by ``config.format`` (``dicomweb`` for a
``dicomweb://`` source, whatever the format); every adapter reads a local path or ``s3://`` (``dicomweb``: a PACS), quarantines what it cannot use and returns an ``IngestResult`` whose
``balance`` reads ``N in = kept + quarantined``.
"""

from __future__ import annotations

from medray.data.datasets.chexpert import CHEXPERT_LABELS, ingest_chexpert
from medray.data.datasets.folder import ingest_folder
from medray.data.datasets.ingest import IngestResult, Options, pseudonym
from medray.data.datasets.medmnist import ingest_medmnist
from medray.data.datasets.nih import NIH_LABELS, ingest_nih
from medray.data.datasets.pacs import ingest_dicomweb
from medray.data.datasets.table import ingest_table
from medray.io.dicomweb import is_dicomweb


def _options(config) -> Options:
    dicom_ids = config.format in ("folder", "dicomweb") if config.dicom_ids is None else config.dicom_ids
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


def ingest(source: str, out: str, config, dicomweb=None) -> IngestResult:
    """``config``: the ``ingest`` section of a job config (medray.config.IngestConfig); ``dicomweb``: its
    ``dicomweb`` section (medray.config.DicomWebConfig), whose labels table a PACS source needs."""
    if is_dicomweb(source) or config.format == "dicomweb":
        config = config.model_copy(update={"format": "dicomweb"})  # header IDs by default, as for a folder
        task = "multi-label" if config.task in ("auto", "binary") else config.task
        table, key = (dicomweb.labels, dicomweb.label_key) if dicomweb else (None, "AccessionNumber")
        return ingest_dicomweb(source, out, table, key, config.labels, _options(config), task, config.columns)
    return FORMATS[config.format](source, out, config)


__all__ = [
    "CHEXPERT_LABELS", "FORMATS", "NIH_LABELS", "IngestResult", "Options", "ingest", "ingest_chexpert", "ingest_dicomweb",
    "ingest_folder", "ingest_medmnist", "ingest_nih", "ingest_table", "pseudonym",
]  # fmt: skip
