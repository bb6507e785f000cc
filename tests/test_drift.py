"""Drift between scoring runs: PSI and KS of the scores, input statistics kept in _summary.json, flags and exit codes."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from checkpoints import saved_checkpoint
from dicom_files import dataset, gradient, to_bytes
from medray.cli import main
from medray.config import DriftConfig, build_config
from medray.io import images
from medray.scoring import drift, statistics
from medray.scoring.score import SUMMARY, score

LABELS = ["Mass", "Nodule"]


# --- the measures ------------------------------------------------------------------------------------


def test_psi_of_a_known_shift():
    # Half and half moved to a quarter and three quarters: 0.25·ln 2 + 0.25·ln 1.5 = 0.27465
    assert drift.psi([50, 50], [25, 75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    # An empty bin counts as a share of 1e-4, so that the index stays finite.
    assert drift.psi([10, 0], [5, 5]) == pytest.approx((0.5 - 1) * np.log(0.5 / 1) + (0.5 - 1e-4) * np.log(0.5 / 1e-4))


def test_psi_groups_the_fine_bins_into_deciles_of_the_reference():
    assert drift.reference_groups(np.ones(50)) == list(range(5, 55, 5))
    skewed = np.zeros(50)
    skewed[0], skewed[1:] = 60, 40 / 49  # 60 % of the reference in the first bin: one group, then deciles of the rest
    ends = drift.reference_groups(skewed)
    assert ends[0] == 1 and ends[-1] == 50 and len(ends) <= 5
    rng = np.random.default_rng(0)
    a, b = rng.beta(2, 5, 5000), rng.beta(2, 5, 5000)
    edges = statistics.probability_edges()
    same = drift.binned_psi(np.histogram(a, edges)[0], np.histogram(b, edges)[0])
    moved = drift.binned_psi(np.histogram(a, edges)[0], np.histogram(np.clip(b + 0.1, 0, 1), edges)[0])
    assert same < 0.01 < 0.2 < moved


def test_ks_from_histograms_is_a_lower_bound_within_one_bin_of_the_rows():
    rng = np.random.default_rng(1)
    a, b = rng.beta(2, 5, 3000), rng.beta(2.5, 5, 3000)
    edges = statistics.probability_edges()
    ha, hb = np.histogram(a, edges)[0], np.histogram(b, edges)[0]
    exact, binned = drift.rows_ks(a, b), drift.histogram_ks(ha, hb)
    assert binned <= exact <= binned + max(ha.max() / ha.sum(), hb.max() / hb.sum())


# --- comparing two score outputs (written here as scoring writes them) --------------------------------


def fake_run(folder, probs: np.ndarray, intensity: np.ndarray, modality: list[str], errors: int = 0, model: str = "m" * 64):
    """A score output with one part and its summary, as ``medray score`` leaves it (rows and statistics)."""
    n = len(probs) + errors
    frame = pd.DataFrame({"image": [f"/archive/{i}.png" for i in range(n)], "error": [""] * len(probs) + ["/x: unreadable"] * errors})
    for j, label in enumerate(LABELS):
        frame[f"prob_{label}"] = np.r_[probs[:, j], [np.nan] * errors].astype("float32")
    frame["width"] = frame["height"] = np.r_[[1024] * len(probs), [0] * errors].astype("int32")
    frame["bit_depth"] = np.r_[[8] * len(probs), [0] * errors].astype("int32")
    frame["mean_intensity"] = np.r_[intensity, [np.nan] * errors].astype("float32")
    frame["modality"], frame["view"], frame["site"] = [*modality, *[""] * errors], "", ""
    folder.mkdir(parents=True)
    frame.to_parquet(folder / "part-00000.parquet", index=False)
    summary = {"output": str(folder), "model_sha256": model, "statistics": statistics.summarise(str(folder), {}, 0.5)}
    (folder / SUMMARY).write_text(json.dumps(summary))
    return str(folder)


@pytest.fixture
def reference(tmp_path):
    rng = np.random.default_rng(2)
    probs, intensity = rng.beta(2, 6, (400, 2)), rng.normal(120, 15, 400)
    return probs, intensity, fake_run(tmp_path / "a", probs, intensity, ["CR"] * 400, errors=4)


def flagged(result) -> set[tuple[str, str]]:
    return {(c.item, c.measure) for c in result.flagged}


def test_a_run_compared_with_a_fresh_sample_of_the_same_population_flags_nothing(reference, tmp_path):
    rng = np.random.default_rng(3)
    again = fake_run(tmp_path / "b", rng.beta(2, 6, (400, 2)), rng.normal(120, 15, 400), ["CR"] * 400, errors=4)
    result = drift.compare(reference[2], again, DriftConfig())
    assert flagged(result) == set()
    assert {c.measure for c in result.checks} >= {"psi", "ks", "positive_rate", "error_rate", "mean_change", "share_change"}


def test_each_shift_is_flagged_against_its_own_limit(reference, tmp_path):
    probs, intensity, a = reference
    shifted = probs.copy()
    shifted[:, 0] = np.clip(probs[:, 0] + 0.25, 0, 1)  # Mass scores higher; Nodule as it was
    modality = ["CR"] * 300 + ["DX"] * 100  # a new modality, a quarter of the inputs
    b = fake_run(tmp_path / "b", shifted, intensity + 30, modality, errors=40)

    result = drift.compare(a, b, DriftConfig())

    assert {("score Mass", "psi"), ("score Mass", "ks"), ("score Mass", "positive_rate")} <= flagged(result)
    assert not {item for item, _ in flagged(result)} & {"score Nodule"}
    assert {("errors", "error_rate"), ("input mean_intensity", "mean_change"), ("modality DX", "new_category")} <= flagged(result)
    assert ("modality CR", "share_change") in flagged(result)  # 100 % → 75 %
    looser = DriftConfig(psi=100, ks=1, positive_rate=1, error_rate=1, mean_intensity=100, category_share=1, new_category=0.5)
    assert flagged(drift.compare(a, b, looser)) == set()


def test_runs_of_different_models_are_refused_unless_allowed(reference, tmp_path):
    probs, intensity, a = reference
    other = fake_run(tmp_path / "b", probs, intensity, ["CR"] * 400, errors=4, model="f" * 64)
    with pytest.raises(drift.DriftError, match="another model .*--allow-different-models"):
        drift.compare(a, other, DriftConfig())
    assert drift.compare(a, other, DriftConfig(), allow_different_models=True).model_sha256 == ("m" * 64, "f" * 64)


def test_without_the_rows_the_summaries_give_the_same_psi_and_a_ks_within_one_bin(reference, tmp_path):
    probs, intensity, a = reference
    b = fake_run(tmp_path / "b", np.clip(probs * 1.3, 0, 1), intensity, ["CR"] * 400, errors=4)
    with_rows = {(c.item, c.measure): c for c in drift.compare(a, b, DriftConfig()).checks}
    for folder in (a, b):  # the parts archived away: only _summary.json is left
        (tmp_path / folder.rsplit("/", 1)[1] / "part-00000.parquet").unlink()
    without = {(c.item, c.measure): c for c in drift.compare(a, b, DriftConfig()).checks}
    assert without[("score Mass", "psi")].shift == pytest.approx(with_rows[("score Mass", "psi")].shift)
    assert (without[("score Mass", "ks")].source, with_rows[("score Mass", "ks")].source) == ("summary", "rows")
    assert 0 <= with_rows[("score Mass", "ks")].shift - without[("score Mass", "ks")].shift <= 0.05
    assert without[("score Mass", "positive_rate")].a == pytest.approx(with_rows[("score Mass", "positive_rate")].a)


def test_the_command_prints_one_line_per_flag_and_exits_1_so_a_scheduler_can_alert(reference, tmp_path, capsys):
    probs, intensity, a = reference
    b = fake_run(tmp_path / "b", probs, intensity, ["CR"] * 400, errors=60)

    with pytest.raises(SystemExit) as exit:
        main(["drift", a, b, "--out", str(tmp_path / "report")])

    out, err = capsys.readouterr()
    assert exit.value.code == 1
    assert out.splitlines() == ["DRIFT errors: error_rate 0.1205 (limit 0.02; A 0.009901, B 0.1304)"]
    assert err.startswith("medray drift: 1 of ") and "drift.md" in err
    report = json.loads((tmp_path / "report" / "drift.json").read_text())
    assert report["flagged"] == 1 and report["model_sha256"] == ["m" * 64] * 2
    assert "| errors | error_rate |" in (tmp_path / "report" / "drift.md").read_text()
    assert (tmp_path / "report" / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    main(["drift", a, a, "--out", str(tmp_path / "same")])  # returns: exit 0
    assert capsys.readouterr().out.startswith("no drift beyond the limits")


def test_the_command_refuses_a_folder_that_is_not_a_score_output_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["drift", str(tmp_path), str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# --- what decoding records ---------------------------------------------------------------------------


def test_decoding_records_size_depth_and_mean_intensity_of_what_the_model_sees():
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 60), 1000, dtype=np.uint16)).save(buffer, format="PNG")
    pixels, facts = images.decode_with_facts(buffer.getvalue(), "x.png", size=32)
    assert (facts.width, facts.height, facts.bit_depth) == (60, 40, 16) and (facts.modality, facts.site) == ("", "")
    buffer = io.BytesIO()
    Image.fromarray(np.full((50, 50), 90, dtype=np.uint8)).save(buffer, format="PNG")
    pixels, facts = images.decode_with_facts(buffer.getvalue(), "y.png", size=32)
    assert facts.mean_intensity == pytest.approx(pixels.mean()) == pytest.approx(90)


def test_dicom_headers_give_coarse_codes_never_free_text():
    ds = dataset(gradient(48), InstitutionName="St. Example Hospital", ViewPosition="PA")
    ds.Modality = "CR"
    _, facts = images.decode_with_facts(to_bytes(ds), "a.dcm", size=32)
    assert (facts.modality, facts.view, facts.bit_depth, facts.width) == ("CR", "PA", 8, 48)
    assert facts.site.startswith("site-") and "Example" not in facts.site
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # pydicom's warning: malformed on purpose
        ds.ViewPosition = "pa; see Dr Who"  # not a code string: recorded as "other", never as written
    assert images.decode_with_facts(to_bytes(ds), "b.dcm", size=32)[1].view == "other"


# --- scoring for real: the same archive twice, then a shifted copy ------------------------------------


def shifted_copy(source, out):
    """The archive as another scanner would send it: its PNGs brighter, flatter, and stored at 96 px instead of
    64; everything else (DICOM, the corrupt file) as it was."""
    out.mkdir()
    for path in sorted(source.iterdir()):
        if path.suffix != ".png" or path.name == "corrupt.png":
            shutil.copy(path, out / path.name)
            continue
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        Image.fromarray(np.clip(pixels * 0.5 + 110, 0, 255).astype(np.uint8)).resize((96, 96)).save(out / path.name)
    return out


def test_scoring_keeps_input_statistics_and_drift_flags_a_shifted_archive_but_not_a_rescore(ray_session, demo_dir, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in sorted((demo_dir / "images").glob("*.png"))[:24]:
        shutil.copy(path, archive / path.name)
    for i in range(3):  # DICOM inputs carry their Modality into the statistics
        ds = dataset(gradient(64), ViewPosition="PA")
        ds.Modality = "CR"
        (archive / f"cr{i}.dcm").write_bytes(to_bytes(ds))
    (archive / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    torch.manual_seed(0)  # one untrained model, the same every run: scoring's statistics do not depend on what it learnt
    model = saved_checkpoint(tmp_path / "model", LABELS)

    def scored(source, name):
        config = build_config({"name": "drift", "storage": str(tmp_path / "runs"),
                               "score": {"input": str(source), "output": str(tmp_path / name), "checkpoint": model}})  # fmt: skip
        return score(config).output

    a, again = scored(archive, "a"), scored(archive, "a_again")
    b = scored(shifted_copy(archive, tmp_path / "shifted"), "b")

    stats = json.loads((tmp_path / "a" / SUMMARY).read_text())["statistics"]
    assert (stats["rows"], stats["errors"]) == (28, 1)
    assert stats["categorical"]["modality"] == {"CR": 3, "none": 24}
    assert stats["numeric"]["width"]["mean"] == 64 and sum(stats["labels"]["Mass"]["histogram"]) == 27
    assert drift.compare(a, again, DriftConfig()).flagged == []

    result = drift.compare(a, b, DriftConfig())
    moved = flagged(result)
    assert {("input mean_intensity", "mean_change"), ("input mean_intensity", "psi"), ("input width", "relative_mean_change")} <= moved
    assert any(item.startswith("score ") for item, _ in moved), result.checks
