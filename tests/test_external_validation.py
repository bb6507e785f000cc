"""External validation: the frozen model, its val-chosen thresholds and its calibration, unchanged, on another
site's images; what moved is reported beside the internal test split.

The model is a real resnet18 that learnt a shortcut, as models do: at the internal site every positive image
carries the ward's corner marker (a portable unit's stamp). Site B has other patients, another exposure (gamma)
and stamps that marker on every film — so, by construction, the model calls everything there positive: its
AUROC falls to chance, specificity collapses and its probabilities are far too high. The model is trained here
in-process for a few seconds (``train_shortcut_model``): the subject is the validation, not the training.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from medray.cli import main
from medray.config import build_config
from medray.data.demo_data import generate
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.evaluation.calibration import calibration_in_the_large, calibration_slope
from medray.evaluation.evaluate import evaluate
from medray.evaluation.external import validate_external
from medray.evaluation.intervals import delong, delong_unpaired, delong_variance
from medray.io import images
from medray.training import checkpoint
from medray.training.models import build_model, to_input

LABELS = ["Mass", "Effusion"]
SIZE = 32


def stamp(pixels: np.ndarray, label: str) -> np.ndarray:
    """The marker the internal site's positives carry: a bright block in one corner per label."""
    out, side = pixels.copy(), pixels.shape[0] // 5
    if label == "Mass":
        out[:side, :side] = 255
    else:
        out[:side, -side:] = 255
    return out


def write_site(rows: pd.DataFrame, out: Path, stamped_on_all: str | None = None, gamma: float = 1.0) -> pd.DataFrame:
    """Each row's image with its label's marker on positives (and ``stamped_on_all`` on every image), at ``gamma``."""
    out.mkdir(parents=True)
    paths = []
    for row in rows.itertuples():
        pixels = np.asarray(Image.open(row.source).convert("L"))
        pixels = (255 * (pixels / 255.0) ** gamma).round().astype(np.uint8)
        for label in LABELS:
            if getattr(row, label) == 1 or label == stamped_on_all:
                pixels = stamp(pixels, label)
        path = out / Path(row.source).name
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return rows.drop(columns="source").assign(image=paths)


def train_shortcut_model(frame: pd.DataFrame, directory: Path) -> str:
    """A resnet18 fitted on the train rows, input prepared exactly as medray's predictor prepares it."""
    torch.manual_seed(0)
    train = frame[frame["split"] == "train"]
    x = to_input(torch.from_numpy(np.stack([images.load(p, SIZE, 1) for p in train["image"]])), torch.device("cpu"))
    y = torch.tensor(train[LABELS].to_numpy(np.float32))
    model = build_model("resnet18", len(LABELS), 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(6):
        for batch in torch.randperm(len(x)).split(32):
            optimiser.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch]).backward()
            optimiser.step()
    directory.mkdir()
    meta = {"backbone": "resnet18", "labels": LABELS, "task": "multi-label", "in_channels": 1, "image_size": SIZE, "epoch": 0}
    checkpoint.save(str(directory), {"model": model.eval().state_dict()}, meta)
    return str(directory)


@pytest.fixture(scope="module")
def internal(tmp_path_factory, split_manifest_path, ray_session):
    """The internal site (the demo patients and split, the markers' labels), its model and its evaluation."""
    root = tmp_path_factory.mktemp("external")
    frame = read_manifest(split_manifest_path).frame
    rng = np.random.default_rng(0)
    rows = frame[["image", "patient_id", "split", "sex", "age", "view"]].rename(columns={"image": "source"})
    rows = rows.assign(Mass=(rng.random(len(rows)) < 0.3).astype(float), Effusion=(rng.random(len(rows)) < 0.3).astype(float))
    manifest = write_manifest(Manifest(write_site(rows, root / "internal"), LABELS), str(root / "internal.parquet"))
    model = train_shortcut_model(read_manifest(manifest).frame, root / "model")
    config = build_config({
        "name": "site-a", "storage": str(root / "runs"), "data": {"manifest": manifest, "image_size": SIZE},
        "evaluate": {"checkpoint": model, "bootstrap": 200, "gallery": 0},
        "validate": {"checkpoint": model},
    })  # fmt: skip
    # First the control, before the run has an evaluation: the internal figures are then computed here.
    control = validate_external(
        config.model_copy(update={"validate": config.validate.model_copy(update={"manifest": manifest, "name": "control"})})
    )
    evaluation = evaluate(config)
    return root, config, control, evaluation


