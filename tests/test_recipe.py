"""The training recipe: warm-up then cosine, a moving average of the weights, early stopping, label smoothing."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medray.config import build_config
from medray.training import recipe
from medray.training.losses import WeightedBCE, WeightedCE
from medray.training.trainer import trainee


def test_the_learning_rate_warms_up_then_decays_to_zero():
    factors = [recipe.lr_factor(e, 10, 2) for e in range(11)]
    assert factors[0] < factors[1] < factors[2] == 1.0, "linear warm-up over two epochs, full rate after it"
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])), "then only down"
    assert factors[10] == pytest.approx(0.0, abs=1e-12)
    assert recipe.lr_factor(0, 10, 0) == 1.0, "no warm-up: the full rate from the first epoch"


def test_early_stop_waits_patience_epochs_without_improvement():
    stop = recipe.EarlyStop(patience=2)
    assert [stop.update(s) for s in (0.6, 0.7, 0.69, 0.70, 0.71, 0.5, 0.5)] == [False, False, False, True, False, False, True]
    assert stop.best == 0.71
    never = recipe.EarlyStop(patience=None)
    assert not any(never.update(0.5) for _ in range(20))
    assert not recipe.EarlyStop(2).update(math.nan), "an undefined AUROC counts as no improvement, not a stop by itself"


def test_the_moving_average_lags_the_raw_weights_and_resumes_where_it_was():
    model = torch.nn.Linear(3, 1)
    ema = recipe.averaged(model, 0.9)
    start = model.weight.detach().clone()
    ema.update_parameters(model)  # the first step copies the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, start + 0.1), "one step moves the average a tenth of the way"
    resumed = recipe.averaged(model, 0.9, ema.module.state_dict())
    resumed.update_parameters(model)
    assert torch.allclose(resumed.module.weight, start + 0.19), "a resumed average goes on, not over"
    assert recipe.averaged(model, 0.0) is None


def test_a_resumed_run_evaluates_the_average_and_trains_on_from_the_raw_weights():
    config = build_config({"train": {"epochs": 4, "ema": 0.5}})
    run = trainee(config, 4, torch.device("cpu"))
    run.model(torch.rand(2, 1, 32, 32)).sum().backward()
    run.optimizer.step()
    run.ema.update_parameters(run.model)
    run.stop.update(0.8)
    saved = run.state(epoch=0)
    again = trainee(config, 4, torch.device("cpu"), saved)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, saved["trained"][name]), name
    for name, value in again.evaluated.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    assert again.first_epoch == 1 and again.stop.best == 0.8


def test_binary_label_smoothing_pulls_targets_towards_one_half():
    logits, targets = torch.randn(8, 3), torch.randint(0, 2, (8, 3)).float()
    smoothed = WeightedBCE(np.ones(3), np.ones(3), smoothing=0.1)(logits, targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets * 0.9 + 0.05, reduction="none").mean(dim=0).sum()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_class_label_smoothing_matches_torch():
    logits, classes = torch.randn(8, 4), torch.randint(0, 4, (8,))
    smoothed = WeightedCE(np.ones(4), smoothing=0.1)(logits, F.one_hot(classes, 4).float())
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, classes, label_smoothing=0.1).item(), rel=1e-5)
