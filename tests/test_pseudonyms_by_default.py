"""Patient and study IDs read from DICOM headers are pseudonymised unless the config says otherwise; the key
comes from the config, the environment or a key file made once, owner-only, outside the outputs, and
is never written to an output or a log. Every ingest says what it did with the IDs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dicom_files import PATIENT_ID, dataset, gradient, to_bytes
from medray.config import build_config
from medray.data.datasets import ingest, pseudonym
from medray.data.datasets.keys import SALT_ENV, KeyFileError, resolve
from medray.data.manifest import read_manifest

STUDY = "1.2.826.0.1.3680043.8.498.4242424242"


@pytest.fixture
def dicom_folder(tmp_path):
    """Two DICOM images of one patient and study, and a PNG whose patient is its file name."""
    root = tmp_path / "archive"
    for cls in ("normal", "abnormal"):
        (root / cls).mkdir(parents=True)
    (root / "normal" / "a.dcm").write_bytes(to_bytes(dataset(gradient(), StudyInstanceUID=STUDY)))
    (root / "abnormal" / "b.dcm").write_bytes(to_bytes(dataset(gradient(), StudyInstanceUID=STUDY)))
    Image.fromarray(gradient()).save(root / "abnormal" / "P-17.png")
    return root


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    path = tmp_path / "home" / ".config" / "medray" / "salt"
    monkeypatch.setenv("MEDRAY_SALT_FILE", str(path))
    return path


def folder_ingest(source, out, *settings):
    config = build_config(overrides=["ingest.format=folder", *settings])
    result = ingest(str(source), str(out), config.ingest)
    return result, read_manifest(result.manifest).frame.sort_values("image").reset_index(drop=True)


def test_a_default_ingest_stores_header_ids_as_pseudonyms_keyed_by_a_new_owner_only_key_file(dicom_folder, key_file, tmp_path, ray_session):
    result, frame = folder_ingest(dicom_folder, tmp_path / "out" / "manifest.parquet")

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_bytes().strip()
    assert len(key) == 64
    by_file = frame.set_index(frame["image"].str.rsplit("/", n=1).str[-1])
    assert by_file["patient_id"].to_dict() == {"P-17.png": "P-17", "a.dcm": pseudonym(PATIENT_ID, key), "b.dcm": pseudonym(PATIENT_ID, key)}
    assert by_file.loc[["a.dcm", "b.dcm"], "study_id"].tolist() == [pseudonym(STUDY, key)] * 2
    assert result.pseudonyms == (
        f"IDs from DICOM headers pseudonymised (2 images) with the key from {key_file}; "
        "IDs from the table or file names kept as they are (1 image; ingest.pseudonymise: true pseudonymises them too)"
    )
    for written in (tmp_path / "out").iterdir():
        assert PATIENT_ID.encode() not in written.read_bytes() and key not in written.read_bytes()


def test_the_key_file_is_reused_so_a_patient_keeps_their_pseudonym(dicom_folder, key_file, tmp_path, ray_session):
    _, first = folder_ingest(dicom_folder, tmp_path / "first.parquet")
    made = key_file.stat()
    _, second = folder_ingest(dicom_folder, tmp_path / "second.parquet")
    assert second["patient_id"].tolist() == first["patient_id"].tolist()
    assert (key_file.stat().st_mtime_ns, key_file.stat().st_ino) == (made.st_mtime_ns, made.st_ino)


def test_opting_out_keeps_header_ids_and_says_so(dicom_folder, key_file, tmp_path, ray_session):
    result, frame = folder_ingest(dicom_folder, tmp_path / "raw.parquet", "ingest.pseudonymise=false")
    assert frame["patient_id"].tolist() == ["P-17", PATIENT_ID, PATIENT_ID]  # abnormal/P-17.png, abnormal/b.dcm, normal/a.dcm
    assert result.pseudonyms == "IDs kept as they are (ingest.pseudonymise: false)"
    assert not key_file.exists()


def test_a_table_ingest_says_its_ids_are_kept_and_makes_no_key(tmp_path, key_file):
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / f"{name}.png")
    pd.DataFrame({"image": ["a.png", "b.png"], "patient_id": ["P-1", "P-2"], "Mass": [1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    config = build_config(overrides=["ingest.format=csv", "ingest.columns.labels=[Mass]", "ingest.check=false"])
    result = ingest(str(tmp_path / "t.csv"), str(tmp_path / "m.parquet"), config.ingest)
    assert read_manifest(result.manifest).frame["patient_id"].tolist() == ["P-1", "P-2"]
    assert (
        result.pseudonyms
        == "IDs from the table or file names kept as they are (2 images; ingest.pseudonymise: true pseudonymises them too)"
    )
    assert not key_file.exists()


def test_the_key_comes_from_the_config_then_the_environment_then_the_key_file(key_file, tmp_path, monkeypatch):
    out = str(tmp_path / "out" / "m.parquet")
    assert resolve("from-the-config", None, out) == (b"from-the-config", "ingest.salt")
    monkeypatch.setenv(SALT_ENV, "from-the-environment")
    assert resolve(None, None, out) == (b"from-the-environment", SALT_ENV)
    monkeypatch.delenv(SALT_ENV)
    key, source = resolve(None, None, out)
    assert source == str(key_file) and key == key_file.read_bytes().strip()


def test_a_key_file_others_can_read_or_inside_the_outputs_is_refused(key_file, tmp_path):
    key_file.parent.mkdir(parents=True)
    key_file.write_text("a-key-someone-copied\n")
    key_file.chmod(0o644)
    with pytest.raises(KeyFileError) as err:
        resolve(None, None, str(tmp_path / "m.parquet"))
    assert str(err.value) == f"the key file {key_file} can be read by others (mode 644): chmod 600 {key_file}"
    with pytest.raises(KeyFileError, match=f"the key file {tmp_path}/out/salt lies in the output folder {tmp_path}/out: keep it"):
        resolve(None, str(tmp_path / "out" / "salt"), str(tmp_path / "out" / "m.parquet"))
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_the_key_file_and_neither_the_key_nor_an_id_reaches_an_output_or_a_log(dicom_folder, tmp_path):
    key_file = tmp_path / "keys" / "salt"
    ray_files = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    env = {k: v for k, v in os.environ.items() if k != SALT_ENV} | {"MEDRAY_SALT_FILE": str(key_file), "RAY_TMPDIR": ray_files}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medray", "ingest", str(dicom_folder), str(out / "manifest.parquet"), "--format", "folder"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (
            f"IDs from DICOM headers pseudonymised (2 images) with the key from {key_file}; IDs from the table or file names "
            "kept as they are (1 image; ingest.pseudonymise: true pseudonymises them too)" in result.stdout.splitlines()
        )
        key = key_file.read_bytes().strip()
        files = [p for folder in (out, ray_files) for p in sorted(Path(folder).rglob("*")) if p.is_file()]
        assert any(p.suffix == ".log" or p.suffix in (".out", ".err") for p in files)  # Ray's logs were searched too
        seen = [result.stdout.encode(), result.stderr.encode(), *(p.read_bytes() for p in files)]
        for secret in (key, PATIENT_ID.encode(), STUDY.encode()):
            assert not any(secret in blob for blob in seen)
    finally:
        shutil.rmtree(ray_files, ignore_errors=True)
