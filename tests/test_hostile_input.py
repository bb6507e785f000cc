"""Hostile input: every kind of bad row lands in the quarantine with its reason, the job goes on,
and the count balances; no DICOM header value reaches a log, an exception or the quarantine."""

import io
import logging
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from dicom_files import PATIENT_ID, PATIENT_NAME, dataset, gradient, to_bytes
from medray.config import ColumnsConfig
from medray.data.datasets import Options, ingest_folder, ingest_table, pseudonym
from medray.data.manifest import read_manifest
from medray.io.images import ImageError, decode


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with no pixel data: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def broken_dicom() -> bytes:
    """A valid DICOM header whose pixel data is cut short."""
    ds = dataset(gradient(64))
    ds.PixelData = ds.PixelData[:100]
    return to_bytes(ds)


CASES = {  # file → (bytes or None for "not on disk", label, patient, expected reason)
    "good1.png": (png(gradient()), "1", "p1", None),
    "good2.dcm": (to_bytes(dataset(gradient())), "0", "p2", None),
    "zero.png": (b"", "1", "p3", "empty file"),
    "truncated.png": (png(gradient(64))[:60], "0", "p4", "cannot decode"),
    "not_an_image.png": (b"Patient,Finding\nsomeone,Mass\n", "0", "p5", "not a readable image"),
    "bomb.png": (png_header_only(30_000, 30_000), "0", "p6", "exceeds the limit"),
    "broken.dcm": (broken_dicom(), "1", "p7", "cannot decode DICOM pixel data"),
    "header_only.dcm": (to_bytes(dataset(gradient()))[:300], "0", "p8", "DICOM file holds no pixel data"),
    "missing.png": (None, "1", "p9", "image file not found"),
    "maybe.png": (png(gradient()), "2", "p10", "unknown label value"),
    "nobody.png": (png(gradient()), "1", "", "missing patient id"),
}


@pytest.fixture(scope="module")
def hostile_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for name, (data, *_rest) in CASES.items():
        if data is not None:
            (root / name).write_bytes(data)
    rows = [{"file": name, "patient": patient, "Mass": label} for name, (_, label, patient, _r) in CASES.items()]
    rows.append({"file": "good1.png", "patient": "p1", "Mass": "1"})  # a duplicate row
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_every_bad_row_is_quarantined_with_its_reason_and_the_count_balances(
    hostile_table, tmp_path, ray_session, caplog
):
    columns = ColumnsConfig(image="file", patient="patient", labels=["Mass"])
    with caplog.at_level(logging.INFO, logger="medray"):
        result = ingest_table(str(hostile_table / "labels.csv"), str(tmp_path / "m.parquet"), columns)

    quarantine = pd.read_parquet(result.quarantine)
    reasons = (
        quarantine.assign(file=quarantine["image"].str.rsplit("/", n=1).str[-1]).groupby("file")["reason"].apply(list)
    )
    for name, (*_, expected) in CASES.items():
        if expected is not None:
            assert len(reasons[name]) == 1 and expected in reasons[name][0], (name, reasons.get(name))
    assert reasons["good1.png"] == ["duplicate row: the same image is listed more than once (the first row is kept)"]
    kept = read_manifest(result.manifest).frame
    assert sorted(kept["image"].str.rsplit("/", n=1).str[-1]) == ["good1.png", "good2.dcm"]
    assert result.rows_in == len(CASES) + 1 == result.images + result.quarantined
    assert f"{result.rows_in} in = 2 kept + {len(CASES) - 1} quarantined" in caplog.text


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    """Two classes of DICOMs carrying distinctive PatientName/PatientID, one of them broken."""
    root = tmp_path_factory.mktemp("dicoms")
    for cls in ("normal", "abnormal"):
        (root / cls).mkdir()
    (root / "normal" / "a.dcm").write_bytes(to_bytes(dataset(gradient())))
    compressed = dataset(gradient())
    compressed.compress(JPEG2000Lossless)
    (root / "abnormal" / "b.dcm").write_bytes(to_bytes(compressed))
    (root / "abnormal" / "c.dcm").write_bytes(broken_dicom())
    (root / "abnormal" / "d.dcm").write_bytes(to_bytes(dataset(gradient(), PatientID="")))
    return root


def test_patient_ids_from_dicom_headers_are_pseudonymised_and_never_logged(
    dicom_folder, tmp_path, ray_session, caplog, capfd
):
    salt = "a-secret-salt-for-tests"
    options = Options(pseudonymise=True, salt=salt, ids_from_dicom=True)
    with caplog.at_level(logging.DEBUG):
        result = ingest_folder(str(dicom_folder), str(tmp_path / "m.parquet"), options=options)
        errors = []
        for name in ("abnormal/c.dcm", "abnormal/d.dcm"):
            try:
                decode((dicom_folder / name).read_bytes(), name)
            except ImageError as err:
                errors.append(str(err))
    frame = read_manifest(result.manifest).frame
    quarantine = pd.read_parquet(result.quarantine)

    assert frame["patient_id"].tolist() == [pseudonym(PATIENT_ID, salt.encode())] * 2
    reasons = dict(zip(quarantine["image"].str.rsplit("/", n=1).str[-1], quarantine["reason"]))
    assert reasons["d.dcm"] == "missing patient id"  # the header is the source: no file-name fallback
    assert "cannot decode DICOM pixel data" in reasons["c.dcm"]
    assert len(quarantine) == 2 and result.balance == "4 in = 2 kept + 2 quarantined"
    assert len(errors) == 1  # the broken one; the one without a PatientID decodes fine

    seen = "\n".join([caplog.text, *capfd.readouterr(), *errors, *quarantine["reason"], frame.to_csv()])
    for secret in (PATIENT_ID, PATIENT_NAME, *PATIENT_NAME.split("^"), salt):
        assert secret not in seen


def test_the_salt_is_never_saved_with_the_config(tmp_path):
    from medray.config import build_config, save_config

    salted = build_config(overrides=["ingest.salt=do-not-write-me"])
    save_config(salted, str(tmp_path / "saved.yaml"))
    assert "do-not-write-me" not in (tmp_path / "saved.yaml").read_text() and "do-not-write-me" not in repr(salted)


def test_an_ingest_with_no_usable_row_says_so_and_still_writes_the_quarantine(tmp_path):
    pd.DataFrame({"image": ["a.png", "b.png"], "patient_id": ["p", "q"], "Mass": [1, 0]}).to_csv(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="no usable rows \\(2 in = 0 kept \\+ 2 quarantined"):
        ingest_table(str(tmp_path / "t.csv"), str(tmp_path / "m.parquet"), ColumnsConfig(labels=["Mass"]))
    assert pd.read_parquet(tmp_path / "m.quarantine.parquet")["reason"].tolist() == ["image file not found"] * 2
