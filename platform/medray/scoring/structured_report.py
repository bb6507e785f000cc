"""Scores back to the archive as DICOM Structured Reports: one SR per study, filed with the study.

With ``score.dicom_sr: true``, after scoring, every study with at least one scored DICOM instance gets one
Comprehensive SR holding a TID 1500 measurement report (highdicom). Per scored instance and finding there is
one measurement group: the finding (a code of scheme ``99MEDRAY`` whose meaning is the label), the instance it
was computed on (SOP Class + Instance UID, also listed in the evidence), two numbers (``probability``: the score
output's value; ``threshold``) and a qualitative evaluation, Present or Absent (probability ≥ threshold). Each
group names the algorithm: the model's name, its ``model_sha256`` as version, and as parameters the sha256 and
how the threshold was chosen. Patient and study modules are copied from the source headers by highdicom, so a
viewer files the SR with its study.

Thresholds are those ``medray evaluate`` chose on the validation split (``<run>/evaluation/metrics.json``,
kept when it evaluated this very model). They are chosen on the model's raw outputs; a calibrated score output
(``calibration.json``) gets them mapped through the same calibration for multi-label models (each map is
monotone). Where there is no evaluation of this model, or the outputs are calibrated multi-class/ordinal ones
that no threshold maps onto, the threshold is 0.5 — the SR says which rule applied.

Where SRs go: an instance read over DICOMweb (an ``instance_uri``) gets its study's SR stored with STOW-RS on
the same service; a file gets it written to ``<output>/_dicom_sr/<SR SOP Instance UID>.dcm``. The SR's series
and SOP Instance UIDs derive from the model's sha256 and the study's UID, so a rerun writes the same file name
and stores the same instance again (a PACS keeps one instance per SOP Instance UID): nothing twice.

Headers are read in a thread pool (the work waits on disks and the PACS): a first pass locates every scored
instance (files: the header without pixels; DICOMweb: one series' metadata per request), a second builds each
study's SR from one full header and the UIDs of its instances, so memory holds UIDs, not headers. Rows with an
error are never reported; a study whose rows all failed gets no SR; non-DICOM inputs (PNG, JPEG) get none.
Logs and messages hold counts and URIs only, never a header value.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pandas as pd

from medray.io import dicomweb, storage
from medray.io.dicom import is_dicom, private
from medray.scoring.thresholds import frozen_thresholds

log = logging.getLogger(__name__)
SR_FOLDER = "_dicom_sr"
NAMESPACE = "medray.dicom_sr.v1"  # part of every derived UID: a new layout gets new UIDs
SCHEME = "99MEDRAY"  # private coding scheme for the findings (the model's labels) and the two numbers
SERIES_NUMBER, INSTANCE_NUMBER = 7701, 1
WORKERS = 8
# The patient and study attributes an SR must carry (type 2: present, possibly empty), copied from a source header.
TYPE_2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
NOT_DICOM_SUFFIXES = (".png", ".jpg", ".jpeg")  # known by name, not read


@dataclass(frozen=True)
class Model:
    """What an SR says about the model that produced its numbers."""

    name: str
    sha256: str
    thresholds: dict[str, float]  # per label, on the score output's scale
    threshold_rule: str  # how the thresholds were chosen, in words (written into every SR)


@dataclass
class ReportCounts:
    reports: int = 0  # SRs written or stored
    instances: int = 0  # instances referenced by them
    not_dicom: int = 0  # scored inputs that are not DICOM: no SR
    error_rows: int = 0  # rows with an error: never reported
    studies_all_errors: int = 0  # studies (known from their instance URIs) none of whose rows was scored
    failed: dict[str, int] = field(default_factory=dict)  # reason → instances or studies left out


# ---- thresholds --------------------------------------------------------------------------------------


# ---- UIDs, headers --------------------------------------------------------------------------------


def report_uids(model_sha256: str, study_uid: str) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of the study's SR from this model: the same on every run."""
    return _uid(model_sha256, study_uid, "series"), _uid(model_sha256, study_uid, "sop")


@dataclass(frozen=True)
class Instance:
    uri: str
    study: str
    series: str
    sop_class: str
    sop: str


def _file_header(uri: str):
    """The header (no pixels) of a DICOM file, or None when the file is not DICOM. Only scored rows come
    here: the scorer already read the file within its limits, so a deflated one inflates within them too."""
    import pydicom

    data = storage.read_bytes(uri)
    if not is_dicom(data):
        return None
    with private():
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)


def _instance(uri: str, ds) -> Instance:
    with private():
        return Instance(uri, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _from_json(item: dict):
    import pydicom

    with private():  # bulk data (never pixels in metadata, but e.g. icons) is not fetched: the SR needs none
        return pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda tag, vr, value: b"")


def _locate_file(uri: str) -> Instance | str:
    if uri.lower().endswith(NOT_DICOM_SUFFIXES):
        return "not_dicom"
    try:
        ds = _file_header(uri)
        return "not_dicom" if ds is None else _instance(uri, ds)
    except Exception as err:  # noqa: BLE001 — one file's problem, counted by kind (its text may quote a header value)
        return f"header unreadable ({type(err).__name__})"


