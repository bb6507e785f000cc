"""Per-label metrics: hand-computed values, scikit-learn, thresholds chosen on val, Bayes' rule for PPV/NPV."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from medray.evaluation.metrics import (
    at_threshold,
    auprc,
    auroc,
    choose_threshold,
    label_table,
    predictive_values,
    single_label_summary,
)

Y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.35, 0.9, 0.55])


def test_counts_and_ratios_at_a_threshold_match_a_hand_count():
    # p >= 0.5: predicted positive are 0.6 (neg), 0.7, 0.8, 0.9, 0.55 (pos) → TP 4, FP 1, FN 1 (0.4), TN 4
    m = at_threshold(Y, P, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 1, 4)
    assert m["sensitivity"] == pytest.approx(4 / 5) and m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(4 / 5) and m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))


def test_auroc_and_auprc_equal_scikit_learn_and_ignore_unknown_labels():
    y = np.r_[Y, np.nan, np.nan].astype(float)
    p = np.r_[P, 0.99, 0.01]
    assert auroc(y, p) == pytest.approx(roc_auc_score(Y, P))
    assert auprc(y, p) == pytest.approx(average_precision_score(Y, P))
    # hand count: of the 25 positive-negative pairs, the positive scores higher in all but (0.4 vs 0.6),
    # (0.4 vs 0.35 is fine), (0.55 vs 0.6) → 23 / 25
    assert auroc(Y, P) == pytest.approx(23 / 25)
    assert np.isnan(auroc(np.zeros(4), np.arange(4.0)))


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    t = choose_threshold(Y, P, "youden")
    best = max(at_threshold(Y, P, c)["sensitivity"] + at_threshold(Y, P, c)["specificity"] for c in P)
    m = at_threshold(Y, P, t)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)


def test_target_sensitivity_and_specificity_thresholds_reach_their_targets_as_tightly_as_possible():
    t = choose_threshold(Y, P, "sensitivity", 1.0)
    assert t == pytest.approx(0.4)  # the lowest positive's score: every positive caught, no higher threshold does
    t = choose_threshold(Y, P, "specificity", 1.0)
    assert t == pytest.approx(0.7)  # just above the highest negative (0.6)
    assert at_threshold(Y, P, t)["specificity"] == 1.0
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(Y, P, "accuracy")


def test_ppv_and_npv_at_a_deployment_prevalence_follow_bayes_rule():
    se, sp, prevalence = 0.9, 0.8, 0.02
    ppv, npv = predictive_values(se, sp, prevalence)
    assert ppv == pytest.approx(0.9 * 0.02 / (0.9 * 0.02 + 0.2 * 0.98))  # ≈ 0.084: most alarms are false
    assert npv == pytest.approx(0.8 * 0.98 / (0.8 * 0.98 + 0.1 * 0.02))
    # at the test set's own prevalence the formula gives back the observed PPV and NPV
    m = at_threshold(Y, P, 0.5)
    assert predictive_values(m["sensitivity"], m["specificity"], Y.mean()) == pytest.approx((m["ppv"], m["npv"]))


def test_the_label_table_chooses_thresholds_on_val_and_reports_test_prevalence_beside_them():
    rng = np.random.default_rng(0)
    val_y = rng.integers(0, 2, (200, 2)).astype(float)
    val_p = np.clip(val_y * 0.3 + rng.random((200, 2)) * 0.7, 0, 1)
    test_y, test_p = Y[:, None].repeat(2, 1).astype(float), P[:, None].repeat(2, 1)
    table = label_table(["A", "B"], val_y, val_p, test_y, test_p, deployment_prevalence={"A": 0.05})
    assert table.loc["A", "threshold"] == pytest.approx(choose_threshold(val_y[:, 0], val_p[:, 0]))
    assert table.loc["A", "prevalence"] == pytest.approx(0.5) and table.loc["A", "positives"] == 5
    expected = predictive_values(table.loc["A", "sensitivity"], table.loc["A", "specificity"], 0.05)
    assert (table.loc["A", "deployment_ppv"], table.loc["A", "deployment_npv"]) == pytest.approx(expected)
    assert np.isnan(table.loc["B", "deployment_ppv"])


def test_ordinal_summary_gives_accuracy_macro_auroc_and_quadratic_weighted_kappa():
    grades = np.array([0, 1, 2, 2, 1, 0])
    onehot = np.eye(3)[grades]
    probs = np.array([[.8, .1, .1], [.2, .6, .2], [.1, .2, .7], [.1, .6, .3], [.3, .5, .2], [.6, .3, .1]])  # fmt: skip
    summary = single_label_summary("ordinal", onehot, probs)
    assert summary["accuracy"] == pytest.approx(5 / 6)
    expected_grade = np.rint(probs @ np.arange(3)).astype(int)
    assert summary["quadratic_weighted_kappa"] == pytest.approx(cohen_kappa_score(grades, expected_grade, weights="quadratic"))
    macro = np.mean([roc_auc_score(onehot[:, k], probs[:, k]) for k in range(3)])
    assert summary["macro_auroc"] == pytest.approx(macro)
    assert "quadratic_weighted_kappa" not in single_label_summary("multi-class", onehot, probs)


def test_binary_accuracy_is_reported_at_0_5_as_benchmarks_do_and_at_the_val_threshold():
    val_y, val_p = np.array([0, 0, 1, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4, 0.35])  # Youden on val: 0.3 (J = 1 − 1/3)
    table = label_table(["A"], val_y[:, None], val_p[:, None], Y[:, None].astype(float), P[:, None])
    assert table.loc["A", "threshold"] == pytest.approx(0.3)
    assert table.loc["A", "accuracy"] == pytest.approx(7 / 10)  # at 0.3: 0.3, 0.35 and 0.6 are false positives
    assert table.loc["A", "accuracy_0.5"] == pytest.approx(8 / 10)  # at 0.5: 0.6 false positive, 0.4 false negative


def test_ordinal_accuracy_is_the_argmax_of_differenced_cumulative_probabilities_beside_the_expected_grade():
    import torch

    from medray.training.losses import probabilities

    exceeds = torch.tensor([[0.9, 0.55, 0.5, 0.05]])  # P(grade > k): class probabilities .10 .35 .05 .45 .05
    probs = probabilities("ordinal", torch.logit(exceeds)).numpy().astype(float)
    assert probs.argmax() == 3 and (probs @ np.arange(5)).item() == pytest.approx(2.0)
    summary = single_label_summary("ordinal", np.eye(5)[[2]], probs)
    assert summary["accuracy"] == 0.0 and summary["accuracy_expected_grade"] == 1.0
    assert "accuracy_expected_grade" not in single_label_summary("multi-class", np.eye(5)[[2]], probs)


def test_a_deployment_prevalence_for_a_label_the_model_lacks_is_an_error_naming_it():
    y, p = Y[:, None].astype(float), P[:, None]
    with pytest.raises(ValueError, match=r"deployment_prevalence names label\(s\) \['Nodule'\] that the model does not have"):
        label_table(["Mass"], y, p, y, p, deployment_prevalence={"Mass": 0.02, "Nodule": 0.03})


def test_evaluation_settings_are_validated_naming_the_field():
    from medray.config import ConfigError, build_config

    config = build_config({"evaluate": {"threshold": "sensitivity", "threshold_target": 0.95, "deployment_prevalence": {"Mass": 0.02}}})
    assert config.evaluate.threshold == "sensitivity" and config.evaluate.bootstrap == 1000
    with pytest.raises(ConfigError, match="evaluate.*deployment_prevalence.*between 0 and 1"):
        build_config({"evaluate": {"deployment_prevalence": {"Mass": 2}}})
    with pytest.raises(ConfigError, match="evaluate.threshold"):
        build_config({"evaluate": {"threshold": "accuracy"}})


def test_a_threshold_near_1_is_shown_with_the_decimals_that_keep_it_below_1():
    from medray.evaluation.report.sections import threshold_text

    assert [threshold_text(t) for t in (0.5, 0.99994, 0.0000312, 1.0, 0.9991)] == ["0.500", "0.99994", "0.00003", "1.000", "0.9991"]


@pytest.mark.parametrize("rule", ["youden", "sensitivity", "specificity"])
def test_when_val_separates_a_label_perfectly_the_threshold_sits_mid_gap_in_logit_space(rule):
    # The highest negative scores 0.5 (logit 0), the lowest positive 0.9 (logit log 9): the middle is logit
    # log(9)/2, probability 3/4 — not 0.9, where the next positive just below it would be missed.
    y, p = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.3, 0.5, 0.9, 0.95, 0.99])
    assert choose_threshold(y, p, rule, 0.9) == pytest.approx(0.75)
    table = label_table(["A"], y[:, None].astype(float), p[:, None], y[:, None].astype(float), p[:, None], rule)
    assert bool(table.loc["A", "val_separated"]) and not bool(label_table(["A"], Y[:, None], P[:, None], Y[:, None], P[:, None]).loc["A", "val_separated"])


def test_the_report_warns_beside_a_label_whose_intervals_rest_on_fewer_than_10_positive_patients():
    from medray.evaluation.report.sections import caution

    assert "only 6 positive test patients" in caution({"positive_patients": 6, "val_separated": False})
    assert caution({"positive_patients": 10, "val_separated": False}) == ""
    assert "separated this label perfectly" in caution({"positive_patients": 40, "val_separated": True})
