"""Several enriched labels at once, cross-site test splits, grouped stratified k-fold, and official splits kept."""

import logging

import numpy as np
import pandas as pd
import pytest

from medray.config import build_config
from medray.data.manifest import Manifest
from medray.data.splits import FOLD, fold_view, split_by_patient, split_with_config


def synthetic(patients=400, seed=1, sites=("A", "B", "C")) -> Manifest:
    """Patients with 1–4 studies at one site; Mass is rare, Nodule and Effusion commoner."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        mass, nodule, effusion = rng.random() < 0.08, rng.random() < 0.2, rng.random() < 0.25
        site = sites[p % len(sites)]
        rows += [{"image": f"/x/{p}_{s}.png", "patient_id": f"p{p}", "site": site,
                  "Mass": float(mass), "Nodule": float(nodule), "Effusion": float(effusion)}
                 for s in range(int(rng.integers(1, 5)))]  # fmt: skip
    return Manifest(pd.DataFrame(rows), ["Mass", "Nodule", "Effusion"])


def shares(frame, name, labels):
    part = frame[frame["split"] == name]
    return {label: part[label].mean() for label in labels}


def test_val_and_test_are_enriched_for_every_listed_label():
    manifest = synthetic()
    splits = split_by_patient(manifest, val=0.1, test=0.1, min_positive=0.3, label=["Nodule", "Effusion"], seed=0)
    for name in ("val", "test"):
        for label, share in shares(splits, name, ["Nodule", "Effusion"]).items():
            assert share >= 0.3, (name, label, share)
        assert abs((splits["split"] == name).sum() - 0.1 * len(splits)) <= 8
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()


def test_a_rare_label_keeps_its_positive_patients_in_train_and_says_so(caplog):
    manifest = synthetic()
    splits = split_by_patient(manifest, val=0.15, test=0.15, min_positive=0.5, label=["Mass", "Effusion"], seed=0)
    mass_patients = splits[splits["Mass"] == 1].groupby("patient_id")["split"].first()
    assert (mass_patients == "train").mean() >= 0.5
    assert any("'Mass'-positive images, short of" in r.getMessage() for r in caplog.records)


def test_one_label_gives_the_same_split_as_a_list_of_that_label():
    manifest = synthetic()
    assert split_by_patient(manifest, label="Nodule", seed=3)["split"].equals(split_by_patient(manifest, label=["Nodule"], seed=3)["split"])


def test_a_held_out_site_is_exactly_the_test_split():
    splits = split_by_patient(synthetic(), val=0.15, sites=["B"], min_positive=0.3, label="Nodule", seed=0)
    assert (splits.loc[splits["split"] == "test", "site"] == "B").all()
    assert (splits.loc[splits["site"] == "B", "split"] == "test").all()
    assert set(splits.loc[splits["site"] != "B", "split"]) == {"train", "val"}


def test_a_patient_seen_at_two_sites_goes_to_test_whole():
    manifest = synthetic()
    moved = manifest.frame["patient_id"] == "p0"  # a site-A patient also imaged at B
    manifest.frame.loc[moved[moved].index[:1], "site"] = "B"
    splits = split_by_patient(manifest, sites=["B"], seed=0)
    assert set(splits.loc[splits["patient_id"] == "p0", "split"]) == {"test"}


def test_an_unknown_site_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\['Z'\] do not occur"):
        split_by_patient(synthetic(), sites=["Z"])


def test_folds_are_patient_disjoint_stratified_and_exclude_test():
    manifest = synthetic(patients=600)
    splits = split_by_patient(manifest, test=0.15, min_positive=0.3, label="Mass", folds=5, seed=0)
    assert (splits.groupby("patient_id")[FOLD].nunique() == 1).all()
    assert (splits.loc[splits["split"] == "test", FOLD] == -1).all()
    inside = splits[splits[FOLD] >= 0]
    assert sorted(inside[FOLD].unique()) == [0, 1, 2, 3, 4]
    # the rare label is spread over every fold, each holding its share of the Mass patients
    mass = inside[inside["Mass"] == 1].groupby(FOLD)["patient_id"].nunique()
    assert len(mass) == 5 and mass.max() - mass.min() <= 2
    assert (inside.loc[inside[FOLD] == 0, "split"] == "val").all()
    assert (inside.loc[inside[FOLD] != 0, "split"] == "train").all()


def test_fold_view_makes_the_chosen_fold_val():
    splits = split_by_patient(synthetic(), folds=4, seed=0)
    view = fold_view(splits, 2)
    assert (view.loc[view[FOLD] == 2, "split"] == "val").all()
    assert (view.loc[view[FOLD].isin([0, 1, 3]), "split"] == "train").all()
    assert view.loc[view[FOLD] == -1, "split"].eq("test").all()
    with pytest.raises(ValueError, match="data.fold=9 is not a fold"):
        fold_view(splits, 9)


def test_the_split_config_section_reaches_the_split():
    config = build_config({"split": {"labels": ["Nodule", "Effusion"], "folds": 3, "min_positive": 0.3}})
    splits = split_with_config(synthetic(), config.split)
    assert sorted(splits[FOLD].unique()) == [-1, 0, 1, 2]
    assert shares(splits, "test", ["Nodule"])["Nodule"] >= 0.3


def test_medray_split_takes_several_labels_sites_and_folds(tmp_path):
    from medray.cli import main
    from medray.data.manifest import read_manifest, write_manifest

    source = write_manifest(synthetic(), str(tmp_path / "manifest.parquet"))
    out = str(tmp_path / "split.parquet")
    main(["split", source, out, "--label", "Nodule,Effusion", "--min-positive", "0.3", "--sites", "C", "--folds", "3"])
    frame = read_manifest(out).frame
    assert (frame.loc[frame["site"] == "C", "split"] == "test").all()
    assert sorted(frame.loc[frame["site"] != "C", FOLD].unique()) == [0, 1, 2]


def test_medray_split_keeps_an_official_split_with_a_warning_unless_forced(tmp_path, caplog):
    from medray.cli import main
    from medray.data.manifest import Manifest, read_manifest, write_manifest

    manifest = synthetic()
    official = np.where(manifest.frame.index % 10 == 0, "test", np.where(manifest.frame.index % 10 == 1, "val", "train"))
    source = write_manifest(Manifest(manifest.frame.assign(split=official), manifest.labels), str(tmp_path / "m.parquet"))
    with caplog.at_level(logging.WARNING, logger="medray.data.splits"):
        main(["split", source, str(tmp_path / "kept.parquet")])
    assert (read_manifest(str(tmp_path / "kept.parquet")).frame["split"] == official).all()
    assert "already has a split (train 799, test 100, val 100): kept; pass --force" in caplog.text

    main(["split", source, str(tmp_path / "forced.parquet"), "--force"])
    forced = read_manifest(str(tmp_path / "forced.parquet")).frame
    assert (forced["split"] != official).any() and (forced.groupby("patient_id")["split"].nunique() == 1).all()
