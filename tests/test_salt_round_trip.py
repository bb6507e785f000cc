"""The pseudonym key never lands in a saved config, and a rerun from that config needs it again."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray.config import build_config, load_config, save_config
from medray.data.datasets import ingest
from medray.data.manifest import read_manifest

SALT_ENV = "MEDRAY_PSEUDONYM_SALT"
SALT = "kept-by-the-data-steward"


@pytest.fixture
def table(tmp_path):
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / f"{name}.png")
    pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "patient_id": ["P-1", "P-2", "P-1"], "Mass": [1, 0, 0]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    return str(tmp_path / "labels.csv")


def pseudonyms(table: str, out: str, config) -> list[str]:
    return read_manifest(ingest(table, out, config.ingest).manifest).frame["patient_id"].tolist()


def test_a_saved_config_gives_the_same_pseudonyms_only_with_the_real_salt_again(table, tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    settings = ["ingest.format=csv", "ingest.columns.labels=[Mass]", "ingest.check=false", "ingest.pseudonymise=true"]
    config = build_config(overrides=[*settings, f"ingest.salt={SALT}"])
    first = pseudonyms(table, str(tmp_path / "first.parquet"), config)
    assert first[0] == first[2] != first[1] and "P-1" not in first

    save_config(config, str(tmp_path / "ingest.config.yaml"))
    saved = (tmp_path / "ingest.config.yaml").read_text()
    assert "  salt:" not in saved and SALT not in saved and "pseudonymise: true" in saved
    rerun = load_config(str(tmp_path / "ingest.config.yaml"))

    # Without the salt, the key file's own random key is used: other pseudonyms, never the first ones.
    monkeypatch.setenv("MEDRAY_SALT_FILE", str(tmp_path / "keys" / "salt"))
    assert pseudonyms(table, str(tmp_path / "unsalted.parquet"), rerun) != first
    monkeypatch.setenv(SALT_ENV, "a-guess")
    assert pseudonyms(table, str(tmp_path / "guessed.parquet"), rerun) != first
    monkeypatch.setenv(SALT_ENV, SALT)
    assert pseudonyms(table, str(tmp_path / "again.parquet"), rerun) == first
    assert ingest(table, str(tmp_path / "said.parquet"), rerun.ingest).pseudonyms == f"IDs pseudonymised with the key from {SALT_ENV}"


def test_the_command_line_says_which_key_it_used_never_the_key(table, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != SALT_ENV} | {"MEDRAY_SALT_FILE": str(tmp_path / "keys" / "salt")}
    command = [sys.executable, "-m", "medray", "ingest", table, str(tmp_path / "m.parquet"), "--format", "csv",
               "--set", "ingest.columns.labels=[Mass]", "--set", "ingest.pseudonymise=true"]  # fmt: skip
    unsalted = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert unsalted.returncode == 0, unsalted.stderr[-3000:]
    assert f"IDs pseudonymised with the key from {tmp_path / 'keys' / 'salt'}" in unsalted.stdout.splitlines()
    key = (tmp_path / "keys" / "salt").read_text().strip()
    assert key not in unsalted.stdout + unsalted.stderr
