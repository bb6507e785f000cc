"""ECE on constructed data, temperature scaling fitted on val, and the checkpoint's calibration.json."""

import json

import numpy as np
import pytest
import torch

from medray.evaluation.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    load_temperature,
    logits_from_probabilities,
    reliability,
    save_temperature,
)
from medray.evaluation.predict import Predictor, decode_batch
from medray.training import checkpoint
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


def _overconfident(n, rng):
    """Outcomes from logits z, but the model reports 3·z: far too sure of itself."""
    z = rng.normal(0, 1.5, size=(n, 2))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-z))).astype(float)
    return 1 / (1 + np.exp(-3 * z)), y


def test_temperature_scaling_fitted_on_val_lowers_the_test_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    (val_p, val_y), (test_p, test_y) = _overconfident(4000, rng), _overconfident(4000, rng)
    temperature = fit_temperature("multi-label", val_p, val_y)
    assert temperature == pytest.approx([3, 3], rel=0.15)
    after = calibrate("multi-label", test_p, temperature)
    for k in range(2):
        before_ece, after_ece = expected_calibration_error(test_y[:, k], test_p[:, k]), expected_calibration_error(test_y[:, k], after[:, k])
        assert after_ece < before_ece / 3
        assert np.argsort(after[:, k]).tolist() == np.argsort(test_p[:, k]).tolist()  # ranking (AUROC) unchanged


def test_single_label_tasks_get_one_shared_softmax_temperature_and_ordinal_one_per_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (2000, 3))
    true = torch.softmax(torch.tensor(logits), 1).numpy()
    classes = np.array([rng.choice(3, p=row) for row in true])
    reported = torch.softmax(torch.tensor(logits * 4), 1).numpy()
    t = fit_temperature("multi-class", reported, np.eye(3)[classes])
    assert len(t) == 3 and len(set(t)) == 1 and t[0] == pytest.approx(4, rel=0.2)
    ordinal = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    exceeds = 1 - np.cumsum(ordinal, axis=1)[:, :-1]
    assert logits_from_probabilities("ordinal", ordinal) == pytest.approx(np.log(exceeds / (1 - exceeds)))
    assert calibrate("ordinal", ordinal, [1.0, 1.0]) == pytest.approx(ordinal)


def test_calibration_json_lives_in_the_checkpoint_and_the_predictor_applies_it(tmp_path):
    model = build_model("resnet18", 2, 1)
    meta = {"backbone": "resnet18", "labels": ["A", "B"], "task": "multi-label", "in_channels": 1, "image_size": 32}
    checkpoint.save(str(tmp_path), {"model": model.state_dict()}, meta)
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "x.png")
    def batch():  # decoded as predict's Ray Data tasks decode, for the model's actor
        return decode_batch({"image": np.array([str(tmp_path / "x.png")])}, 32, 1)

    raw = Predictor(str(tmp_path))(batch())
    assert load_temperature(str(tmp_path)) is None

    save_temperature(str(tmp_path), [2.0, 0.5])
    assert json.loads((tmp_path / "calibration.json").read_text()) == {"temperature": [2.0, 0.5]}
    scaled = Predictor(str(tmp_path))(batch())
    uncalibrated = Predictor(str(tmp_path), calibrated=False)(batch())
    for label, t in (("A", 2.0), ("B", 0.5)):
        logit = np.log(raw[f"prob_{label}"] / (1 - raw[f"prob_{label}"]))
        assert scaled[f"prob_{label}"] == pytest.approx(1 / (1 + np.exp(-logit / t)), abs=1e-5)
        assert uncalibrated[f"prob_{label}"] == pytest.approx(raw[f"prob_{label}"])


def test_a_malformed_calibration_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "calibration.json").write_text('{"temperature": [1.0, -2]}')
    with pytest.raises(ValueError, match="calibration.json.*positive numbers"):
        load_temperature(str(tmp_path))
