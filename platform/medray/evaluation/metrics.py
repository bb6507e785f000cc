"""Per-label classification metrics, built on scikit-learn.

Thresholds are chosen on the validation split (Youden's J, or the threshold reaching a target
sensitivity or specificity) and then applied, unchanged, to the test split — choosing them on test
would flatter the reported sensitivity and specificity.

PPV and NPV depend on prevalence, and a test split enriched with positives shows a PPV no clinic
will see. ``predictive_values`` recomputes them with Bayes' rule for a deployment prevalence.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    roc_curve,
)

from medray.config import ConfigError

# The per-epoch validation metrics of training, re-exported: evaluation reports the same numbers.
from medray.training.validation import auroc, auroc_per_label, known, sensitivity_at_specificity  # noqa: F401

THRESHOLD_RULES = ("youden", "sensitivity", "specificity")


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve); NaN without positives."""
    y, p = known(y, p)
    return float(average_precision_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str = "youden", target: float = 0.9) -> float:
    """The operating threshold (predict positive when ``p >= threshold``) chosen on ``(y, p)``.

    - ``youden``: maximises sensitivity + specificity − 1;
    - ``sensitivity``: the highest threshold whose sensitivity is at least ``target``;
    - ``specificity``: the lowest threshold whose specificity is at least ``target``.

    0.5 when ``y`` holds a single class (nothing to choose from). When ``p`` separates the classes
    perfectly, every rule is met anywhere in the gap between the highest negative and the lowest positive
    score; the ROC's corner would put the threshold on the lowest positive, where the next positive case
    falls below it half the time. So the threshold is the middle of the gap, in logit space.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; known: {', '.join(THRESHOLD_RULES)}")
    y, p = known(y, p)
    if len(np.unique(y)) < 2:
        return 0.5
    if separates(y, p):
        low, high = np.clip([p[y == 0].max(), p[y == 1].min()], 1e-12, 1 - 1e-12)
        middle = (np.log(low / (1 - low)) + np.log(high / (1 - high))) / 2
        return float(1 / (1 + np.exp(-middle)))
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    elif rule == "sensitivity":
        best = int(np.argmax(tpr >= target))  # thresholds fall as tpr rises: the first is the highest
    else:
        best = int(np.nonzero(1 - fpr >= target)[0][-1])
    return float(min(thresholds[best], 1.0))


def separates(y: np.ndarray, p: np.ndarray) -> bool:
    """Whether every positive scores above every negative (both classes present, unknowns left out)."""
    y, p = known(y, p)
    return bool(len(np.unique(y)) == 2 and p[y == 0].max() < p[y == 1].min())


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and the metrics derived from them, predicting positive when ``p >= threshold``."""
    y, p = known(y, p)
    predicted = p >= threshold
    tp, fn = int((predicted & (y == 1)).sum()), int((~predicted & (y == 1)).sum())
    tn, fp = int((~predicted & (y == 0)).sum()), int((predicted & (y == 0)).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }  # fmt: skip


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV at ``prevalence`` by Bayes' rule — what a test with this sensitivity and
    specificity would show where the finding has that prevalence."""
    se, sp, pi = sensitivity, specificity, prevalence
    return _ratio(se * pi, se * pi + (1 - sp) * (1 - pi)), _ratio(sp * (1 - pi), sp * (1 - pi) + (1 - se) * pi)


def check_prevalence(labels: list[str], deployment_prevalence: dict[str, float]) -> None:
    """A prevalence for a label the model lacks is a typo or the wrong model: an error, never ignored."""
    unknown = sorted(set(deployment_prevalence) - set(labels))
    if unknown:
        raise ConfigError(f"evaluate.deployment_prevalence names label(s) {unknown} that the model does not have; "
                         f"its labels: {labels}")  # fmt: skip


def label_table(
    labels: list[str],
    val_y: np.ndarray,
    val_p: np.ndarray,
    test_y: np.ndarray,
    test_p: np.ndarray,
    rule: str = "youden",
    target: float = 0.9,
    deployment_prevalence: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per label: the test split's prevalence, AUROC, AUPRC, and the metrics at the threshold
    chosen on val; plus PPV/NPV at the deployment prevalence where one is given for the label.

    Accuracy is given twice: at the val threshold, and at 0.5 (``accuracy_0.5``), the fixed operating
    point of published benchmarks (MedMNIST's ACC), so that a user can compare with them."""
    deployment_prevalence = deployment_prevalence or {}
    check_prevalence(labels, deployment_prevalence)
    rows = []
    for i, label in enumerate(labels):
        y, p = test_y[:, i], test_p[:, i]
        known = ~np.isnan(y)
        threshold = choose_threshold(val_y[:, i], val_p[:, i], rule, target)
        row = {
            "label": label,
            "n": int(known.sum()),
            "positives": int(np.nansum(y)),
            "prevalence": float(np.nanmean(y)) if known.any() else float("nan"),
            "auroc": auroc(y, p),
            "auprc": auprc(y, p),
            "threshold": threshold,
            "val_separated": separates(val_y[:, i], val_p[:, i]),
            **at_threshold(y, p, threshold),
            "accuracy_0.5": at_threshold(y, p, 0.5)["accuracy"],
        }
        prevalence = deployment_prevalence.get(label, float("nan"))
        row["deployment_prevalence"] = prevalence
        row["deployment_ppv"], row["deployment_npv"] = (
            predictive_values(row["sensitivity"], row["specificity"], prevalence)
            if not np.isnan(prevalence)
            else (float("nan"), float("nan"))
        )
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")


def single_label_summary(task: str, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Multi-class and ordinal tasks (one-hot ``targets``, one probability per class): the accuracy of
    the most probable class and the macro one-vs-rest AUROC — both as MedMNIST's evaluator defines
    ACC and AUC — and, for ordinal grades, the quadratic weighted kappa.

    An ordinal model's class probabilities are the differences of its cumulative "grade > k"
    probabilities (medray.training.losses.probabilities), and ``accuracy`` is their argmax. Rounding the
    expected grade instead (``accuracy_expected_grade``) uses the whole distribution and its order,
    and can be much higher (RetinaMNIST: 0.49 against 0.370), but it is not the number benchmarks
    report; the kappa is computed on it, since kappa weighs how far off a grade is."""
    known = ~np.isnan(targets).any(axis=1) & ~np.isnan(probs).any(axis=1)
    truth, predicted = targets[known].argmax(axis=1), probs[known].argmax(axis=1)
    aurocs = [auroc(targets[known, k], probs[known, k]) for k in range(targets.shape[1])]
    summary = {
        "images": int(known.sum()),
        "accuracy": float((truth == predicted).mean()) if known.any() else float("nan"),
        "macro_auroc": float(np.nanmean(aurocs)) if not np.isnan(aurocs).all() else float("nan"),
    }
    if task == "ordinal":
        expected = np.rint(probs[known] @ np.arange(targets.shape[1])).astype(int)
        summary["accuracy_expected_grade"] = float((truth == expected).mean()) if known.any() else float("nan")
        summary["quadratic_weighted_kappa"] = float(cohen_kappa_score(truth, expected, weights="quadratic"))
    return summary
