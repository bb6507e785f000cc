import numpy as np
import pytest
import torch

from medray.training.losses import WeightedBCE, class_weights


def test_seed_weights_for_six_normal_and_two_mass_images():
    mass = np.array([[0], [0], [0], [0], [0], [0], [1], [1]], dtype=float)
    wp, wn = class_weights(mass, "seed")
    assert wp[0] == pytest.approx(0.75)
    assert wn[0] == pytest.approx(0.25)


def test_weighted_positives_and_negatives_contribute_equally():
    targets = np.array([[0.0], [0.0], [0.0], [1.0]])
    wp, wn = class_weights(targets)
    assert wp[0] * 1 == pytest.approx(wn[0] * 3)


def test_unknown_labels_are_left_out_of_the_weights_and_the_loss():
    targets = np.array([[1.0, np.nan], [0.0, 1.0], [0.0, 0.0]])
    wp, wn = class_weights(targets)
    assert (wp[1], wn[1]) == pytest.approx((0.5, 0.5))

    loss = WeightedBCE(wp, wn)
    logits = torch.zeros(3, 2)
    masked = loss(logits, torch.tensor(targets, dtype=torch.float32))
    # With logit 0 each known entry costs w·log 2; label 2's NaN row must not count.
    expected = (wp[0] * 1 + wn[0] * 2) / 3 * np.log(2) + (wp[1] * 1 + wn[1] * 1) / 2 * np.log(2)
    assert masked.item() == pytest.approx(expected, rel=1e-5)


def test_loss_matches_the_seed_formula():
    y = torch.tensor([[1.0], [0.0]])
    logits = torch.tensor([[0.3], [-1.2]])
    p = torch.sigmoid(logits)
    wp, wn = 0.75, 0.25
    expected = -(wp * torch.log(p[0]) + wn * torch.log(1 - p[1])) / 2
    assert WeightedBCE([wp], [wn])(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_weighting_gives_ones():
    wp, wn = class_weights(np.array([[0.0], [1.0]]), "none")
    assert wp.tolist() == [1.0] and wn.tolist() == [1.0]