def _locate_series(uris: list[str]) -> list[Instance | str]:
    """The scored instances of one DICOMweb series, from one WADO-RS metadata request."""
    source, study, series, _ = dicomweb.parse_instance(uris[0])
    metadata = dicomweb.client(source).retrieve_series_metadata(study_instance_uid=study, series_instance_uid=series)
    classes = {}
    for item in metadata:
        ds = _from_json(item)
        with private():
            classes[str(ds.get("SOPInstanceUID", ""))] = str(ds.get("SOPClassUID", ""))
    located = []
    for uri in uris:
        sop = dicomweb.parse_instance(uri)[3]
        located.append(Instance(uri, study, series, classes[sop], sop) if classes.get(sop) else "not in the PACS's series metadata")
    return located


def _header(instance: Instance):
    """The full header (no pixels) of one instance: its patient and study modules go into the SR."""
    if not dicomweb.is_dicomweb(instance.uri):
        return _file_header(instance.uri)
    source, study, series, sop = dicomweb.parse_instance(instance.uri)
    web = dicomweb.client(source)
    return _from_json(web.retrieve_instance_metadata(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop))


def locate(uris: list[str], workers: int = WORKERS) -> list[Instance | str]:
    """Per URI, the instance it holds (UIDs only) or why it has none; files one by one, DICOMweb per series."""
    result: list[Instance | str] = [""] * len(uris)
    series: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        if dicomweb.is_dicomweb(uri):
            series.setdefault(uri.rsplit("/instances/", 1)[0], []).append(i)
    files = [i for i, uri in enumerate(uris) if not dicomweb.is_dicomweb(uri)]
    with ThreadPoolExecutor(workers) as pool:
        for i, found in zip(files, pool.map(lambda i: _locate_file(uris[i]), files), strict=True):
            result[i] = found
        for rows, found in zip(series.values(), pool.map(lambda rows: _guarded(_locate_series, uris[rows[0]], [uris[i] for i in rows]), series.values()), strict=True):  # fmt: skip
            for i, item in zip(rows, found if isinstance(found, list) else [found] * len(rows), strict=True):
                result[i] = item
    return result


def _guarded(function: Callable, uri: str, *args):
    """A failure of one series or study is its own (counted by kind); a dead service stops the job."""
    try:
        return function(*args)
    except dicomweb.DicomWebError:
        raise
    except Exception as err:  # noqa: BLE001
        import requests

        if isinstance(err, requests.ConnectionError | requests.Timeout):
            service = dicomweb.parse_instance(uri)[0]
            raise dicomweb.DicomWebError(f"{service}: the DICOMweb service did not answer ({type(err).__name__}); is it up?") from None
        status = getattr(getattr(err, "response", None), "status_code", None)
        return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "")


# ---- the report ----------------------------------------------------------------------------------


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def build_report(header, instances: list[Instance], probabilities: pd.DataFrame, model: Model):
    """The SR of one study: ``header`` is one of its instances' headers (patient and study modules),
    ``probabilities`` one row per instance (in ``instances``' order) and one column per label."""
    import highdicom as hd
    from pydicom import Dataset
    from pydicom.sr.codedict import codes

    study_uid = instances[0].study
    series_uid, sop_uid = report_uids(model.sha256, study_uid)
    with private():
        for keyword in TYPE_2:  # highdicom copies these from the first evidence; a header may lack some
            if keyword not in header:
                setattr(header, keyword, None)
    evidence = [header]
    for instance in instances:
        if instance.sop != str(header.SOPInstanceUID):
            ds = Dataset()  # the other instances are referenced by their UIDs alone
            ds.StudyInstanceUID, ds.SeriesInstanceUID = instance.study, instance.series
            ds.SOPClassUID, ds.SOPInstanceUID = instance.sop_class, instance.sop
            evidence.append(ds)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.sha256, parameters=[f"model_sha256={model.sha256}", f"threshold: {model.threshold_rule}"]
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(str(_uid(model.sha256, "device"))), name="medray", model_name=model.name[:64]
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    groups = []
    for k, instance in enumerate(instances):
        for label, threshold in model.thresholds.items():
            p = float(probabilities[label].iloc[k])
            finding = _code(label, label)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=str(_uid(model.sha256, study_uid, instance.sop, label)), identifier=f"{label} / instance {k + 1}"[:64]
                    ),
                    finding_type=finding,
                    algorithm_id=algorithm,
                    measurements=[
                        hd.sr.Measurement(name=_code("probability", "probability"), value=p, unit=codes.UCUM.NoUnits),
                        hd.sr.Measurement(name=_code("threshold", "threshold"), value=float(threshold), unit=codes.UCUM.NoUnits),
                    ],
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(name=finding, value=codes.SCT.Present if p >= threshold else codes.SCT.Absent)
                    ],
                    source_images=[hd.sr.SourceImageForMeasurementGroup(instance.sop_class, instance.sop)],
                )
            )
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging study"),
        imaging_measurements=groups,
    )
    with private():
        return hd.sr.ComprehensiveSR(
            evidence=evidence, content=content, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
            sop_instance_uid=sop_uid, instance_number=INSTANCE_NUMBER, manufacturer="medray", is_complete=True,
            series_description=f"medray {model.name}"[:64],
        )  # fmt: skip


