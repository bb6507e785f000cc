"""What trains under each freezing strategy, epoch by epoch.

Both backbones have five stages, stem first (resnet18: conv1+bn1, layer1..4; densenet121: conv0+norm0,
denseblock1..4 with their transitions), and a head.
"""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from medray.training import freezing
from medray.training.models import build_model, head_module, stage_modules

BACKBONES = ["resnet18", "densenet121"]
F, T = False, True


@pytest.fixture(scope="module", params=BACKBONES)
def model(request):
    return build_model(request.param, num_labels=3)


def trains(model) -> list[bool]:
    """Per stage, stem first, then the head: whether its parameters train (never only some of them)."""
    flags = []
    for part in [*stage_modules(model), [head_module(model)]]:
        grads = {p.requires_grad for module in part for p in module.parameters()}
        assert len(grads) == 1, "a stage is either frozen or trains as a whole"
        flags.append(grads.pop())
    return flags


def test_full_trains_everything(model):
    freezing.apply(model, "full", epoch=0)
    assert trains(model) == [T, T, T, T, T, T]


def test_head_only_is_a_linear_probe(model):
    freezing.apply(model, "head_only", epoch=0)
    assert trains(model) == [F, F, F, F, F, T]
    head = model.spec.head
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"backbone.{head}.weight", f"backbone.{head}.bias"
    ]


def test_stages_freezes_the_first_k_stages_in_every_epoch(model):
    for epoch in range(3):
        freezing.apply(model, "stages", epoch, freeze_stages=2)
        assert trains(model) == [F, F, T, T, T, T]
    freezing.apply(model, "stages", 0, freeze_stages=0)
    assert trains(model) == [T, T, T, T, T, T]
    freezing.apply(model, "stages", 0, freeze_stages=5)
    assert trains(model) == [F, F, F, F, F, T]


def test_gradual_starts_with_the_head_and_unfreezes_one_stage_from_the_top_every_n_epochs(model):
    expected = {
        0: [F, F, F, F, F, T], 1: [F, F, F, F, F, T],
        2: [F, F, F, F, T, T], 3: [F, F, F, F, T, T],
        4: [F, F, F, T, T, T],
        6: [F, F, T, T, T, T],
        8: [F, T, T, T, T, T],
        10: [T, T, T, T, T, T], 11: [T, T, T, T, T, T], 50: [T, T, T, T, T, T],
    }
    for epoch, flags in expected.items():
        freezing.apply(model, "gradual", epoch, unfreeze_every=2)
        assert trains(model) == flags, f"epoch {epoch}"


def test_apply_says_when_the_trainable_parameters_changed_so_that_ddp_wraps_again():
    model = build_model("resnet18", num_labels=3)
    assert freezing.apply(model, "full", 0) is False  # a new model trains everything already
    changed = [freezing.apply(model, "gradual", epoch, unfreeze_every=2) for epoch in range(14)]
    assert changed == [T, F, T, F, T, F, T, F, T, F, T, F, F, F]
    assert freezing.apply(model, "head_only", 14) is True
    assert freezing.apply(model, "head_only", 15) is False


def test_unknown_strategies_and_impossible_settings_are_refused():
    model = build_model("resnet18", num_labels=3)
    with pytest.raises(ValueError, match="unknown freezing strategy 'top'"):
        freezing.apply(model, "top", 0)
    with pytest.raises(ValueError, match="freeze_stages=6, but this backbone has 5 stages"):
        freezing.apply(model, "stages", 0, freeze_stages=6)
    with pytest.raises(ValueError, match="unfreeze_every"):
        freezing.apply(model, "gradual", 0, unfreeze_every=0)


def batch_norm_training(model) -> list[bool]:
    """Per stage, stem first: whether its batch norms are in training mode (all alike)."""
    flags = []
    for stage in stage_modules(model):
        modes = {m.training for module in stage for m in module.modules() if isinstance(m, _BatchNorm)}
        assert len(modes) == 1
        flags.append(modes.pop())
    return flags


def test_train_mode_keeps_the_batch_norms_of_frozen_stages_evaluating(model):
    freezing.apply(model, "stages", 0, freeze_stages=2)
    assert freezing.train_mode(model) is model
    assert model.training and head_module(model).training
    assert batch_norm_training(model) == [F, F, T, T, T]

    freezing.apply(model, "head_only", 0)
    freezing.train_mode(model)
    assert model.training and batch_norm_training(model) == [F, F, F, F, F]

    freezing.apply(model, "full", 0)
    freezing.train_mode(model)
    assert batch_norm_training(model) == [T, T, T, T, T]


def test_frozen_batch_norm_statistics_do_not_drift_in_training():
    model = build_model("resnet18", num_labels=3)
    freezing.apply(model, "stages", 0, freeze_stages=2)
    freezing.train_mode(model)
    frozen, trained = model.backbone.bn1, model.backbone.layer4[1].bn2
    before = frozen.running_mean.clone(), trained.running_mean.clone()
    model(torch.rand(2, 1, 64, 64))
    assert torch.equal(frozen.running_mean, before[0])
    assert not torch.equal(trained.running_mean, before[1])


def test_param_groups_give_the_head_lr_and_each_stage_below_it_lr_times_decay_once_more(model):
    groups = freezing.param_groups(model, lr=1e-3, lr_decay=0.5)
    assert [g["name"] for g in groups] == ["stage0", "stage1", "stage2", "stage3", "stage4", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 32, 1e-3 / 16, 1e-3 / 8, 1e-3 / 4, 1e-3 / 2, 1e-3])
    assert groups[-1]["params"] == list(head_module(model).parameters())


def test_param_groups_hold_every_parameter_once_frozen_or_not(model):
    freezing.apply(model, "head_only", 0)
    grouped = [p for g in freezing.param_groups(model, lr=0.1) for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert all(g["lr"] == 0.1 for g in freezing.param_groups(model, lr=0.1))  # lr_decay defaults to 1


def test_one_optimizer_built_frozen_trains_the_stages_unfrozen_later():
    model = build_model("resnet18", num_labels=3)
    optimizer = torch.optim.AdamW(freezing.param_groups(model, lr=1e-2, lr_decay=0.5), weight_decay=0.1)
    stem, top = model.backbone.conv1.weight, model.backbone.layer4[1].conv2.weight

    def step(epoch):
        freezing.apply(model, "gradual", epoch)
        freezing.train_mode(model)
        optimizer.zero_grad()
        model(torch.rand(2, 1, 64, 64)).sum().backward()
        optimizer.step()

    stem0, top0 = stem.clone(), top.clone()
    step(0)  # head only: frozen weights get no gradient, so not even weight decay moves them
    assert torch.equal(stem, stem0) and torch.equal(top, top0)
    step(1)  # the last stage joins
    assert torch.equal(stem, stem0) and not torch.equal(top, top0)
