"""A PACS as a source: a real Orthanc, listed with QIDO-RS page by page, each instance fetched with WADO-RS by the
Ray task that decodes it; ingest and exactly-once scoring over DICOMweb; a PACS that refuses or is not there."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydicom.uid import generate_uid

import dicom_files
from checkpoints import saved_checkpoint
from killed_scoring import kill_after_two_parts
from medray.config import build_config
from medray.data.datasets import ingest
from medray.data.datasets.ingest import pseudonym
from medray.data.datasets.keys import resolve
from medray.data.manifest import read_manifest
from medray.io import dicomweb, listing
from medray.io.dicomweb import DicomWebError
from medray.io.pacs import iter_instances
from medray.scoring.score import COMMITTED, score

LABELS = ["Effusion", "Nodule"]
IN_2019 = "StudyDate=20190101-20191231&ModalitiesInStudy=CR,DX"


@dataclass(frozen=True)
class Stored:
    uri: str
    patient: str
    study: str
    accession: str
    modality: str
    date: str
    orthanc_id: str


def _study(pacs, folder: Path, patient: str, accession: str, date: str, modality: str, instances: int, corrupt=False) -> list[Stored]:
    """One study of one series, uploaded through Orthanc's own REST API (not through medray)."""
    study, series, stored = generate_uid(), generate_uid(), []
    for i in range(instances):
        pixels = np.roll(dicom_files.gradient(48), 7 * i, axis=1)
        ds = dicom_files.dataset(pixels, PatientID=patient, StudyInstanceUID=study, SeriesInstanceUID=series,
                                 AccessionNumber=accession, StudyDate=date)  # fmt: skip
        ds.Modality = modality
        if corrupt:  # Orthanc stores it; its pixel data is a third of what Rows x Columns declare
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(dicom_files.to_bytes(ds))
        answer = pacs.upload(path)
        uri = dicomweb.instance_uri(dicomweb.parse(pacs.uri), study, series, ds.SOPInstanceUID)
        stored.append(Stored(uri, patient, study, accession, modality, date, answer["ID"]))
    return stored


@pytest.fixture(scope="module")
def archive(orthanc, pacs_credentials, tmp_path_factory):
    """What the PACS holds, by the group each test chooses with its filters."""
    folder = tmp_path_factory.mktemp("dicom")
    groups = {
        "2019": [  # CR and DX studies of 2019: what ingest chooses
            *_study(orthanc, folder, "PID-ALPHA-001", "ACC-1", "20190314", "CR", 3),
            *_study(orthanc, folder, "PID-ALPHA-001", "ACC-2", "20190902", "DX", 2),
            *_study(orthanc, folder, "PID-BRAVO-002", "ACC-3", "20190520", "CR", 1),
            *_study(orthanc, folder, "PID-CHARLIE-003", "ACC-4", "20191111", "DX", 2),
            *_study(orthanc, folder, "PID-CHARLIE-003", "ACC-5", "20190101", "CR", 1),
        ],
        "ct 2019": _study(orthanc, folder, "PID-BRAVO-002", "ACC-6", "20190601", "CT", 2),
        "cr 2018": _study(orthanc, folder, "PID-DELTA-004", "ACC-7", "20180601", "CR", 2),
        "corrupt": _study(orthanc, folder, "PID-ECHO-005", "ACC-8", "20210101", "CR", 1, corrupt=True),
        "mammography": [s for i in range(12) for s in _study(orthanc, folder, f"PID-MG-{i}", f"ACC-MG-{i}", "20230301", "MG", 4)],
    }
    return groups


def test_qido_pages_list_each_chosen_instance_exactly_once(orthanc, archive, monkeypatch):
    page = orthanc.request("GET", "/dicom-web/instances?limit=2")
    assert len(page) == 2  # the server honours limit, so a page size of 2 pages through this archive
    monkeypatch.setenv(dicomweb.PAGE_SIZE_ENV, "2")

    chosen = [entry.uri for entry in listing.walk(f"{orthanc.uri}?{IN_2019}")]
    assert sorted(chosen) == sorted(s.uri for s in archive["2019"])
    assert len(set(chosen)) == len(chosen) == 9

    everything = [instance.uri for instance in iter_instances(orthanc.uri)]
    assert len(everything) == len(set(everything)) == sum(len(g) for g in archive.values())
    assert [i.uri for i in iter_instances(orthanc.uri)] == everything  # the order is the same every time

    # A series-level filter applies to each chosen study's instances; a tag may be written as its number.
    dx = [entry.uri for entry in listing.walk(f"{orthanc.uri}?StudyDate=20190101-20191231&00080060=DX")]
    assert sorted(dx) == sorted(s.uri for s in archive["2019"] if s.modality == "DX")


