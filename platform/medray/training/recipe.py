"""The training recipe: what makes small, imbalanced medical datasets train well.

- **Warm-up, then cosine decay** of the learning rate (``train.warmup_epochs``): the first updates of a
  freshly initialised head are large and noisy; ramping the rate up keeps them from wrecking the
  backbone, and the cosine tail settles the weights.
- **An exponential moving average of the weights** (``train.ema``, the decay per step; 0 switches it
  off): validation, checkpoints, evaluation and scoring use the averaged weights, which are smoother than
  the last step's on a small validation set. Training itself goes on from the raw weights.
- **Early stopping** (``train.patience``): stop when the validation mean AUROC has not improved for
  that many epochs; the best checkpoint is kept either way (checkpoints are ranked by it).
- **Label smoothing** (``loss.label_smoothing``) lives in ``medray.training.losses``.

``benchmarks/recipe.py`` measures each against the bare schedule on small demo subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The share of the base learning rate in ``epoch`` (0-based): linear warm-up, then cosine to 0."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1)))


def schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR's state is the epoch count only, so a resumed run rebuilds the same curve from the config.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, epochs, warmup))


def averaged(model: torch.nn.Module, decay: float, weights: dict | None = None) -> AveragedModel | None:
    """The EMA copy of ``model`` (BatchNorm statistics averaged too), resumed from ``weights`` when given."""
    if not decay:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if weights is not None:
        ema.module.load_state_dict(weights)
        ema.n_averaged.fill_(1)  # resumed: go on averaging rather than copy the raw weights again
    return ema


@dataclass
class EarlyStop:
    """Counts epochs since the best validation score; ``patience`` None never stops."""

    patience: int | None
    best: float = -math.inf
    since_best: int = 0

    def update(self, score: float) -> bool:
        """Record this epoch's score; True when training should stop after it."""
        if score > self.best:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "since_best": self.since_best}
