"""Hostile input: every kind of bad row lands in the quarantine with its reason, the job goes on,
and the count balances; no DICOM header value reaches a log, an exception or the quarantine."""

import io
import logging
import re
import struct
import warnings
import zlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.uid import JPEG2000Lossless

from bombs import deflated_dicom, png_16bit
from dicom_files import PATIENT_ID, PATIENT_NAME, dataset, gradient, to_bytes
from medray.config import ColumnsConfig, build_config
from medray.data.datasets import Options, ingest_folder, ingest_table, pseudonym
from medray.data.datasets.ingest import _inspect  # the per-file function of ingest's Ray Data pass
from medray.data.manifest import read_manifest
from medray.evaluation.predict import decode_batch
from medray.io.images import MAX_BYTES, ImageError, decode
from medray.scoring.score import score
from medray.training import checkpoint
from medray.training.models import build_model


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


SECRET = "SECRET-Zebulon-7Q4X"


def broken_dicom_with_malformed_headers() -> tuple[bytes, bytes, str]:
    """A good and a broken DICOM whose StudyInstanceUID is not a valid UID and carries SECRET, as does
    an over-long AccessionNumber: values that pydicom's validation would quote in a warning."""
    uid = f"1.2.840.{SECRET}"
    tags = {"StudyInstanceUID": uid, "AccessionNumber": SECRET * 3}
    with pydicom_config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = to_bytes(dataset(gradient(), **tags))
        broken = dataset(gradient(64), **tags)
        broken.PixelData = broken.PixelData[:100]
        return good, to_bytes(broken), uid


def test_a_malformed_header_value_never_reaches_a_warning_a_log_an_exception_or_the_quarantine(tmp_path, ray_session, caplog, capfd):
    good, broken, uid = broken_dicom_with_malformed_headers()
    for folder, name, data in (("normal", "good.dcm", good), ("abnormal", "broken.dcm", broken)):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / name).write_bytes(data)
    salt = "a-secret-salt-for-tests"
    options = Options(pseudonymise=True, salt=salt, ids_from_dicom=True)
    files = [str(tmp_path / "in" / "normal" / "good.dcm"), str(tmp_path / "in" / "abnormal" / "broken.dcm")]

    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, even one already shown once in this process
        result = ingest_folder(str(tmp_path / "in"), str(tmp_path / "m.parquet"), options=options)
        direct = [_inspect(uri, True, salt.encode()) for uri in files]  # in this process: its warnings are caught
        scored = decode_batch({"image": np.array(files, dtype=object)}, size=16, channels=1)
    frame = read_manifest(result.manifest).frame
    quarantine = pd.read_parquet(result.quarantine)

    assert frame["study_id"].tolist() == [pseudonym(uid, salt.encode())]
    assert direct[0] == ("", pseudonym(PATIENT_ID, salt.encode()), pseudonym(uid, salt.encode()))
    assert "broken.dcm: cannot decode DICOM pixel data" in quarantine["reason"].item() == direct[1][0] == scored["error"][1]
    seen = "\n".join([caplog.text, *capfd.readouterr(), *(str(w.message) for w in caught), *quarantine["reason"],
                      frame.to_csv(), repr(direct), repr(list(scored["error"]))])  # fmt: skip
    assert SECRET not in seen and uid not in seen and salt not in seen


LABELS = ["Mass", "Nodule"]
BOMBS = {  # file → what its refusal says; each is small on disk and really inflates to what it declares
    "frames.dcm": "64 frame(s) of 4096x4096 pixels x 1 sample(s) x 2 byte(s) = 2147483648 bytes of pixel data exceeds the limit",
    "rgb.dcm": "1 frame(s) of 20000x20000 pixels x 3 sample(s) x 1 byte(s) = 1200000000 bytes of pixel data exceeds the limit",
    "liar.dcm": "deflated DICOM data inflates beyond 1052672 bytes, more than its header declares",
    "deep.png": "12000x12000 pixels of mode I;16 = 288000000 bytes exceeds the limit",
}


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory):
    """The issue's bombs, under 2.2 MB each, beside a good PNG and a good deflated DICOM."""
    root = tmp_path_factory.mktemp("bombs")
    files = {
        "frames.dcm": deflated_dicom(4096, 4096, frames=64, bits=16),  # 2 GB inflated
        "rgb.dcm": deflated_dicom(20_000, 20_000, samples=3),  # 1.2 GB inflated
        "liar.dcm": deflated_dicom(64, 64, body_frames=100_000),  # says 4 KB, inflates to 410 MB
        "deep.png": png_16bit(12_000, 12_000),  # 288 MB decoded, under Pillow's own pixel guard
        "good.png": png(gradient()),
        "good.dcm": deflated_dicom(64, 64, frames=3, bits=16),
    }
    for name, data in files.items():
        assert len(data) < 2_200_000
        (root / name).write_bytes(data)
    return root


def test_decompression_bombs_are_refused_from_their_headers_before_anything_is_inflated(bomb_folder):
    for name, why in BOMBS.items():
        with pytest.raises(ImageError, match=re.escape(f"{name}: {why}")):
            decode((bomb_folder / name).read_bytes(), name)
    assert decode((bomb_folder / "good.dcm").read_bytes(), "good.dcm").shape == (64, 64)
    assert MAX_BYTES == 256 * 1024 * 1024


def test_decompression_bombs_get_their_quarantine_entry_in_ingest_and_their_error_row_in_scoring(bomb_folder, tmp_path, ray_session):
    files = sorted(p.name for p in bomb_folder.iterdir())
    table = pd.DataFrame({"file": [str(bomb_folder / f) for f in files], "patient": [f"p{i}" for i in range(len(files))], "Mass": 1})
    table.to_csv(tmp_path / "labels.csv", index=False)
    result = ingest_table(str(tmp_path / "labels.csv"), str(tmp_path / "m.parquet"), ColumnsConfig(image="file", patient="patient", labels=["Mass"]))
    quarantine = pd.read_parquet(result.quarantine)
    reasons = dict(zip(quarantine["image"].str.rsplit("/", n=1).str[-1], quarantine["reason"]))
    assert sorted(read_manifest(result.manifest).frame["image"].str.rsplit("/", n=1).str[-1]) == ["good.dcm", "good.png"]

    torch.manual_seed(0)
    (tmp_path / "model").mkdir()
    meta = {"backbone": "resnet18", "labels": LABELS, "task": "multi-label", "in_channels": 1, "image_size": 32}
    checkpoint.save(str(tmp_path / "model"), {"model": build_model("resnet18", len(LABELS), 1).state_dict()}, meta)
    config = build_config({"name": "bombs", "storage": str(tmp_path / "runs"), "score": {
        "input": str(bomb_folder), "output": str(tmp_path / "scores"), "checkpoint": str(tmp_path / "model")}})  # fmt: skip
    summary = score(config)
    rows = pq.ParquetDataset(summary.output).read().to_pandas()
    errors = dict(zip(rows["image"].str.rsplit("/", n=1).str[-1], rows["error"]))

    assert (summary.inputs, summary.errors) == (6, 4) and sorted(errors) == files
    for name, why in BOMBS.items():
        expected = f"{bomb_folder / name}: {why}" + (f" of {MAX_BYTES}" if why.endswith("limit") else "")
        assert reasons[name] == errors[name] == expected
    probs = dict(zip(errors, rows["prob_Mass"].to_numpy(float)))
    assert errors["good.png"] == errors["good.dcm"] == "" and 0 <= probs["good.png"] <= 1 and 0 <= probs["good.dcm"] <= 1
    assert np.isnan([probs[name] for name in BOMBS]).all()
