"""score.dicom_sr: one DICOM Structured Report per scored study, back where the images came from.

A folder's SRs are files under <output>/_dicom_sr/; a PACS's are stored in it with STOW-RS (a real Orthanc).
Each SR is read back with pydicom, and checked against the Parquet output: the references resolve to the
scored instances, the numbers are the scores, Present/Absent follows the threshold — and a rerun adds nothing.

SRs are built on the driver (a thread pool), so the PACS's Authorization header need only be in the driver's
environment: the Orthanc test sets it with monkeypatch, no Ray worker is involved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

from checkpoints import saved_checkpoint
from dicom_files import PATIENT_ID, PATIENT_NAME, dataset, gradient, to_bytes
from medray.config import build_config
from medray.io import dicomweb
from medray.io.dicomweb import instance_uri
from medray.scoring.score import SUMMARY, score
from medray.scoring.structured_report import SR_FOLDER, Model, report_uids, write_reports
from medray.scoring.thresholds import frozen_thresholds
from test_score_at_scale import read_rows

LABELS = ["Effusion", "Mass"]
STUDIES = {"A": 2, "B": 1, "C": 1}  # study → DICOM instances in it


def pixels(seed: int) -> np.ndarray:
    """Different pictures, so that an untrained model gives them different scores."""
    if seed == 0:
        return gradient()
    return np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Three studies of DICOM files (study A of two instances), a PNG and a .dcm that is not DICOM."""
    folder = tmp_path_factory.mktemp("archive")
    n = 0
    for study, count in STUDIES.items():
        study_uid, series_uid = generate_uid(), generate_uid()
        for i in range(count):
            ds = dataset(pixels(n), StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
            (folder / f"{study}{i}.dcm").write_bytes(to_bytes(ds))
            n += 1
    Image.fromarray(gradient()).save(folder / "photo.png")
    (folder / "broken.dcm").write_bytes(b"no DICM preamble here")
    return folder


def headers(folder: Path) -> dict[str, pydicom.Dataset]:
    """The source files' headers by path (the test's own reading, not medray's)."""
    return {str(p): pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm")) if p.name != "broken.dcm"}


def job(tmp_path: Path, model: str, source: Path, output: Path, **score_section):
    return build_config({"name": "sr", "storage": str(tmp_path / "runs"),
                         "score": {"input": str(source), "output": str(output), "checkpoint": model, **score_section}})  # fmt: skip


def write_evaluation(run_dir: Path, model: str, thresholds: dict[str, float]) -> None:
    """What ``medray evaluate`` leaves for this model: ``metrics.json`` with a val-chosen threshold per label."""
    (run_dir / "evaluation").mkdir(parents=True, exist_ok=True)
    labels = {label: {"threshold": t, "auroc": 0.5} for label, t in thresholds.items()}
    (run_dir / "evaluation" / "metrics.json").write_text(json.dumps({"checkpoint": model, "labels": labels}))


def splitting(rows: pd.DataFrame) -> dict[str, float]:
    """Per label a threshold between the lowest and highest score, so that both verdicts occur."""
    return {label: float((rows[f"prob_{label}"].min() + rows[f"prob_{label}"].max()) / 2) for label in LABELS}


# ---- reading an SR with pydicom alone ------------------------------------------------------------------


def text(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def findings(sr: pydicom.Dataset) -> list[dict]:
    """One dict per measurement group of a TID 1500 report: finding, instance, probability, threshold, verdict."""
    [measurements] = [item for item in sr.ContentSequence if text(item) == "Imaging Measurements"]
    found = []
    for group in measurements.ContentSequence:
        row = {"parameters": []}
        for item in group.ContentSequence:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "NUM":
                row[name.CodeValue] = item.MeasuredValueSequence[0].FloatingPointValue
            elif item.ValueType == "IMAGE":
                row["sop"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                row["sop_class"] = item.ReferencedSOPSequence[0].ReferencedSOPClassUID
            elif item.ValueType == "CODE" and name.CodingSchemeDesignator == "99MEDRAY":
                row["label"], row["verdict"] = name.CodeMeaning, item.ConceptCodeSequence[0].CodeMeaning
            elif text(item) == "Algorithm Version":
                row["version"] = item.TextValue
            elif text(item) == "Algorithm Parameters":
                row["parameters"].append(item.TextValue)
        found.append(row)
    return found


def evidence(sr: pydicom.Dataset) -> set[tuple[str, str, str]]:
    return {(study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}  # fmt: skip


def check_report(sr: pydicom.Dataset, sources: list[pydicom.Dataset], scores: pd.DataFrame, thresholds, model_sha256: str):
    """``sr`` is the one SR of the study of ``sources`` (headers), whose rows in ``scores`` are indexed by SOP UID."""
    study = sources[0].StudyInstanceUID
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.Modality == "SR"
    assert (sr.StudyInstanceUID, sr.PatientName, sr.PatientID) == (study, PATIENT_NAME, PATIENT_ID)  # filed with its study
    assert evidence(sr) == {(study, s.SeriesInstanceUID, s.SOPInstanceUID) for s in sources}
    rows = findings(sr)
    assert sorted((r["sop"], r["label"]) for r in rows) == sorted((s.SOPInstanceUID, label) for s in sources for label in LABELS)
    classes = {s.SOPInstanceUID: s.SOPClassUID for s in sources}
    for r in rows:
        assert r["sop_class"] == classes[r["sop"]]
        assert np.float32(r["probability"]) == scores.loc[r["sop"], f"prob_{r['label']}"]
        assert r["threshold"] == pytest.approx(thresholds[r["label"]], abs=1e-12)
        assert r["verdict"] == ("Present" if r["probability"] >= r["threshold"] else "Absent")
        assert r["version"] == model_sha256 and f"model_sha256={model_sha256}" in r["parameters"]
    return rows


# ---- a folder of DICOM files ------------------------------------------------------------------------------


def test_a_folder_gets_one_sr_file_per_study_with_the_scores_and_the_val_thresholds(ray_session, archive, tmp_path):
    model = saved_checkpoint(tmp_path / "checkpoint", LABELS)
    output = tmp_path / "scores"
    first = score(job(tmp_path, model, archive, output))
    rows = read_rows(first.output)
    sources = headers(archive)
    scored = rows[rows["image"].isin(sources)]
    thresholds = splitting(scored)
    write_evaluation(tmp_path / "runs" / "sr", model, thresholds)

    summary = score(job(tmp_path, model, archive, output, dicom_sr=True))  # the scores are complete: only the SRs are new

    reports = sorted((output / SR_FOLDER).glob("*.dcm"))
    assert summary.dicom_sr == len(reports) == len(STUDIES)
    counts = json.loads((output / SUMMARY).read_text())["dicom_sr_counts"]
    statistics = json.loads((output / SUMMARY).read_text())["statistics"]  # drift's share above threshold: the same cut
    assert {label: statistics["labels"][label]["threshold"] for label in LABELS} == pytest.approx(thresholds)
    assert statistics["threshold_rule"] == "chosen on the validation split by medray evaluate"
    assert (counts["instances"], counts["not_dicom"], counts["error_rows"]) == (4, 1, 1)  # photo.png, broken.dcm
    by_sop = scored.assign(sop=scored["image"].map(lambda p: sources[p].SOPInstanceUID)).set_index("sop")
    verdicts = []
    for path in reports:
        sr = pydicom.dcmread(path)
        study = [s for s in sources.values() if s.StudyInstanceUID == sr.StudyInstanceUID]
        verdicts += [r["verdict"] for r in check_report(sr, study, by_sop, thresholds, first.model_sha256)]
        assert path.name == f"{sr.SOPInstanceUID}.dcm"
    assert set(verdicts) == {"Present", "Absent"}  # the thresholds were applied, not a constant verdict

    uids = [(sr.SeriesInstanceUID, sr.SOPInstanceUID) for sr in map(pydicom.dcmread, reports)]
    again = score(job(tmp_path, model, archive, output, dicom_sr=True))
    assert again.dicom_sr == len(STUDIES)
    assert sorted((output / SR_FOLDER).iterdir()) == reports  # the same SOP Instance UIDs: replaced, not added
    assert [(sr.SeriesInstanceUID, sr.SOPInstanceUID) for sr in map(pydicom.dcmread, reports)] == uids


def test_without_an_evaluation_of_this_model_the_threshold_is_one_half_and_the_sr_says_so(tmp_path):
    model = saved_checkpoint(tmp_path / "checkpoint", LABELS)
    thresholds, rule = frozen_thresholds(str(tmp_path / "run"), model, "0" * 64, LABELS, "multi-label", False)
    assert thresholds == {"Effusion": 0.5, "Mass": 0.5} and "no evaluation" in rule

    other = saved_checkpoint(tmp_path / "other", LABELS)
    write_evaluation(tmp_path / "run", other, {"Effusion": 0.2, "Mass": 0.7})
    thresholds, rule = frozen_thresholds(str(tmp_path / "run"), model, "0" * 64, LABELS, "multi-label", False)
    assert thresholds == {"Effusion": 0.5, "Mass": 0.5} and "another model" in rule


def test_val_thresholds_are_mapped_through_the_calibration_the_scores_went_through(tmp_path):
    model = saved_checkpoint(tmp_path / "checkpoint", LABELS)
    outputs = [{"method": "platt", "slope": 2.0, "intercept": 0.5}, {"method": "none"}]
    (Path(model) / "calibration.json").write_text(json.dumps({"version": 2, "task": "multi-label", "outputs": outputs}))
    write_evaluation(tmp_path / "run", model, {"Effusion": 0.3, "Mass": 0.7})

    thresholds, rule = frozen_thresholds(str(tmp_path / "run"), model, "0" * 64, LABELS, "multi-label", True)

    assert thresholds["Effusion"] == pytest.approx(1 / (1 + np.exp(-(2.0 * np.log(0.3 / 0.7) + 0.5))))
    assert thresholds["Mass"] == pytest.approx(0.7) and "mapped through calibration" in rule
    thresholds, rule = frozen_thresholds(str(tmp_path / "run"), model, "0" * 64, LABELS, "multi-class", True)
    assert thresholds == {"Effusion": 0.5, "Mass": 0.5} and "calibrated multi-class" in rule


# ---- a PACS over DICOMweb ------------------------------------------------------------------------------------


def pacs_client(pacs) -> DICOMwebClient:
    """The test's own DICOMweb client (not medray's), to read back what medray stored."""
    return DICOMwebClient(url=pacs.dicomweb, headers={"Authorization": pacs.authorization})


def stored_reports(pacs, study: str) -> list[pydicom.Dataset]:
    web = pacs_client(pacs)
    found = web.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    return [web.retrieve_instance(study, pydicom.Dataset.from_json(f).SeriesInstanceUID, pydicom.Dataset.from_json(f).SOPInstanceUID)
            for f in found]  # fmt: skip


def test_a_pacs_gets_one_sr_per_study_by_stow_rs_and_storing_again_keeps_one(orthanc, archive, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(dicomweb.AUTHORIZATION_ENV, orthanc.authorization)
    sources = headers(archive)
    for path in sources:
        orthanc.upload(Path(path))
    service = dicomweb.parse(orthanc.uri)
    uri = {p: instance_uri(service, s.StudyInstanceUID, s.SeriesInstanceUID, s.SOPInstanceUID) for p, s in sources.items()}
    rng = np.random.default_rng(0)
    # A score output of these instances as a DICOMweb source's listing names them, plus one row of a study
    # whose every row failed: it gets no SR.
    scores = pd.DataFrame(
        {"image": list(uri.values()), "error": "", **{f"prob_{label}": rng.random(len(uri)).astype("float32") for label in LABELS}}
    )
    failed = instance_uri(service, generate_uid(), generate_uid(), generate_uid())
    scores.loc[len(scores)] = {"image": failed, "error": f"{failed}: HTTP 404", "prob_Effusion": np.nan, "prob_Mass": np.nan}
    thresholds = {"Effusion": 0.5, "Mass": float(scores["prob_Mass"].median())}
    model = Model("resnet18 · sr", "ab" * 32, thresholds, "chosen on the validation split by medray evaluate")

    with caplog.at_level(logging.DEBUG):
        counts = write_reports(scores, model, str(tmp_path / "unused"))
    assert (counts.reports, counts.instances, counts.error_rows, counts.studies_all_errors, counts.failed) == (3, 4, 1, 1, {})
    assert not (tmp_path / "unused").exists()  # a PACS's SRs go to the PACS
    # No log line names the patient; medray's own name no UID either (DICOMweb libraries log URLs, which hold UIDs).
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("medray"))
    assert not any(s.StudyInstanceUID in ours or s.SOPInstanceUID in ours for s in sources.values())

    by_sop = scores.iloc[:-1].assign(sop=[s.SOPInstanceUID for s in sources.values()]).set_index("sop")
    studies = {s.StudyInstanceUID for s in sources.values()}
    stored = {}
    for study in studies:
        [sr] = stored_reports(orthanc, study)  # in the source study
        stored[study] = sr.SOPInstanceUID
        check_report(sr, [s for s in sources.values() if s.StudyInstanceUID == study], by_sop, thresholds, model.sha256)

    assert write_reports(scores, model, str(tmp_path / "unused")).reports == 3
    for study in studies:
        assert [sr.SOPInstanceUID for sr in stored_reports(orthanc, study)] == [stored[study]]
    assert len(orthanc.instances()) == len(sources) + len(studies)


def test_scoring_a_pacs_end_to_end_stores_each_study_an_sr_that_matches_the_parquet_rows(orthanc, archive, ray_session, tmp_path):
    """score.input is the PACS itself: listed by QIDO-RS, read by WADO-RS in Ray's tasks, scored, and each study's
    SR stored back by STOW-RS — the flow a hospital runs. Without an evaluation of the model, thresholds are 0.5."""
    sources = headers(archive)
    for path in sources:
        orthanc.upload(Path(path))  # uploading again keeps one copy: the SOP Instance UID is Orthanc's key
    model = saved_checkpoint(tmp_path / "checkpoint", LABELS)
    source = f"{orthanc.uri}?Modality=OT"  # the archive's images, not SRs an earlier test stored here

    summary = score(job(tmp_path, model, source, tmp_path / "scores", dicom_sr=True))

    rows = read_rows(summary.output)
    sop = rows["image"].map(lambda uri: dicomweb.parse_instance(uri)[3])
    assert sorted(sop) == sorted(s.SOPInstanceUID for s in sources.values()) and (rows["error"] == "").all()
    assert summary.dicom_sr == len(STUDIES)
    by_sop = rows.assign(sop=sop).set_index("sop")
    for study in {s.StudyInstanceUID for s in sources.values()}:
        ours = [sr for sr in stored_reports(orthanc, study) if sr.SeriesInstanceUID == report_uids(summary.model_sha256, study)[0]]
        assert len(ours) == 1
        check_report(ours[0], [s for s in sources.values() if s.StudyInstanceUID == study], by_sop,
                     dict.fromkeys(LABELS, 0.5), summary.model_sha256)  # fmt: skip

    held = len(orthanc.instances())
    assert score(job(tmp_path, model, source, tmp_path / "scores", dicom_sr=True)).dicom_sr == len(STUDIES)
    assert len(orthanc.instances()) == held  # the rerun stored the same SOP Instance UIDs: nothing twice
