"""The command line as a user meets it: the real `python -m medray` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medray.cli import COMMANDS
from medray.data.manifest import Manifest, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def medray(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medray", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error a user sees: the last line of stderr, alone of its kind, and no traceback above it
    (Ray may log a notice of its own when it starts)."""
    lines = result.stderr.strip().splitlines()
    verb = result.args[3]
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith(f"medray {verb}: "), result.stderr
    assert sum(line.startswith("medray ") for line in lines) == 1, result.stderr
    return lines[-1]


@pytest.fixture
def manifest(tmp_path) -> str:
    """60 patients of two images each, a third of them Mass-positive."""
    patients = np.repeat([f"p{i:02d}" for i in range(60)], 2)
    frame = pd.DataFrame({
        "image": [f"/images/{p}-{k}.png" for p, k in zip(patients, [0, 1] * 60)],
        "patient_id": patients,
        "Mass": np.repeat(np.arange(60) % 3 == 0, 2).astype("float32"),
    })  # fmt: skip
    return write_manifest(Manifest(frame, ["Mass"]), str(tmp_path / "manifest.parquet"))


def test_help_imports_none_of_torch_ray_or_pandas():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "medray", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo-data" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "medray" in imported and not imported & {"torch", "ray", "pandas", "monai", "pyarrow"}


def test_version_is_the_installed_package_version():
    import medray

    result = subprocess.run([sys.executable, "-m", "medray", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"medray {version('medray')}"
    assert medray.__version__ == version("medray")


@pytest.mark.parametrize("verb", [verb for verb, command in COMMANDS.items() if command.config])
def test_every_verb_with_settings_takes_a_config_and_overrides(verb):
    result = medray(verb, "--help")
    assert result.returncode == 0 and "--config" in result.stdout and "--set" in result.stdout


def test_split_honours_the_split_section_of_a_config_and_flags_override_it(manifest, tmp_path):
    config = tmp_path / "split.yaml"
    config.write_text("split:\n  val: 0.3\n  test: 0.3\n  seed: 3\n")
    medray("split", manifest, str(tmp_path / "a.parquet"), "--config", str(config)).check_returncode()
    medray("split", manifest, str(tmp_path / "b.parquet"), "--config", str(config), "--test", "0.1").check_returncode()

    def patients(path: str, split: str) -> int:
        frame = read_manifest(path).frame
        return frame.loc[frame["split"] == split, "patient_id"].nunique()

    assert patients(str(tmp_path / "a.parquet"), "test") == 18 and patients(str(tmp_path / "a.parquet"), "val") == 18
    assert patients(str(tmp_path / "b.parquet"), "test") == 6 and patients(str(tmp_path / "b.parquet"), "val") == 18


def test_a_missing_manifest_is_one_line_naming_it(tmp_path):
    result = medray("split", "/nonexistent.parquet", str(tmp_path / "out.parquet"))
    assert result.returncode == 2
    assert "/nonexistent.parquet" in one_line_error(result)


def test_a_bad_config_is_one_line_naming_every_bad_field(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  epochs: 0\nmodel:\n  backbone: resnet1000\n")
    result = medray("train", "--config", str(config))
    line = one_line_error(result)
    assert result.returncode == 2
    assert str(config) in line and "train.epochs" in line and "unknown backbone 'resnet1000'" in line


def test_debug_shows_the_traceback(tmp_path):
    result = medray("split", "/nonexistent.parquet", str(tmp_path / "out.parquet"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ManifestError" in result.stderr


def test_a_failed_leakage_audit_exits_1_with_one_line(manifest, tmp_path):
    frame = read_manifest(manifest).frame
    frame["split"] = np.where(np.arange(len(frame)) % 2 == 0, "train", "test")  # each patient on both sides
    leaky = write_manifest(Manifest(frame, ["Mass"]), str(tmp_path / "leaky.parquet"))
    result = medray("audit", leaky, "--out", str(tmp_path / "audit"), "--set", f"storage={tmp_path}")
    assert result.returncode == 1
    assert "FAIL  patient_overlap      60" in result.stdout and "leakage" in one_line_error(result)


def test_an_ingest_with_every_row_quarantined_is_one_line(tmp_path):
    pd.DataFrame({"image": ["a.png", "b.png"], "patient_id": ["p", "q"], "Mass": [1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    result = medray("ingest", str(tmp_path / "t.csv"), str(tmp_path / "m.parquet"), "--format", "csv",
                    "--set", "ingest.columns.labels=[Mass]", "--set", f"storage={tmp_path}")  # fmt: skip
    assert result.returncode == 2
    line = one_line_error(result)
    assert "no usable rows (2 in = 0 kept + 2 quarantined" in line and "m.quarantine.parquet" in line


def test_a_job_entrypoint_reports_a_missing_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "jobs/train.py", "--config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 2 and result.stderr == f"medray train: config file {tmp_path / 'nope.yaml'} does not exist\n"
