"""Every freezing strategy trains under 2-worker DDP on a real local Ray, each combined with
a different loss weighting and resampling strategy."""

import json

import pytest

from medray.config import build_config
from medray.training.models import build_model, head_module
from medray.training.trainer import train

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
    epochs = [json.loads((tmp_path / f"freeze-{freeze}" / "train" / f"epoch_{e:03d}" / "meta.json").read_text())["metrics"] for e in (1, 2)]
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


@pytest.mark.parametrize("task", ["multi-class", "ordinal"])
def test_single_label_tasks_train_and_give_a_distribution_per_image(task, demo_manifest, ray_session, tmp_path):
    """Grades 0–2 from how many findings an image shows: a multi-class or an ordinal target."""
    import numpy as np
    import pandas as pd

    from medray.data.manifest import Manifest, write_manifest
    from medray.data.splits import split_by_patient
    from medray.evaluation.evaluate import evaluate

    frame = demo_manifest.frame
    grade = np.minimum(frame[demo_manifest.labels].sum(axis=1).to_numpy(dtype=int), 2)
    grades = ["grade0", "grade1", "grade2"]
    onehot = pd.DataFrame(np.eye(3, dtype=np.float32)[grade], columns=grades)
    graded = Manifest(pd.concat([frame[["image", "patient_id"]], onehot], axis=1), grades, task)
    split = split_by_patient(graded, val=0.2, test=0.2, min_positive=0.3, label="grade1", seed=0)
    path = write_manifest(Manifest(split, grades, task), str(tmp_path / "graded.parquet"))

    config = build_config(
        {"name": task, "storage": str(tmp_path), "data": {"manifest": path, "image_size": 32},
         "train": {"epochs": 1, "workers": 1, "cpus_per_worker": 0.5, "batch_size": 16}}  # fmt: skip
    )
    train(config)
    predictions = pd.read_parquet(evaluate(config).paths["predictions"])
    probs = predictions[[f"prob_{g}" for g in grades]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4) and (probs >= 0).all()
