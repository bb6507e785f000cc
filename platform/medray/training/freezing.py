"""Transfer-learning freezing strategies: which stages of the backbone train in which epoch.

A backbone is a sequence of stages, stem first (``Backbone.stages``), and a head. The strategies:

- ``full``: everything trains.
- ``head_only``: a linear probe, only the head trains.
- ``stages``: the first ``freeze_stages`` stages stay frozen, the rest trains.
- ``gradual``: the head alone first; every ``unfreeze_every`` epochs one more stage, the last first,
  joins until everything trains.

Frozen parameters stay in the optimizer (``param_groups``) so that one optimizer serves every
epoch; they simply get no gradient. The head is always trained: it is new for the task.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medray.training.models import Classifier, head_module, stage_modules

STRATEGIES = ("full", "head_only", "stages", "gradual")


def _unwrap(model: nn.Module) -> Classifier:
    # Accept the DDP-wrapped model too, as the trainer holds it.
    return getattr(model, "module", model)


def frozen_stages(strategy: str, epoch: int, num_stages: int, freeze_stages: int = 0, unfreeze_every: int = 1) -> int:
    """How many of the first stages are frozen in ``epoch`` (counted from 0)."""
    if strategy == "full":
        return 0
    if strategy == "head_only":
        return num_stages
    if strategy == "stages":
        if not 0 <= freeze_stages <= num_stages:
            raise ValueError(f"freeze_stages={freeze_stages}, but this backbone has {num_stages} stages")
        return freeze_stages
    if strategy == "gradual":
        if unfreeze_every < 1:
            raise ValueError(f"unfreeze_every must be at least 1, not {unfreeze_every}")
        return max(num_stages - epoch // unfreeze_every, 0)
    raise ValueError(f"unknown freezing strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def apply(model: nn.Module, strategy: str, epoch: int, freeze_stages: int = 0, unfreeze_every: int = 1) -> bool:
    """Set ``requires_grad`` for ``epoch``; True when that changed which parameters train.

    DDP registers the trainable parameters when it wraps a model, so a change means wrapping again.
    """
    model = _unwrap(model)
    stages = stage_modules(model)
    before = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    for stage in stages[: frozen_stages(strategy, epoch, len(stages), freeze_stages, unfreeze_every)]:
        for module in stage:
            module.requires_grad_(False)
    return before != [p.requires_grad for p in model.parameters()]


def _frozen(stage: list[nn.Module]) -> bool:
    return not any(p.requires_grad for module in stage for p in module.parameters())


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, but batch norms of fully frozen stages evaluate.

    Otherwise their running statistics would drift to the new data while the weights that
    follow them stay fitted to the old ones.
    """
    model.train()
    for stage in stage_modules(_unwrap(model)):
        if _frozen(stage):
            for module in stage:
                for layer in module.modules():
                    if isinstance(layer, _BatchNorm):
                        layer.eval()
    return model


def param_groups(model: nn.Module, lr: float, lr_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with discriminative learning rates, stem first, head last.

    The head gets ``lr``, the last stage ``lr * lr_decay``, the one before ``lr * lr_decay**2``
    and so on. Every parameter is in a group, frozen or not.
    """
    model = _unwrap(model)
    stages = stage_modules(model)
    groups = [
        {"params": [p for module in stage for p in module.parameters()], "lr": lr * lr_decay ** (len(stages) - i),
         "name": f"stage{i}"}
        for i, stage in enumerate(stages)
    ]
    return groups + [{"params": list(head_module(model).parameters()), "lr": lr, "name": "head"}]