@pytest.fixture(scope="module")
def site_b(internal, tmp_path_factory):
    """Other patients (another seed of the demo generator), another exposure, the marker on every film."""
    root, config, *_ = internal
    demo = generate(str(tmp_path_factory.mktemp("site_b_demo")), patients=40, image_size=64, seed=1)
    entries = pd.read_csv(demo, index_col=False)
    rng = np.random.default_rng(1)
    rows = pd.DataFrame({
        "source": [str(Path(demo).parent / "images" / name) for name in entries["Image Index"]],
        "patient_id": "B" + entries["Patient ID"].astype(str), "sex": entries["Patient Gender"], "age": entries["Patient Age"].astype(float),
        "site": "B", "Mass": (rng.random(len(entries)) < 0.2).astype(float), "Effusion": (rng.random(len(entries)) < 0.2).astype(float),
    })  # fmt: skip
    frame = write_site(rows, root / "site_b_images", stamped_on_all="Mass", gamma=0.7)
    return write_manifest(Manifest(frame, LABELS), str(root / "site_b.parquet"))


@pytest.fixture(scope="module")
def validated(internal, site_b):
    root, config, *_ = internal
    job = root / "run.yaml"
    job.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    main(["validate-external", "--config", str(job), "--set", f"validate.manifest={site_b}"])
    out = Path(config.run_dir) / "external" / "site_b"
    return out, json.loads((out / "external.json").read_text())


def test_the_frozen_thresholds_and_calibration_of_the_run_are_applied_unchanged(internal, validated):
    _, config, _, evaluation = internal
    _, report = validated
    metrics = json.loads(Path(evaluation.paths["metrics.json"]).read_text())
    assert report["thresholds"] == {label: metrics["labels"][label]["threshold"] for label in LABELS}
    calibration = json.loads((Path(config.validate.checkpoint) / "calibration.json").read_text())
    assert report["calibration"] == [o["method"] for o in calibration["outputs"]]
    assert report["internal"].startswith("read from") and report["internal_images"] == metrics["labels"]["Mass"]["n"]
    assert all(report["labels"][label]["threshold"] == metrics["labels"][label]["threshold"] for label in LABELS)


def test_each_sites_prevalence_is_reported(internal, validated, site_b):
    *_, evaluation = internal
    _, report = validated
    frame = read_manifest(site_b).frame
    assert report["rows"] == "every row of the site's manifest" and report["images"] == len(frame)
    for label in LABELS:
        row = report["labels"][label]
        assert row["prevalence_external"] == pytest.approx(frame[label].mean())
        assert row["prevalence_internal"] == pytest.approx(evaluation.table.loc[label, "prevalence"])


def test_a_marker_on_every_film_collapses_discrimination_and_specificity_and_inflates_the_probabilities(validated):
    _, report = validated
    mass = report["labels"]["Mass"]
    assert mass["auroc_internal"] > 0.9, f"the model learnt the internal site's marker: {mass['auroc_internal']}"
    assert mass["auroc_external"] < mass["auroc_lo_internal"] and mass["delong_p"] < 0.001 and mass["auroc_difference_hi"] < 0
    assert mass["specificity_external"] < 0.5 < mass["specificity_lo_internal"] and mass["specificity_moved"]
    # Everything looks positive at site B: predictions far above the observed rate, an intercept well below 0.
    assert mass["citl_external"] > 0.3 and mass["citl_lo_external"] > 0 and mass["miscalibrated_in_the_large"]
    assert mass["citl_intercept_external"] < -1 and abs(mass["citl_internal"]) < 0.15
    assert mass["auroc_moved"] and "Mass" in report["labels_moved"]


