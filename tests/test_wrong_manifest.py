"""A manifest of another task than the checkpoint's model is refused before any work, saying what differs."""

from __future__ import annotations

import pandas as pd
import pytest

from checkpoints import saved_checkpoint
from medray.config import build_config
from medray.data.manifest import Manifest, write_manifest
from medray.jobs import evaluate
from medray.training import checkpoint

TRAINED_ON = ["Effusion", "Mass"]


def split_manifest(path, labels, task) -> str:
    frame = pd.DataFrame({"image": [f"/data/{i}.png" for i in range(4)], "patient_id": ["a", "b", "c", "d"],
                          "split": ["train", "val", "test", "test"]})  # fmt: skip
    for i, label in enumerate(labels):
        frame[label] = [float((row + i) % 2) for row in range(4)]
    write_manifest(Manifest(frame, labels, task), str(path))
    return str(path)


def evaluation_of(tmp_path, manifest_labels, manifest_task, trained_task="multi-label"):
    ckpt = saved_checkpoint(tmp_path / "checkpoint", TRAINED_ON, trained_task)
    manifest = split_manifest(tmp_path / "other.parquet", manifest_labels, manifest_task)
    config = build_config({"storage": str(tmp_path), "data": {"manifest": manifest}, "evaluate": {"checkpoint": ckpt}})
    with pytest.raises(checkpoint.CheckpointError) as err:
        evaluate(config)
    return str(err.value), ckpt, manifest


def test_evaluating_with_another_tasks_labels_says_which_labels_differ(tmp_path):
    message, ckpt, manifest = evaluation_of(tmp_path, ["Atelectasis", "Nodule", "Mass"], "multi-label")
    assert message == (
        f"{manifest} has labels [Atelectasis, Nodule, Mass] but the checkpoint {ckpt} was trained on [Effusion, Mass]: "
        "use the manifest it was trained on, or a checkpoint trained on this one"
    )


def test_evaluating_a_multi_class_manifest_with_a_multi_label_model_names_both_kinds(tmp_path):
    message, ckpt, manifest = evaluation_of(tmp_path, TRAINED_ON, "multi-class")
    assert message == (
        f"{manifest} is a multi-class manifest but the checkpoint {ckpt} was trained for multi-label: use the manifest it was trained on"
    )


def test_multi_label_outputs_match_by_name_but_classes_match_in_order(tmp_path):
    labelled = saved_checkpoint(tmp_path / "multi-label", TRAINED_ON, "multi-label")
    checkpoint.check_fits(labelled, list(reversed(TRAINED_ON)), "multi-label", "m.parquet")  # no error
    graded = saved_checkpoint(tmp_path / "multi-class", TRAINED_ON, "multi-class")
    checkpoint.check_fits(graded, TRAINED_ON, "multi-class", "m.parquet")
    with pytest.raises(checkpoint.CheckpointError, match=r"has labels \[Mass, Effusion\] but .* trained on \[Effusion, Mass\]"):
        checkpoint.check_fits(graded, list(reversed(TRAINED_ON)), "multi-class", "m.parquet")
