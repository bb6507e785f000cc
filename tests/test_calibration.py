"""ECE on constructed data; the calibration fitted on val (prior correction, Platt, isotonic) and the checkpoint's calibration.json."""

import json

import numpy as np
import pytest
import torch

from medray.evaluation.calibration import (
    Calibration,
    CalibrationError,
    expected_calibration_error,
    fit,
    identity,
    load,
    logits_from_probabilities,
    reliability,
    save,
)
from medray.evaluation.predict import Predictor, decode_batch
from medray.training import checkpoint
from medray.training.losses import make_loss, prior_shift
from medray.training.models import build_model


def test_ece_of_a_constructed_example():
    # bin [0.2, 0.3): 4 images predicted 0.25, 1 positive → gap 0; bin [0.8, 0.9): 6 images predicted 0.8,
    # 3 positive → gap 0.3. ECE = (4·0 + 6·0.3) / 10 = 0.18
    p = np.array([0.25] * 4 + [0.8] * 6)
    y = np.array([1, 0, 0, 0] + [1, 1, 1, 0, 0, 0])
    assert expected_calibration_error(y, p, bins=10) == pytest.approx(0.18)
    table = reliability(y, p, bins=10)
    assert table["count"].sum() == 10 and table.loc[8, "observed"] == pytest.approx(0.5)


def test_a_perfectly_calibrated_model_has_an_ece_near_zero():
    rng = np.random.default_rng(0)
    p = rng.random(50_000)
    assert expected_calibration_error(rng.random(50_000) < p, p) < 0.01


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _outcomes(n, rng, prevalence_logit=0.0, reported=lambda z: z):
    """Outcomes drawn from true logits z; the model reports ``reported(z)`` for two outputs."""
    z = rng.normal(prevalence_logit, 1.5, size=(n, 2))
    y = (rng.random((n, 2)) < _sigmoid(z)).astype(float)
    return _sigmoid(reported(z)), y, np.arange(n) // 2  # two images per patient


def test_the_prior_shift_of_seed_weighting_is_log_of_negatives_over_positives_and_undoing_it_is_exact():
    # 100 positives and 900 negatives: wp = 900/1000, wn = 100/1000, so the model's logit is log 9 too high.
    targets = np.array([[1.0]] * 100 + [[0.0]] * 900)
    shift = prior_shift(make_loss("multi-label", targets, "seed"))
    assert shift == pytest.approx([np.log(9)])
    # A weighted model that says 0.5 means 0.1: odds 1 divided by 9.
    prior = Calibration("multi-label", ({"method": "prior", "shift": shift[0]},))
    assert prior.apply(np.array([[0.5], [0.9]])) == pytest.approx(np.array([[0.1], [0.5]]))
    assert prior_shift(make_loss("multi-label", targets, "none")) == [0.0]
    assert prior_shift(make_loss("multi-class", np.eye(3)[[0, 0, 1, 2]], "seed")) == pytest.approx(np.log([4 / 6, 4 / 3, 4 / 3]).tolist())


def test_a_model_trained_with_seed_weights_is_calibrated_by_the_prior_correction_where_a_temperature_cannot():
    rng = np.random.default_rng(0)
    shift = np.log(9)  # a rare finding (true logits around -2.5) trained with seed weights
    weighted = lambda z: z + shift  # noqa: E731
    (val_p, val_y, val_g), (test_p, test_y, _) = (_outcomes(3000, rng, -2.5, weighted) for _ in range(2))
    fitted, scores = fit("multi-label", val_p, val_y, val_g, prior_shift=[shift, shift])
    after = fitted.apply(test_p)
    for k in range(2):
        chosen = scores[k][fitted.methods[k]]
        assert fitted.methods[k] in ("prior", "platt", "isotonic") and chosen["ece"] < scores[k]["none"]["ece"] / 5
        before_ece, after_ece = expected_calibration_error(test_y[:, k], test_p[:, k]), expected_calibration_error(test_y[:, k], after[:, k])
        assert before_ece > 0.2 and after_ece < 0.03
        assert np.argsort(after[:, k], kind="stable").tolist() == np.argsort(test_p[:, k], kind="stable").tolist() or fitted.methods[k] == "isotonic"


def test_platt_scaling_fitted_on_val_lowers_the_test_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    (val_p, val_y, val_g), (test_p, test_y, _) = (_outcomes(4000, rng, reported=lambda z: 3 * z) for _ in range(2))
    fitted, _ = fit("multi-label", val_p, val_y, val_g)
    after = fitted.apply(test_p)
    for k in range(2):
        before_ece, after_ece = expected_calibration_error(test_y[:, k], test_p[:, k]), expected_calibration_error(test_y[:, k], after[:, k])
        assert after_ece < before_ece / 3
        if fitted.methods[k] == "platt":
            assert fitted.outputs[k]["slope"] == pytest.approx(1 / 3, rel=0.15)