def test_the_report_a_clinician_reads_names_what_moved_with_both_sites_figures(validated):
    out, report = validated
    for name in ("external.json", "external.csv", "subgroups.csv", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    for figure in ("roc.png", "reliability.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    for anchor in ("summary", "prevalence", "discrimination", "operating-point", "calibration", "subgroups"):
        assert f'id="{anchor}"' in page
    assert "Mass: AUROC" in page and "lower, a significant change" in page and "too high" in page
    table = pd.read_csv(out / "external.csv", index_col="label")
    assert list(table.index) == LABELS and table.loc["Mass", "auroc_moved"]


def test_subgroups_of_the_external_site_are_set_beside_the_same_groups_internally(validated):
    _, report = validated
    subgroups = pd.DataFrame(report["subgroups"])
    sexes = subgroups[(subgroups["dimension"] == "sex") & (subgroups["label"] == "Mass")]
    assert set(sexes["group"]) == {"F", "M"} and sexes["auroc_internal"].notna().all()
    assert sexes["moved"].all(), "the marker moved Mass in both sexes"
    assert any("site: not analysed" in note for note in report["subgroup_notes"]), "one site: nothing to compare within it"


def test_the_internal_test_split_as_external_reports_no_difference(internal):
    *_, control, evaluation = internal
    assert control.summary["rows"] == "the test split of the site's manifest"
    assert control.summary["internal"].startswith("computed on the test split")
    table = control.table
    assert (table["delong_p"].fillna(1) > 0.05).all() and not table["auroc_moved"].any()
    assert control.summary["labels_moved"] == [] and not table["miscalibrated_in_the_large"].any()
    assert not table[["sensitivity_moved", "specificity_moved"]].to_numpy().any()
    assert table["auroc_external"].to_numpy() == pytest.approx(table["auroc_internal"].to_numpy())
    # The thresholds it chose on val itself are those the evaluation then chose and froze.
    assert table["threshold"].to_numpy() == pytest.approx(evaluation.table.loc[LABELS, "threshold"].to_numpy())


def test_a_manifest_of_other_labels_is_refused_in_one_line(internal, tmp_path, capsys):
    root, config, *_ = internal
    frame = read_manifest(config.manifest).frame.rename(columns={"Effusion": "Edema"})
    other = write_manifest(Manifest(frame, ["Mass", "Edema"]), str(tmp_path / "other.parquet"))
    job = tmp_path / "run.yaml"
    job.write_text(json.dumps(config.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exit_:
        main(["validate-external", "--config", str(job), "--set", f"validate.manifest={other}"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(other) in line and "Edema" in line


# ---- the statistics, on their own ----------------------------------------------------------------


def test_delong_variance_equals_the_structural_components_computed_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.7, 0.4, 0.5, 0.3, 0.4, 0.1])  # a tie between a positive and a negative
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc, variance = delong_variance(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p)) == pytest.approx(psi.mean())
    assert variance == pytest.approx(v10.var(ddof=1) / 3 + v01.var(ddof=1) / 4)
    # The paired test against a constant score (no variance, no covariance) leaves this AUROC's variance alone.
    assert delong(y, p, np.zeros_like(p))["se"] ** 2 == pytest.approx(variance)


def test_the_unpaired_delong_test_sums_the_variances_and_matches_the_spread_of_independent_samples():
    rng = np.random.default_rng(0)

    def sample(n, separation):
        y = rng.integers(0, 2, n)
        return y, y * separation + rng.normal(0, 1, n)

    (ya, pa), (yb, pb) = sample(300, 1.5), sample(200, 0.5)
    result = delong_unpaired(ya, pa, yb, pb)
    (_, var_a), (_, var_b) = delong_variance(ya, pa), delong_variance(yb, pb)
    assert result["difference"] == pytest.approx(roc_auc_score(ya, pa) - roc_auc_score(yb, pb))
    assert result["se"] == pytest.approx(np.sqrt(var_a + var_b))
    assert result["p_value"] < 1e-4 and delong_unpaired(ya, pa, ya, pa)["p_value"] == 1.0
    # Independently of the formula: the spread of the AUROC difference over fresh samples of both sites.
    differences = [roc_auc_score(*sample(300, 1.5)) - roc_auc_score(*sample(200, 0.5)) for _ in range(300)]
    assert result["se"] == pytest.approx(np.std(differences), rel=0.15)


def test_calibration_in_the_large_and_slope_read_shifted_and_overconfident_probabilities():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)
    calibrated, too_high, too_extreme = (1 / (1 + np.exp(-v)) for v in (z, z + 1, 2 * z))
    assert calibration_in_the_large(y, calibrated)["intercept"] == pytest.approx(0, abs=0.05)
    assert calibration_in_the_large(y, too_high)["intercept"] == pytest.approx(-1, abs=0.05)
    assert calibration_in_the_large(y, too_high)["mean_difference"] > 0.1
    assert calibration_slope(y, calibrated) == pytest.approx(1, abs=0.05)
    assert calibration_slope(y, too_extreme) == pytest.approx(0.5, abs=0.03)
