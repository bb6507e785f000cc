"""Consensus labels from rater votes: majority, the tie rule, agreement, Fleiss' and Cohen's kappa."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from medray.data.labels import (
    agreement_summary,
    attach,
    cohen_pairs,
    consensus,
    dawid_skene,
    fleiss_from_votes,
    fleiss_kappa,
)
from medray.data.manifest import Manifest


def votes(rows):
    return pd.DataFrame(rows, columns=["Image Index", "Rater", "Mass", "Nodule"])


FOUR_RATERS = votes([
    ("a.png", "R1", 1, 0), ("a.png", "R2", 1, 0), ("a.png", "R3", 1, 1), ("a.png", "R4", 1, 1),
    ("b.png", "R1", 1, 0), ("b.png", "R2", 1, 0), ("b.png", "R3", 0, 0), ("b.png", "R4", 1, np.nan),
])  # fmt: skip


def test_majority_vote_with_agreement_and_vote_counts():
    table = consensus(FOUR_RATERS, ["Mass", "Nodule"])
    assert table.loc["a.png", "Mass"] == 1 and table.loc["a.png", "agreement_Mass"] == "unanimous"
    assert table.loc["b.png", "Mass"] == 1 and table.loc["b.png", "agreement_Mass"] == "majority"
    assert table.loc["b.png", "Nodule"] == 0 and table.loc["b.png", "agreement_Nodule"] == "unanimous"  # blank vote not cast
    assert table.loc["b.png", "raters_Nodule"] == 3 and table.loc["a.png", "votes_Mass"] == 4


@pytest.mark.parametrize(("rule", "expected"), [("unknown", np.nan), ("positive", 1.0), ("negative", 0.0)])
def test_a_two_two_split_follows_the_documented_tie_rule(rule, expected):
    table = consensus(FOUR_RATERS, ["Nodule"], tie=rule)
    assert table.loc["a.png", "agreement_Nodule"] == "tie"
    assert table.loc["a.png", "Nodule"] == pytest.approx(expected, nan_ok=True)


def test_fleiss_kappa_reproduces_the_worked_example_of_fleiss_1971_as_on_wikipedia():
    # 10 subjects, 14 raters, 5 categories: kappa = 0.210
    counts = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])  # fmt: skip
    assert fleiss_kappa(counts) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_is_one_for_perfect_agreement_and_computable_from_vote_counts():
    assert fleiss_from_votes([3, 0, 3, 0], [3, 3, 3, 3]) == pytest.approx(1.0)
    # binary counts (positive, negative) per image, by hand: P̄ = mean(1, 1/3, 1/3, 1) = 2/3; p = 0.5 → P̄e = 0.5
    assert fleiss_from_votes([3, 2, 1, 0], [3, 3, 3, 3]) == pytest.approx((2 / 3 - 0.5) / 0.5)


def test_cohen_kappa_for_each_pair_of_raters_equals_scikit_learn():
    two = votes([(f"{i}.png", r, v, 0) for i, (x, y) in enumerate([(1, 1), (1, 0), (0, 0), (0, 0), (1, 1), (0, 1)]) for r, v in (("R1", x), ("R2", y))])
    pairs = cohen_pairs(two, ["Mass"])
    assert len(pairs) == 1 and pairs.loc[0, "images"] == 6
    assert pairs.loc[0, "cohen_kappa"] == pytest.approx(cohen_kappa_score([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]))
    # by hand: observed 4/6, chance 0.5·0.5 + 0.5·0.5 = 0.5 → (2/3 − 1/2) / (1/2) = 1/3
    assert pairs.loc[0, "cohen_kappa"] == pytest.approx(1 / 3)


def test_attaching_consensus_to_a_manifest_joins_on_the_file_name():
    frame = pd.DataFrame({"image": ["/x/a.png", "s3://b/c/b.png", "/x/unrated.png"], "patient_id": ["1", "2", "3"],
                          "Mass": [0.0, 0.0, 1.0], "Nodule": [0.0, 1.0, 0.0]})  # fmt: skip
    manifest = Manifest(frame, ["Mass", "Nodule"])
    replaced = attach(manifest, FOUR_RATERS).frame
    assert replaced["Mass"].tolist() == [1.0, 1.0, 1.0]  # consensus replaced the labels of rated images
    assert replaced["agreement_Mass"].tolist() == ["unanimous", "majority", "none"]
    assert np.isnan(replaced.loc[0, "Nodule"])  # the tie became unknown
    kept = attach(manifest, FOUR_RATERS, replace_labels=False).frame
    assert kept["Mass"].tolist() == [0.0, 0.0, 1.0] and "votes_Mass" in kept
    summary = agreement_summary(kept, ["Mass", "Nodule"])
    assert summary.loc["Mass", "images rated"] == 2 and summary.loc["Nodule", "tie"] == pytest.approx(0.5)


def test_votes_other_than_zero_and_one_are_refused_naming_the_column():
    with pytest.raises(ValueError, match="'Mass'"):
        consensus(votes([("a.png", "R1", 2, 0)]), ["Mass"])


def test_medray_consensus_writes_the_manifest_with_agreement_columns(tmp_path, capsys):
    from medray.cli import main
    from medray.data.manifest import read_manifest, write_manifest

    frame = pd.DataFrame({"image": ["/x/a.png", "/x/b.png"], "patient_id": ["1", "2"], "Mass": [0.0, 0.0], "Nodule": [0.0, 0.0]})
    write_manifest(Manifest(frame, ["Mass", "Nodule"]), str(tmp_path / "m.parquet"))
    FOUR_RATERS.to_csv(tmp_path / "votes.csv", index=False)
    main(["consensus", str(tmp_path / "votes.csv"), str(tmp_path / "m.parquet"), str(tmp_path / "out.parquet"), "--tie", "positive"])
    out = read_manifest(str(tmp_path / "out.parquet"))
    assert out.frame["Mass"].tolist() == [1.0, 1.0] and out.frame["Nodule"].tolist() == [1.0, 0.0]
    assert out.frame["agreement_Nodule"].tolist() == ["tie", "unanimous"]
    printed = capsys.readouterr().out
    assert "fleiss_kappa" in printed and "cohen mean" in printed


def simulated_votes(raters: dict[str, tuple[float, float]], images: int = 2000, prevalence: float = 0.2, seed: int = 0):
    """Votes on ``images`` images from raters with the given (sensitivity, specificity), and the truth."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(images) < prevalence).astype(float)
    rows = []
    for name, (sensitivity, specificity) in raters.items():
        p_positive = np.where(truth == 1, sensitivity, 1 - specificity)
        rows += [(f"{i}.png", name, int(v)) for i, v in enumerate(rng.random(images) < p_positive)]
    return pd.DataFrame(rows, columns=["Image Index", "Rater", "Mass"]), pd.Series(truth, index=[f"{i}.png" for i in range(images)])


