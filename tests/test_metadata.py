"""Subgroup metadata in one form — age in years or unknown, sex M / F / unknown — written at ingest
and read by the same rules at evaluation, so a free-text column never crashes a report."""

import logging

import numpy as np
import pandas as pd
import pytest

from medray.config import ColumnsConfig
from medray.data.datasets import Options, ingest_table
from medray.data.manifest import read_manifest
from medray.data.metadata import ages, sexes
from medray.evaluation.subgroups import subgroup_table
from test_datasets_table import image


@pytest.mark.parametrize(
    "value, years",
    [("58", 58.0), (" 71 ", 71.0), ("58.5", 58.5), ("058Y", 58.0), ("006M", 0.5), (63, 63.0),
     ("", np.nan), ("50+", np.nan), (">89", np.nan), ("early 40s", np.nan), ("40-49", np.nan), ("200", np.nan)],
)  # fmt: skip
def test_an_age_is_a_number_of_years_or_unknown_never_a_guess(value, years):
    parsed, _ = ages(pd.Series([value], dtype=object))
    assert parsed.dtype == float and parsed.iloc[0] == pytest.approx(years, nan_ok=True)


def test_sex_is_m_f_or_unknown_and_only_unreadable_values_are_counted():
    sex, unread = sexes(pd.Series(["Male", "f", " F ", "FEMALE", "m", "O", "", None, "unknown"], dtype=object))
    assert sex.tolist() == ["M", "F", "F", "F", "M", "unknown", "unknown", "unknown", "unknown"]
    assert unread == 1  # "O": blank and "unknown" say nothing was recorded


def test_ingest_normalises_age_and_sex_and_logs_counts_not_values(tmp_path, caplog):
    ages_in, sexes_in = ["58", "", "50+", "early 40s", "061Y"], ["male", "F", "Female", "x", ""]
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(image("PNG"))
    pd.DataFrame({"image": [f"{i}.png" for i in range(5)], "patient_id": list("abcde"), "Finding": [1, 0, 1, 0, 1],
                  "Age": ages_in, "Sex": sexes_in}).to_csv(tmp_path / "labels.csv", index=False)  # fmt: skip
    columns = ColumnsConfig(labels=["Finding"], metadata={"Age": "age", "Sex": "sex"})
    with caplog.at_level(logging.WARNING):
        result = ingest_table(str(tmp_path / "labels.csv"), str(tmp_path / "m.parquet"), columns, options=Options(check=False))
    frame = read_manifest(result.manifest).frame
    assert frame["age"].dtype == float and frame["age"].tolist()[::4] == [58.0, 61.0] and frame["age"][1:4].isna().all()
    assert frame["sex"].tolist() == ["M", "F", "F", "unknown", "unknown"]
    assert "2 of 5 ages are not a number of years" in caplog.text and "1 of 5 sex values are not M/F" in caplog.text
    assert not any(value in caplog.text for value in ("50+", "early 40s", "Female"))


def old_test_split(n=80, seed=0) -> pd.DataFrame:
    """Test predictions of a manifest written before ingest normalised metadata: ages as free text."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    return pd.DataFrame({
        "patient_id": [f"p{i}" for i in range(n)], "Finding": y, "prob_Finding": np.clip(0.6 * y + 0.4 * rng.random(n), 0, 1),
        "age": rng.choice(["50+", "", "early 40s"], n), "sex": rng.choice(["Male", "female", ""], n),
        "view": "PA", "site": rng.choice(["A", "B"], n),
    })  # fmt: skip


def test_subgroups_leave_out_with_a_note_what_the_test_split_cannot_support():
    overall = pd.DataFrame({"threshold": [0.5], "auroc_lo": [0.7]}, index=pd.Index(["Finding"], name="label"))
    table = subgroup_table(old_test_split(), ["Finding"], ["prob_Finding"], overall, resamples=50)
    assert set(table["dimension"]) == {"sex", "site"}
    assert set(table.loc[table["dimension"] == "sex", "group"]) == {"M", "F"}
    notes = table.attrs["notes"]
    assert any(n.startswith("age band: not analysed — no test image has a readable value") for n in notes)
    assert any(n.startswith("view: not analysed — every test image is in the same group") for n in notes)
    assert any(n.startswith("sex: ") and "have no readable value" in n for n in notes)
