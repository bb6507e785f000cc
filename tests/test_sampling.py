import numpy as np
import pandas as pd
import pytest

from medray.data import decoded, resampled
from medray.data.sampling import COLUMN, draw, expected_draws


def frame(n_pos=10, n_neg=90) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": [f"/x/{i}.png" for i in range(n_pos + n_neg)],
            "patient_id": [str(i // 3) for i in range(n_pos + n_neg)],
            "Mass": [1.0] * n_pos + [0.0] * n_neg,
            "Nodule": [0.0] * (n_pos + n_neg),
        }
    )


def test_oversampling_draws_the_minority_as_often_as_the_majority():
    expected = expected_draws(frame(), ["Mass", "Nodule"], "oversample", "Mass")
    assert expected[:10].sum() == pytest.approx(90) and (expected[10:] == 1).all()


def test_undersampling_keeps_every_minority_row_and_thins_the_majority():
    expected = expected_draws(frame(), ["Mass", "Nodule"], "undersample", "Mass")
    assert (expected[:10] == 1).all() and expected[10:].sum() == pytest.approx(10)


def test_balanced_gives_each_finding_and_no_finding_the_same_share():
    f = frame(n_pos=10, n_neg=90)
    f.loc[10:29, "Nodule"] = 1.0  # 20 Nodule rows; 70 rows with no finding
    expected = expected_draws(f, ["Mass", "Nodule"], "balanced")
    mass, nodule, nothing = expected[:10].sum(), expected[10:30].sum(), expected[30:].sum()
    assert mass == pytest.approx(nodule) == pytest.approx(nothing)
    assert expected.sum() == pytest.approx(len(f))


def test_patient_balanced_makes_every_patient_equally_likely():
    f = frame()
    f.loc[:5, "patient_id"] = "busy"  # one patient with many studies
    expected = pd.Series(expected_draws(f, ["Mass"], "patient_balanced")).groupby(f["patient_id"]).sum()
    assert np.allclose(expected, expected.iloc[0])


def test_samples_per_epoch_sets_the_epoch_length():
    assert expected_draws(frame(), ["Mass"], "oversample", "Mass", samples=500).sum() == pytest.approx(500)


def test_stochastic_rounding_is_exact_in_expectation_and_draws_whole_rows_once():
    rng = np.random.default_rng(0)
    expected = np.array([1.0, 0.25, 2.5])
    counts = np.stack([draw(expected, rng) for _ in range(4000)])
    assert (counts[:, 0] == 1).all()
    assert counts.mean(axis=0) == pytest.approx(expected, abs=0.05)


def test_the_pipeline_draws_a_fresh_balanced_sample_every_epoch(demo_manifest, ray_session):
    train = demo_manifest.frame
    labels = demo_manifest.labels
    train = train.assign(**{COLUMN: expected_draws(train, labels, "oversample", "Mass")})
    ds = resampled(decoded(train, labels, 16).materialize())
    epochs = [np.concatenate([b["labels"][:, 0] for b in ds.iter_batches(batch_size=64)]) for _ in range(2)]
    for mass in epochs:
        assert 0.4 < mass.mean() < 0.6  # Mass is ~8 % of rows, half of every oversampled epoch
    assert len(epochs[0]) != len(epochs[1]) or not np.array_equal(epochs[0], epochs[1])