def test_dawid_skene_recovers_each_raters_accuracy_and_outvotes_a_careless_majority():
    # Two careful readers and three careless ones: the majority follows the careless three.
    raters = {"E1": (0.95, 0.98), "E2": (0.92, 0.97), "C1": (0.6, 0.7), "C2": (0.55, 0.75), "C3": (0.6, 0.72)}
    votes_, truth = simulated_votes(raters)
    posterior, estimated = dawid_skene(votes_, "Mass")
    for name, (sensitivity, specificity) in raters.items():
        assert estimated.loc[name, "sensitivity"] == pytest.approx(sensitivity, abs=0.05)
        assert estimated.loc[name, "specificity"] == pytest.approx(specificity, abs=0.03)
    majority = consensus(votes_, ["Mass"])["Mass"].reindex(truth.index)
    weighted = consensus(votes_, ["Mass"], method="dawid-skene")
    assert weighted["posterior_Mass"].reindex(truth.index).to_numpy() == pytest.approx(posterior.reindex(truth.index).to_numpy())
    right_majority, right_weighted = (majority == truth).mean(), (weighted["Mass"].reindex(truth.index) == truth).mean()
    assert 1 - right_weighted < (1 - right_majority) / 2  # fewer than half the majority's errors


def test_on_the_demo_data_dawid_skene_estimates_the_simulated_raters(tmp_path):
    from medray.data.demo_data import FINDINGS, RATER_ACCURACY, generate

    generate(str(tmp_path), patients=600, image_size=16)
    votes_ = pd.read_csv(tmp_path / "rater_votes.csv")
    for finding in FINDINGS:
        _, estimated = dawid_skene(votes_, finding)
        sensitivity, specificity = RATER_ACCURACY[finding]
        for k, rater in enumerate(["R1", "R2", "R3"]):  # the demo's raters see 4 % less, as much and 4 % more
            skill = 1 + 0.04 * (k - 1)
            # Few positives (100–150 images per finding) and three raters: sensitivity is known to ±0.12 here.
            assert estimated.loc[rater, "sensitivity"] == pytest.approx(min(sensitivity * skill, 0.995), abs=0.12)
            assert estimated.loc[rater, "specificity"] == pytest.approx(1 - (1 - specificity) / skill, abs=0.015)


def test_medray_consensus_with_dawid_skene_writes_posteriors_and_prints_each_raters_accuracy(tmp_path, capsys):
    from medray.cli import main
    from medray.data.manifest import read_manifest, write_manifest

    votes_, truth = simulated_votes({"E1": (0.95, 0.98), "C1": (0.6, 0.7), "C2": (0.55, 0.75)}, images=300)
    frame = pd.DataFrame({"image": [f"/x/{name}" for name in truth.index], "patient_id": [str(i) for i in range(300)], "Mass": 0.0})
    write_manifest(Manifest(frame, ["Mass"]), str(tmp_path / "m.parquet"))
    votes_.to_csv(tmp_path / "votes.csv", index=False)
    main(["consensus", str(tmp_path / "votes.csv"), str(tmp_path / "m.parquet"), str(tmp_path / "out.parquet"), "--method", "dawid-skene"])
    out = read_manifest(str(tmp_path / "out.parquet")).frame
    assert ((out["posterior_Mass"] >= 0.5).astype(float) == out["Mass"]).all() and out["posterior_Mass"].between(0, 1).all()
    printed = capsys.readouterr().out
    assert "Dawid-Skene" in printed and all(name in printed for name in ("E1", "C1", "C2"))
