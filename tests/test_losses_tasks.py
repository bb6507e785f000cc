"""Weightings against hand-computed values, and the multi-class and ordinal losses."""

import numpy as np
import pytest
import torch

from medray.training.losses import (
    WeightedBCE,
    class_weights,
    make_loss,
    ordinal_targets,
    per_class_weights,
    probabilities,
)

SIX_NORMAL_TWO_MASS = np.array([[0.0]] * 6 + [[1.0]] * 2)


def test_pos_weight_is_negatives_over_positives():
    wp, wn = class_weights(SIX_NORMAL_TWO_MASS, "pos_weight")
    assert (wp[0], wn[0]) == pytest.approx((3.0, 1.0))


def test_effective_number_follows_cui_et_al():
    beta = 0.9
    wp, wn = class_weights(SIX_NORMAL_TWO_MASS, "effective_number", beta)
    raw_pos, raw_neg = (1 - beta) / (1 - beta**2), (1 - beta) / (1 - beta**6)
    assert (wp[0], wn[0]) == pytest.approx((2 * raw_pos / (raw_pos + raw_neg), 2 * raw_neg / (raw_pos + raw_neg)))
    assert wp[0] > wn[0]


def test_focal_term_down_weights_easy_examples():
    y = torch.tensor([[1.0], [1.0]])
    logits = torch.tensor([[4.0], [-1.0]])  # an easy and a hard positive
    plain = WeightedBCE([1.0], [1.0])(logits[:1], y[:1]) / WeightedBCE([1.0], [1.0])(logits[1:], y[1:])
    focal = WeightedBCE([1.0], [1.0], focal_gamma=2)(logits[:1], y[:1]) / WeightedBCE([1.0], [1.0], focal_gamma=2)(logits[1:], y[1:])
    assert focal < plain / 10


def test_multi_class_weights_are_balanced_inverse_frequencies():
    onehot = np.eye(3)[[0, 0, 0, 0, 1, 1, 2, 2]]
    assert per_class_weights(onehot, "seed") == pytest.approx([8 / 12, 8 / 6, 8 / 6])


def test_multi_class_loss_is_weighted_cross_entropy():
    onehot = np.eye(3)[[0, 1]]
    loss = make_loss("multi-class", np.eye(3)[[0, 0, 1, 2]], "none")
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss(logits, torch.tensor(onehot, dtype=torch.float32)).item() == pytest.approx(expected.item())


def test_ordinal_targets_say_which_grades_are_exceeded():
    grades = torch.tensor(np.eye(5)[[0, 2, 4]], dtype=torch.float32)
    assert ordinal_targets(grades).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_ordinal_probabilities_are_a_distribution_over_grades():
    probs = probabilities("ordinal", torch.tensor([[3.0, 1.0, -1.0, -3.0], [-2.0, 0.5, 2.0, -1.0]]))
    assert probs.shape == (2, 5)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2))
    assert (probs >= 0).all()


def test_ordinal_loss_penalises_distant_grades_more():
    loss = make_loss("ordinal", np.eye(5)[[0, 1, 2, 3, 4]], "none")
    truth = torch.tensor(np.eye(5)[[1]], dtype=torch.float32)
    near = torch.tensor([[3.0, -1.0, -3.0, -3.0]])  # predicts grade 1–2
    far = torch.tensor([[3.0, 3.0, 3.0, 3.0]])  # predicts grade 4
    assert loss(far, truth) > loss(near, truth)