def _uid(*parts: str) -> str:
    """A name-based UUID as a 2.25.… UID (ISO/IEC 9834-8): the same parts give the same UID, on any machine.
    (pydicom's ``generate_uid(prefix=None, entropy_srcs=…)`` ignores its sources and draws a random one.)"""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join([NAMESPACE, *parts])).int}"


def _deliver(report, instances: list[Instance], output: str) -> None:
    if dicomweb.is_dicomweb(instances[0].uri):
        source = dicomweb.parse_instance(instances[0].uri)[0]
        dicomweb.client(source).store_instances([report], study_instance_uid=instances[0].study)
        return
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    storage.write_atomic(storage.join(output, SR_FOLDER, f"{report.SOPInstanceUID}.dcm"), buffer.getvalue())


def _report_study(instances: list[Instance], probabilities: pd.DataFrame, model: Model, output: str) -> str:
    report = build_report(_header(instances[0]), instances, probabilities, model)
    _deliver(report, instances, output)
    return ""


# ---- all of a score output ----------------------------------------------------------------------------


def write_reports(scores: pd.DataFrame, model: Model, output: str, workers: int = WORKERS) -> ReportCounts:
    """One SR per study of the score output ``scores`` (``image``, ``error``, ``prob_<label>``): DICOMweb
    instances' SRs stored with STOW-RS on their service, files' SRs written under ``<output>/_dicom_sr/``."""
    counts = ReportCounts()
    failed: Counter[str] = Counter()
    errors = scores["error"].fillna("").astype(str) != ""
    counts.error_rows = int(errors.sum())
    # Studies named by their instance URIs whose every row failed (a file's study is unknown without its header).
    studies = scores["image"].astype(str).map(lambda uri: uri.split("/series/")[0] if dicomweb.is_dicomweb(uri) else None)
    known = studies.notna()
    counts.studies_all_errors = len(set(studies[known & errors]) - set(studies[known & ~errors]))

    scored = scores[~errors].reset_index(drop=True)
    located = locate(scored["image"].astype(str).tolist(), workers)
    found = [i for i, item in enumerate(located) if isinstance(item, Instance)]
    for item in located:
        if isinstance(item, str):
            if item == "not_dicom":
                counts.not_dicom += 1
            else:
                failed[f"instances: {item}"] += 1
    by_study: dict[tuple[str, str], list[int]] = {}
    for i in found:
        instance = located[i]
        service = str(dicomweb.parse_instance(instance.uri)[0]) if dicomweb.is_dicomweb(instance.uri) else "files"
        by_study.setdefault((service, instance.study), []).append(i)
    columns = {label: f"prob_{label}" for label in model.thresholds}

    def one(rows: list[int]) -> str:
        probabilities = scored.loc[rows, list(columns.values())].rename(columns={v: k for k, v in columns.items()})
        return _guarded(
            _report_study, located[rows[0]].uri, [located[i] for i in rows], probabilities.reset_index(drop=True), model, output
        )

    with ThreadPoolExecutor(workers) as pool:
        for rows, outcome in zip(by_study.values(), pool.map(one, by_study.values()), strict=True):
            if outcome:
                failed[f"studies: {outcome}"] += 1
            else:
                counts.reports, counts.instances = counts.reports + 1, counts.instances + len(rows)
    counts.failed = dict(failed)
    return counts


def report_scores(config, output: str, checkpoint_uri: str, model_sha256: str, calibrated: bool) -> tuple[int, dict]:
    """``score.dicom_sr``: the SRs of a completed score output; (reports, counts) for ``_summary.json``."""
    import pyarrow.parquet as pq

    from medray.training import checkpoint

    meta = checkpoint.read_meta(checkpoint_uri)
    labels, task = list(meta["labels"]), meta.get("task", "multi-label")
    thresholds, rule = frozen_thresholds(config.run_dir, checkpoint_uri, model_sha256, labels, task, calibrated)
    name = meta.get("backbone") or f"{meta.get('head')} head on {meta.get('embedding', {}).get('backbone', '?')}"  # a head on embeddings
    model = Model(f"{name} · {config.name}", model_sha256, thresholds, rule)
    fs, path = storage.filesystem(output)
    scores = pq.read_table(path, filesystem=fs, columns=["image", "error", *(f"prob_{label}" for label in labels)]).to_pandas()
    counts = write_reports(scores, model, output)
    where = (
        "STOW-RS to the DICOMweb source"
        if counts.reports and scores["image"].map(dicomweb.is_dicomweb).any()
        else storage.join(output, SR_FOLDER)
    )
    log.info("DICOM SR: %d studies reported (%d instances) → %s; no SR for %d non-DICOM inputs, %d rows with errors, %d studies all errors%s",
             counts.reports, counts.instances, where, counts.not_dicom, counts.error_rows, counts.studies_all_errors,
             "".join(f", {n} {why}" for why, n in counts.failed.items()))  # fmt: skip
    return counts.reports, asdict(counts)
