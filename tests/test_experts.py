"""Readers on the model's ROC curve: their operating points, the model's sensitivity at each, and the count under the curve."""

import numpy as np
import pandas as pd
import pytest

from medray.evaluation.experts import rater_table, raters_under_curve, weighted_sensitivity_at
from medray.training.validation import sensitivity_at_specificity


def test_the_weighted_sensitivity_at_a_specificity_equals_the_unweighted_one_with_unit_weights():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1), 2)  # rounded: ties too
    for specificity in (0.5, 0.8, 0.9, 0.97, 1.0):
        expected = sensitivity_at_specificity(y, p, specificity)
        assert weighted_sensitivity_at(y, p, np.ones((1, 300)), np.array([specificity]))[0] == pytest.approx(expected)


def test_two_of_three_raters_lie_under_the_models_curve_and_each_difference_has_its_interval():
    # 20 negatives score 0.05…0.50 and 20 positives 0.45…0.95: at specificity 1 the model catches the 18
    # positives above 0.50 (sensitivity 0.9); at specificity 0.9 (two negatives above the threshold) all but
    # the positive at 0.45 (the one at 0.476 ties with the third-highest negative and rises with it): 19 of 20.
    negatives, positives = np.linspace(0.05, 0.50, 20), np.linspace(0.45, 0.95, 20)
    y = np.r_[np.zeros(20), np.ones(20)]
    test = pd.DataFrame({"image": [f"/data/{i}.png" for i in range(40)], "patient_id": [f"p{i}" for i in range(40)],
                         "Mass": y, "prob_Mass": np.r_[negatives, positives]})  # fmt: skip
    reads = {
        "perfect": y,  # sensitivity 1 at specificity 1: above the curve
        "cautious": np.r_[np.zeros(20), np.tile([1, 0], 10)],  # 0.5 at specificity 1: under it
        "eager": np.r_[np.tile([1, 0] + [0] * 8, 2), np.tile([1, 1, 1, 1, 0], 4)],  # 0.8 at 0.9: under it
    }
    votes = pd.DataFrame([(f"{i}.png", rater, v[i]) for rater, v in reads.items() for i in range(40)], columns=["Image Index", "Rater", "Mass"])
    table = rater_table(test, votes, ["Mass"], resamples=300).set_index("rater")
    assert table.loc["perfect", ["sensitivity", "specificity", "model_sensitivity"]].tolist() == pytest.approx([1.0, 1.0, 0.9])
    assert table.loc["cautious", ["sensitivity", "specificity", "model_sensitivity"]].tolist() == pytest.approx([0.5, 1.0, 0.9])
    assert table.loc["eager", ["sensitivity", "specificity", "model_sensitivity"]].tolist() == pytest.approx([0.8, 0.9, 0.95])
    assert table["under_curve"].to_dict() == {"cautious": True, "eager": True, "perfect": False}
    assert raters_under_curve(table.reset_index()).to_dict() == {"Mass": 2}
    assert (table["difference_lo"] <= table["difference"]).all() and (table["difference"] <= table["difference_hi"]).all()
    assert table.loc["cautious", "difference_lo"] > 0  # 0.4 better on 20 positive patients: clear of zero


def test_the_report_sets_each_raters_em_estimates_beside_their_measured_accuracy_and_both_consensus_rules_against_the_reference():
    from medray.evaluation.experts import consensus_check

    rng = np.random.default_rng(0)
    truth = (rng.random(1500) < 0.2).astype(float)
    raters = {"E1": (0.95, 0.98), "E2": (0.92, 0.97), "C1": (0.6, 0.7), "C2": (0.55, 0.75), "C3": (0.6, 0.72)}
    votes = pd.DataFrame([(f"{i}.png", name, int(rng.random() < (se if truth[i] else 1 - sp)))
                          for name, (se, sp) in raters.items() for i in range(1500)], columns=["Image Index", "Rater", "Mass"])  # fmt: skip
    test = pd.DataFrame({"image": [f"/archive/{i}.png" for i in range(1500)], "Mass": truth})
    rules, estimates = consensus_check(test, votes, ["Mass"])
    agrees = rules.set_index("consensus")["agrees_with_reference"]
    assert 1 - agrees["Dawid-Skene"] < (1 - agrees["majority vote"]) / 2  # the careful two outweigh the careless three
    estimated = estimates.set_index("rater")
    for name, (se, sp) in raters.items():
        assert estimated.loc[name, "em_sensitivity"] == pytest.approx(se, abs=0.06)
        assert estimated.loc[name, "em_specificity"] == pytest.approx(sp, abs=0.04)