def labels_table(path: Path, archive, key: str) -> Path:
    """Labels as a hospital exports them: one row per study (or instance), by accession number or UID; the last
    2019 study has no row."""
    rows, seen = [], set()
    for s in archive["2019"][:-1]:
        value = {"AccessionNumber": s.accession, "StudyInstanceUID": s.study, "SOPInstanceUID": s.uri.rsplit("/", 1)[1]}[key]
        if value not in seen:
            seen.add(value)
            rows.append({key: value, "Effusion": int(s.accession in ("ACC-1", "ACC-4")), "Nodule": int(s.modality == "DX")})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("key", ["AccessionNumber", "StudyInstanceUID"])
def test_ingest_over_dicomweb_takes_pseudonymised_ids_from_headers_and_labels_by_key(orthanc, archive, ray_session, tmp_path, key):
    table = labels_table(tmp_path / "labels.csv", archive, key)
    config = build_config({"dicomweb": {"labels": str(table), "label_key": key}})
    out = str(tmp_path / "manifest.parquet")

    result = ingest(f"{orthanc.uri}?{IN_2019}", out, config.ingest, config.dicomweb)

    manifest = read_manifest(out)
    frame = manifest.frame.set_index("image")
    unlabelled = archive["2019"][-1]
    assert manifest.labels == LABELS and result.balance == "9 in = 8 kept + 1 quarantined"
    assert set(frame.index) == {s.uri for s in archive["2019"]} - {unlabelled.uri}
    salt, _ = resolve(None, None, out)
    for s in archive["2019"][:-1]:
        row = frame.loc[s.uri]
        assert row["patient_id"] == pseudonym(s.patient, salt) and row["study_id"] == pseudonym(s.study, salt)
        assert (row["Effusion"], row["Nodule"]) == (float(s.accession in ("ACC-1", "ACC-4")), float(s.modality == "DX"))
    quarantine = pd.read_parquet(result.quarantine)
    assert quarantine["image"].tolist() == [unlabelled.uri]
    assert f"no row in the labels table {table} for its {key}" in quarantine["reason"].iloc[0]
    text = manifest.frame.to_csv() + quarantine.to_csv()
    assert not any(s.patient in text for s in archive["2019"])  # no real patient ID in either output


def test_ingesting_a_pacs_without_a_labels_table_says_what_to_set(orthanc, archive, tmp_path):
    config = build_config({})
    with pytest.raises(ValueError, match=r"needs a labels table: set dicomweb\.labels to .* AccessionNumber .*score\.input: dicomweb://"):
        ingest(f"{orthanc.uri}?{IN_2019}", str(tmp_path / "m.parquet"), config.ingest, config.dicomweb)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", LABELS)


def job(tmp_path, model: str, source: str, output: Path, **score_settings):
    return build_config({"name": "score", "storage": str(tmp_path / "runs"),
                         "score": {"input": source, "output": str(output), "checkpoint": model, **score_settings}})  # fmt: skip


def rows(output: Path) -> pd.DataFrame:
    return pq.ParquetDataset(str(output)).read().to_pandas()


def test_scoring_a_pacs_gives_one_row_per_instance_and_a_corrupt_one_its_error(orthanc, archive, ray_session, model_dir, tmp_path):
    summary = score(job(tmp_path, model_dir, f"{orthanc.uri}?ModalitiesInStudy=CR,DX", tmp_path / "scores", part_size=4))

    scored = rows(tmp_path / "scores").set_index("image")
    expected = {s.uri for s in archive["2019"] + archive["cr 2018"] + archive["corrupt"]}
    assert set(scored.index) == expected and len(scored) == len(expected) == summary.inputs == 12
    corrupt = archive["corrupt"][0].uri
    assert summary.errors == 1 and "cannot decode DICOM pixel data" in scored.loc[corrupt, "error"]
    good = scored.drop(index=corrupt)
    assert (good["error"] == "").all() and good[[f"prob_{label}" for label in LABELS]].notna().all().all()