def test_a_calibrated_model_is_left_as_it_is_or_barely_moved():
    rng = np.random.default_rng(1)
    (val_p, val_y, val_g), (test_p, test_y, _) = (_outcomes(3000, rng) for _ in range(2))
    fitted, _ = fit("multi-label", val_p, val_y, val_g)
    after = fitted.apply(test_p)
    for k in range(2):
        assert expected_calibration_error(test_y[:, k], after[:, k]) <= expected_calibration_error(test_y[:, k], test_p[:, k]) + 0.01


def test_isotonic_maps_are_tried_only_where_val_has_enough_positives_and_negatives():
    rng = np.random.default_rng(0)
    small = _outcomes(60, rng)
    large = _outcomes(3000, rng)
    assert "isotonic" not in fit("multi-label", *small)[1][0]
    assert "isotonic" in fit("multi-label", *large)[1][0]


def test_single_label_tasks_get_one_shared_softmax_temperature_and_ordinal_maps_per_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (2000, 3))
    true = torch.softmax(torch.tensor(logits), 1).numpy()
    classes = np.array([rng.choice(3, p=row) for row in true])
    reported = torch.softmax(torch.tensor(logits * 4), 1).numpy()
    fitted, _ = fit("multi-class", reported, np.eye(3)[classes], np.arange(2000))
    assert fitted.methods == ["temperature"] * 3
    assert len({o["temperature"] for o in fitted.outputs}) == 1 and fitted.outputs[0]["temperature"] == pytest.approx(4, rel=0.2)
    ordinal = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    exceeds = 1 - np.cumsum(ordinal, axis=1)[:, :-1]
    assert logits_from_probabilities("ordinal", ordinal) == pytest.approx(np.log(exceeds / (1 - exceeds)))
    assert identity("ordinal", 2).apply(ordinal) == pytest.approx(ordinal)


def test_calibration_json_lives_in_the_checkpoint_and_the_predictor_applies_it(tmp_path):
    model = build_model("resnet18", 2, 1)
    meta = {"backbone": "resnet18", "labels": ["A", "B"], "task": "multi-label", "in_channels": 1, "image_size": 32}
    checkpoint.save(str(tmp_path), {"model": model.state_dict()}, meta)
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "x.png")
    def batch():  # decoded as predict's Ray Data tasks decode, for the model's actor
        return decode_batch({"image": np.array([str(tmp_path / "x.png")])}, 32, 1)

    raw = Predictor(str(tmp_path))(batch())
    assert load(str(tmp_path), "multi-label", 2) is None

    platt = {"method": "platt", "shift": 1.0, "slope": 0.5, "intercept": -0.25}
    save(str(tmp_path), Calibration("multi-label", (platt, {"method": "prior", "shift": 2.0})))
    assert json.loads((tmp_path / "calibration.json").read_text())["outputs"][0] == platt
    calibrated = Predictor(str(tmp_path))(batch())
    uncalibrated = Predictor(str(tmp_path), calibrated=False)(batch())
    logit = {label: np.log(raw[f"prob_{label}"] / (1 - raw[f"prob_{label}"])) for label in "AB"}
    assert calibrated["prob_A"] == pytest.approx(_sigmoid(0.5 * (logit["A"] - 1.0) - 0.25), abs=1e-5)
    assert calibrated["prob_B"] == pytest.approx(_sigmoid(logit["B"] - 2.0), abs=1e-5)
    assert uncalibrated["prob_A"] == pytest.approx(raw["prob_A"])

    # A file from before Platt and isotonic maps: a temperature per output still divides the logits.
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": [2.0, 0.5]}))
    scaled = Predictor(str(tmp_path))(batch())
    for label, t in (("A", 2.0), ("B", 0.5)):
        assert scaled[f"prob_{label}"] == pytest.approx(_sigmoid(logit[label] / t), abs=1e-5)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"temperature": [1.0, -2]}', "positive numbers"),
        ('{"version": 2, "outputs": [{"method": "platt", "slope": 1}, {"method": "none"}]}', "output 0 \\(platt\\) lacks intercept"),
        ('{"version": 2, "outputs": [{"method": "magic"}, {"method": "none"}]}', "method of none, prior"),
        ('{"version": 2, "outputs": [{"method": "none"}]}', "1 calibrated outputs for a model with 2"),
        ("{not json", "not JSON"),
    ],
)
def test_a_malformed_calibration_file_is_an_error_naming_it(tmp_path, content, says):
    (tmp_path / "calibration.json").write_text(content)
    with pytest.raises(CalibrationError, match=f"calibration.json.*{says}"):
        load(str(tmp_path), "multi-label", 2)
