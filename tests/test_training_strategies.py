"""Every freezing strategy trains under 2-worker DDP on a real local Ray, each combined with
a different loss weighting and resampling strategy."""

import json

import pytest

from medray.config import build_config
from medray.models import build_model, head_module
from medray.train import train

RUNS = {
    "full": ({}, {"weighting": "effective_number"}, {"strategy": "oversample"}),
    "head_only": ({}, {"weighting": "pos_weight"}, {"strategy": "undersample"}),
    "stages": ({"freeze_stages": 2, "lr_decay": 0.5}, {"weighting": "seed", "focal_gamma": 2.0}, {"strategy": "balanced"}),
    "gradual": ({"unfreeze_every": 1}, {"weighting": "none"}, {"strategy": "patient_balanced", "samples_per_epoch": 120}),
}


@pytest.mark.parametrize("freeze", list(RUNS))
def test_each_freezing_strategy_trains_under_ddp(freeze, split_manifest_path, ray_session, tmp_path):
    model, loss, sampling = RUNS[freeze]
    config = build_config(
        {
            "name": f"freeze-{freeze}",
            "storage": str(tmp_path),
            "data": {"manifest": split_manifest_path, "image_size": 32},
            "model": {"freeze": freeze, **model},
            "loss": loss,
            "sampling": sampling,
            "train": {"epochs": 2, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 16},
        }
    )
    train(config)
    epochs = [json.loads((tmp_path / f"freeze-{freeze}" / "train" / f"epoch_{e:03d}" / "meta.json").read_text())["metrics"] for e in (0, 1)]
    trainable = [m["trainable_parameters"] for m in epochs]
    head = sum(p.numel() for p in head_module(build_model("resnet18", 4)).parameters())
    total = sum(p.numel() for p in build_model("resnet18", 4).parameters())
    if freeze == "full":
        assert trainable == [total, total]
    elif freeze == "head_only":
        assert trainable == [head, head]
    elif freeze == "stages":
        assert head < trainable[0] == trainable[1] < total
    else:
        assert trainable[0] == head and trainable[1] > head, "gradual unfreezing should add a stage in epoch 2"
    if sampling.get("samples_per_epoch"):
        assert 80 <= epochs[0]["train_samples"] <= 160