def test_an_instance_deleted_from_the_pacs_since_it_was_listed_is_an_error_row(orthanc, archive, ray_session, model_dir, tmp_path):
    (deleted,) = _study(orthanc, tmp_path, "PID-FOXTROT-006", "ACC-9", "20220101", "OT", 1)
    manifest = tmp_path / "listed.parquet"
    pd.DataFrame({"image": [archive["2019"][0].uri, deleted.uri, archive["2019"][1].uri]}).to_parquet(manifest)
    orthanc.request("DELETE", f"/instances/{deleted.orthanc_id}")

    summary = score(job(tmp_path, model_dir, str(manifest), tmp_path / "scores"))

    scored = rows(tmp_path / "scores")
    assert scored["image"].tolist() == [archive["2019"][0].uri, deleted.uri, archive["2019"][1].uri]
    assert (
        summary.errors == 1
        and scored["error"].iloc[1] == f"{deleted.uri}: no such instance on the PACS (HTTP 404; deleted since it was listed?)"
    )


def test_a_killed_scoring_run_over_dicomweb_rerun_scores_every_instance_exactly_once(orthanc, archive, ray_session, model_dir, tmp_path):
    source, output = f"{orthanc.uri}?ModalitiesInStudy=MG", tmp_path / "scores"
    overrides = [f"storage={tmp_path / 'runs'}", f"score.input={source}", f"score.output={output}",
                 f"score.checkpoint={model_dir}", "score.part_size=2", "score.batch_size=2"]  # fmt: skip
    before = kill_after_two_parts(ray_session, output, overrides, tmp_path / "killed.log")
    committed = output / COMMITTED
    assert 2 <= len(before) < 24, "the job must be killed part-way for this test to mean anything"

    summary = score(job(tmp_path, model_dir, source, output, part_size=2, batch_size=2))

    scored = rows(output)
    assert len(scored) == 48 and set(scored["image"]) == {s.uri for s in archive["mammography"]}  # nothing missing, nothing twice
    assert summary.parts_skipped == len(before) and summary.inputs == 48 and summary.errors == 0
    after = {p.name: p.stat().st_mtime_ns for p in committed.glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items()), "a committed part was scored again"


def test_wrong_credentials_are_one_line_naming_the_service_and_the_variable(orthanc, archive, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDRAY_DICOMWEB_AUTHORIZATION", "Basic bWVkcmF5Ondyb25nLXBhc3N3b3Jk")
    config = build_config({"dicomweb": {"labels": str(labels_table(tmp_path / "l.csv", archive, "AccessionNumber"))}})
    with pytest.raises(DicomWebError) as raised:
        ingest(f"{orthanc.uri}?PatientID=PID-ALPHA-001", str(tmp_path / "m.parquet"), config.ingest, config.dicomweb)
    assert str(raised.value) == (
        f"DICOMweb service {orthanc.dicomweb} refused the request (HTTP 401): check the credentials in $MEDRAY_DICOMWEB_AUTHORIZATION"
    )
    monkeypatch.delenv("MEDRAY_DICOMWEB_AUTHORIZATION")
    with pytest.raises(DicomWebError, match=r"\$MEDRAY_DICOMWEB_AUTHORIZATION is not set"):
        list(iter_instances(orthanc.uri))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free once closed: nothing listens there


def test_an_unreachable_pacs_fails_scoring_with_one_line_naming_the_service(ray_session, model_dir, tmp_path):
    service = f"127.0.0.1:{_closed_port()}/dicom-web"
    with pytest.raises(DicomWebError) as raised:
        score(job(tmp_path, model_dir, f"dicomweb://{service}?PatientID=PID-ALPHA-001", tmp_path / "scores"))
    message = str(raised.value)
    assert message.startswith(f"DICOMweb service http://{service} did not connect or answer") and "\n" not in message
    assert "PID-ALPHA-001" not in message  # a filter's value (here a patient ID) is never part of a message
