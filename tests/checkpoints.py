"""A real medray checkpoint of an untrained model, for tests that need one but not a training run."""

from __future__ import annotations

from medray.training import checkpoint
from medray.training.models import build_model


def saved_checkpoint(directory, labels: list[str], task: str = "multi-label") -> str:
    model = build_model("resnet18", len(labels), 1)
    meta = {"backbone": "resnet18", "labels": labels, "task": task, "in_channels": 1, "image_size": 32}
    directory.mkdir()
    checkpoint.save(str(directory), {"model": model.state_dict()}, meta)
    return str(directory)
