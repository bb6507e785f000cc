"""The external-validation report: what moved between the run's own test split and another site, in words a
clinician can read first and tables after; ``external.json``, CSVs and figures beside it (report.document)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from medray.evaluation.calibration import expected_calibration_error, reliability
from medray.evaluation.report import plots
from medray.evaluation.report.document import Figure, Section, write_report
from medray.evaluation.report.sections import ci, threshold_text
from medray.io import storage
from medray.io.figures import plt, png

SITES = ("internal", "external")


def _pct(value: float) -> str:
    return "–" if np.isnan(value) else f"{100 * value:.1f} %"


def _num(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2f}"


def _p(value: float) -> str:
    return "–" if np.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def sentences(table: pd.DataFrame, name: str) -> list[str]:
    """Per label, one plain sentence each for discrimination, the operating point and calibration."""
    lines = []
    for label, r in table.iterrows():
        direction = "lower" if r["auroc_difference"] < 0 else "higher"
        verdict = f"{direction}, a significant change" if r["auroc_moved"] else "no significant change"
        if np.isnan(r["auroc_difference"]):  # a site without positives or without negatives has no AUROC
            verdict = "not comparable: one site has no positive or no negative image"
        lines.append(
            f"{label}: AUROC {ci(r['auroc_external'], r['auroc_lo_external'], r['auroc_hi_external'])} at {name} against "
            f"{ci(r['auroc_internal'], r['auroc_lo_internal'], r['auroc_hi_internal'])} on the internal test split — {verdict} "
            f"(DeLong p = {_p(r['delong_p'])}). Prevalence {_pct(r['prevalence_external'])} there, {_pct(r['prevalence_internal'])} internally."
        )
        moved = [m for m in ("sensitivity", "specificity") if r[f"{m}_moved"]]
        lines.append(
            f"{label} at the frozen threshold {threshold_text(r['threshold'])}: sensitivity {_pct(r['sensitivity_external'])} "
            f"(internally {_pct(r['sensitivity_internal'])}), specificity {_pct(r['specificity_external'])} "
            f"(internally {_pct(r['specificity_internal'])}); PPV {_pct(r['ppv_external'])} and NPV {_pct(r['npv_external'])} "
            f"at {name}'s prevalence." + (f" {' and '.join(moved).capitalize()} fell outside the internal 95 % interval." if moved else "")
        )
        if not np.isnan(r["citl_external"]):
            how = "too high" if r["citl_external"] > 0 else "too low"
            lines.append(
                f"{label} calibration: predicted probabilities are on average {abs(100 * r['citl_external']):.1f} percentage points "
                f"{how} at {name} (internally {100 * r['citl_internal']:+.1f})"
                + (", beyond chance" if r["miscalibrated_in_the_large"] else ", within chance or under one point")
                + f"; calibration slope {_num(r['calibration_slope_external'])} (internally {_num(r['calibration_slope_internal'])}; "
                "1 is ideal, below 1 the predictions are too extreme)."
            )
    return lines


def _side_by_side(table: pd.DataFrame, metrics: list[str], with_interval: bool = True) -> pd.DataFrame:
    shown = pd.DataFrame(index=table.index)
    for metric in metrics:
        for site in SITES:
            if with_interval:
                shown[f"{metric} {site}"] = [
                    ci(*v) for v in table[[f"{metric}_{site}", f"{metric}_lo_{site}", f"{metric}_hi_{site}"]].to_numpy()
                ]
            else:
                shown[f"{metric} {site}"] = table[f"{metric}_{site}"]
    return shown


def _discrimination(table: pd.DataFrame) -> pd.DataFrame:
    shown = _side_by_side(table, ["auroc"])
    shown["difference (ext − int)"] = [ci(*v) for v in table[["auroc_difference", "auroc_difference_lo", "auroc_difference_hi"]].to_numpy()]
    shown["DeLong z"], shown["DeLong p"] = table["delong_z"], table["delong_p"].map(_p)
    shown["moved"] = table["auroc_moved"]
    return shown


def _calibration(table: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame(index=table.index)
    for site in SITES:
        shown[f"mean predicted − observed {site}"] = [
            ci(*v) for v in table[[f"citl_{site}", f"citl_lo_{site}", f"citl_hi_{site}"]].to_numpy()
        ]
    for metric, name in (("citl_intercept", "intercept (slope 1)"), ("calibration_slope", "slope"), ("ece", "ECE")):
        for site in SITES:
            shown[f"{name} {site}"] = table[f"{metric}_{site}"]
    shown["miscalibrated in the large"] = table["miscalibrated_in_the_large"]
    return shown


def _prevalence(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "images internal": table["images_internal"], "positives internal": table["positives_internal"],
        "prevalence internal": table["prevalence_internal"], "images external": table["images_external"],
        "positives external": table["positives_external"], "prevalence external": table["prevalence_external"],
    })  # fmt: skip


def _subgroups(subgroups: pd.DataFrame) -> list:
    notes = subgroups.attrs.get("notes", [])
    if subgroups.empty:
        return notes or ["The site's manifest holds no sex, age, view or site column with two groups or more."]
    shown = subgroups.assign(
        external=[ci(*v) for v in subgroups[["auroc", "auroc_lo", "auroc_hi"]].to_numpy()],
        internal=[ci(*v) for v in subgroups[["auroc_internal", "auroc_lo_internal", "auroc_hi_internal"]].to_numpy()],
        flag=np.where(subgroups["moved"], "MOVED", "")
        + np.where(subgroups["below_overall"], " below site overall", "")
        + np.where(subgroups["small"], " small", ""),
    )
    moved = subgroups[subgroups["moved"]]
    return [
        ("AUROC per subgroup at the external site beside the same subgroup on the internal test split (– where the "
         "internal split has no such group, e.g. another site's name); MOVED: the two AUROCs differ by DeLong's test "
         "(p < 0.05); sensitivity and specificity at the frozen threshold."),
        [f"{r.label} in {r.dimension} = {r.group}: AUROC {r.auroc:.3f} against {r.auroc_internal:.3f} (p = {_p(r.delong_p)})"
         for r in moved.itertuples()] or ["No subgroup's AUROC moved significantly."],
        *([notes] if notes else []),
        shown[["dimension", "group", "label", "images", "positives", "external", "internal", "sensitivity", "specificity",
               "delong_p", "flag"]].set_index("dimension"),
    ]  # fmt: skip


def roc_two_sites(internal, external, labels: list[str], table: pd.DataFrame) -> bytes:
    """One ROC panel per label: both sites' curves, each with its operating point at the frozen threshold."""
    cols = min(len(labels), 4)
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        for site, colour in zip((internal, external), ("tab:blue", "tab:orange")):
            which = "internal" if site is internal else "external"
            y, p = site.frame[label].to_numpy(float), site.frame[f"prob_{label}"].to_numpy(float)
            keep = ~np.isnan(y) & ~np.isnan(p)
            if len(np.unique(y[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[keep], p[keep])
            ax.plot(fpr, tpr, lw=2, c=colour, label=f"{which} {table.loc[label, f'auroc_{which}']:.3f}")
            ax.plot(1 - table.loc[label, f"specificity_{which}"], table.loc[label, f"sensitivity_{which}"], "o", c=colour)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    fig.suptitle("ROC curves, internal test split and external site (dots: the frozen threshold)")
    return png(fig)


def _reliability(internal, external, labels: list[str], bins: int) -> bytes:
    curves = {}
    for i, label in enumerate(labels):
        curves[label] = []
        for which, site in (("internal", internal), ("external", external)):
            y, p = site.frame[label].to_numpy(float), site.calibrated[:, i]
            curves[label].append((which, reliability(y, p, bins), expected_calibration_error(y, p, bins)))
    return plots.reliability_diagrams(curves, title="Reliability of the calibrated probabilities, internal and external")


def _csv(uri: str, frame: pd.DataFrame, index: bool) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=index)
    storage.write_text(uri, buffer.getvalue())


def write(out_dir: str, result, internal, external, labels: list[str], bins: int) -> dict[str, str]:
    """external.json, external.csv, subgroups.csv, roc.png, reliability.png, report.md and report.html."""
    table, subgroups, s = result.table, result.subgroups, result.summary
    name = s["name"]
    overview = [
        f"model: {s['checkpoint']} (sha256 {s['model_sha256'][:12]}…)",
        f"{name}: {s['images']} images of {s['patients']} patients ({s['rows']}); {s['failed_images']} could not be read",
        f"internal test split: {s['internal_images']} images, {s['internal']}",
        f"thresholds frozen from the internal validation split ({s['threshold_rule']}): "
        + ", ".join(f"{label} {threshold_text(t)}" for label, t in s["thresholds"].items()),
        "calibration: " + (", ".join(f"{label} {m}" for label, m in zip(labels, s["calibration"])) + " (the checkpoint's calibration.json)"
                           if s["calibration"] else "none (the checkpoint has no calibration.json: run medray evaluate)"),
        "labels that moved: " + (", ".join(s["labels_moved"]) or "none"),
    ]  # fmt: skip
    sections = [
        Section(
            "Summary",
            "summary",
            [
                overview,
                (
                    "The model, its thresholds and its calibration were applied unchanged: nothing was tuned on the external "
                    "site. What follows compares the two sites label by label."
                ),
                sentences(table, name),
            ],
        ),
        Section(
            "Prevalence",
            "prevalence",
            ["Share of positive images per label at each site; PPV and NPV below are at each site's own prevalence.", _prevalence(table)],
        ),
        Section(
            "Discrimination",
            "discrimination",
            [
                (
                    "AUROC with 95 % patient-bootstrap intervals; the difference's interval from independent patient resamples "
                    f"of each site, its p-value by DeLong's test for two independent AUROCs; moved: either says p < {s['alpha']}."
                ),
                _discrimination(table),
                Figure("roc.png", roc_two_sites(internal, external, labels, table), "ROC curves of both sites"),
            ],
        ),
        Section(
            "Operating point",
            "operating-point",
            [
                "At the frozen thresholds; PPV and NPV at each site's prevalence; 95 % patient-bootstrap intervals.",
                _side_by_side(table, list(("sensitivity", "specificity", "ppv", "npv"))),
            ],
        ),
        Section(
            "Calibration",
            "calibration",
            [
                (
                    "Calibration-in-the-large: mean predicted probability − observed rate (0 is ideal; interval by patient "
                    "bootstrap) and the logistic intercept with the slope fixed at 1 (0 is ideal, < 0: over-predicts); "
                    "calibration slope: logistic regression of the outcome on logit(p) (1 is ideal)."
                ),
                _calibration(table),
                Figure("reliability.png", _reliability(internal, external, labels, bins), "Reliability diagrams of both sites"),
            ],
        ),
        Section("Subgroups", "subgroups", _subgroups(subgroups)),
    ]
    data = {
        **s,
        "labels": json.loads(table.to_json(orient="index")),  # pandas writes NaN and ±inf as null
        "subgroups": json.loads(subgroups.to_json(orient="records")),
        "subgroup_notes": subgroups.attrs.get("notes", []),
    }
    paths = write_report(out_dir, f"medray external validation — {name}", sections, data, data_file="external.json")
    paths["external.csv"], paths["subgroups.csv"] = storage.join(out_dir, "external.csv"), storage.join(out_dir, "subgroups.csv")
    _csv(paths["external.csv"], table, index=True)
    _csv(paths["subgroups.csv"], subgroups, index=False)
    return paths
