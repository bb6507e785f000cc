"""Bootstrap intervals resample patients, not images; DeLong's test compares two correlated AUROCs."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medray.evaluation.intervals import (
    bootstrap_intervals,
    delong,
    paired_bootstrap,
    patient_weights,
    weighted_at_threshold,
    weighted_auroc,
    weighted_average_precision,
)


def test_all_images_of_a_resampled_patient_move_together():
    patients = np.array(["p1", "p1", "p1", "p2", "p3", "p3", "p4"])
    w = patient_weights(patients, resamples=300, seed=0)
    assert w.shape == (300, 7)
    for pid in np.unique(patients):
        mine = w[:, patients == pid]
        assert (mine == mine[:, :1]).all(), "images of one patient drawn a different number of times"
    # each resample draws 4 patients with replacement: the weights of one image per patient sum to 4
    first_image = [0, 3, 4, 6]
    assert (w[:, first_image].sum(axis=1) == 4).all()
    assert (w == 0).any() and (w >= 2).any()  # some patients left out, some drawn twice


def test_the_interval_reflects_patients_not_images():
    # 10 patients with 40 images each; a patient's images share one label and one score. Resampling
    # images would pretend to 400 independent cases and give a narrow interval; patients give a wide one.
    labels = np.repeat([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], 40).astype(float)
    scores = np.repeat([0.9, 0.8, 0.3, 0.7, 0.6, 0.4, 0.5, 0.2, 0.1, 0.65], 40)
    patients = np.repeat(np.arange(10), 40)
    by_patient = bootstrap_intervals(labels, scores, patients, 0.5, resamples=500)
    by_image = bootstrap_intervals(labels, scores, np.arange(400), 0.5, resamples=500)
    patient_width = by_patient["auroc"][1] - by_patient["auroc"][0]
    image_width = by_image["auroc"][1] - by_image["auroc"][0]
    assert patient_width > 3 * image_width
    assert by_patient["auroc"][0] < roc_auc_score(labels, scores) < by_patient["auroc"][1]


def test_weighted_metrics_equal_scikit_learn_with_sample_weights():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.6 + 0.3 * y, 2)  # rounded: ties must count one half
    w = patient_weights(np.arange(300) // 3, resamples=5, seed=2)
    for row, auc, ap in zip(w, weighted_auroc(y, p, w), weighted_average_precision(y, p, w)):
        assert auc == pytest.approx(roc_auc_score(y, p, sample_weight=row))
        assert ap == pytest.approx(average_precision_score(y, p, sample_weight=row))
    sens = weighted_at_threshold(y, p, w, 0.5)["sensitivity"]
    assert sens[0] == pytest.approx(((p >= 0.5) & (y == 1)) @ w[0] / ((y == 1) @ w[0]))


def test_delong_matches_the_structural_components_computed_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    a = np.array([0.9, 0.7, 0.4, 0.5, 0.3, 0.2, 0.1])
    b = np.array([0.6, 0.8, 0.3, 0.7, 0.4, 0.2, 0.1])
    pos, neg = y == 1, y == 0

    def components(s):  # V10: per positive, share of negatives below (ties ½); V01: per negative, share of positives above
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return psi.mean(axis=1), psi.mean(axis=0), psi.mean()

    (a10, a01, auc_a), (b10, b01, auc_b) = components(a), components(b)
    s10, s01 = np.cov(np.stack([a10, b10])), np.cov(np.stack([a01, b01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / 3 + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / 4
    result = delong(y, a, b)
    assert result["auroc_a"] == pytest.approx(roc_auc_score(y, a)) == pytest.approx(auc_a)
    assert result["auroc_b"] == pytest.approx(auc_b)
    assert result["se"] == pytest.approx(np.sqrt(var))
    assert result["z"] == pytest.approx((auc_a - auc_b) / np.sqrt(var))


def test_delong_finds_no_difference_between_a_model_and_itself_and_a_clear_one_between_good_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.6, 400)
    assert delong(y, good, good)["p_value"] == 1.0
    result = delong(y, good, rng.random(400))
    assert result["difference"] > 0.2 and result["p_value"] < 1e-6


def test_the_paired_bootstrap_brackets_the_observed_difference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a, b = y + rng.normal(0, 0.7, 300), y + rng.normal(0, 1.5, 300)
    result = paired_bootstrap(y, a, b, np.arange(300) // 2, resamples=400)
    observed = roc_auc_score(y, a) - roc_auc_score(y, b)
    assert result["difference_lo"] < observed < result["difference_hi"]
    assert result["difference_lo"] > 0 and result["share_b_not_worse"] < 0.025
