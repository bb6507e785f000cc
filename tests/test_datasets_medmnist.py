"""MedMNIST .npz: every task kind, its given splits kept, images written out as PNG files."""

import numpy as np
import pytest
from PIL import Image

from medray.data.datasets import Options, ingest_medmnist
from medray.data.manifest import read_manifest
from medray.training.losses import make_loss

SIZES = {"train": 6, "val": 2, "test": 3}


def write_npz(path, labels_of, rgb: bool = False) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = labels_of(n)
    np.savez_compressed(path, **arrays)


def ingest(tmp_path, labels_of, **kwargs):
    write_npz(tmp_path / "set.npz", labels_of, kwargs.pop("rgb", False))
    result = ingest_medmnist(
        str(tmp_path / "set.npz"), str(tmp_path / "out" / "m.parquet"), options=Options(check=False), **kwargs
    )
    return result, read_manifest(result.manifest)


def test_binary_task_is_one_label_column_and_splits_are_kept(tmp_path):
    result, manifest = ingest(
        tmp_path, lambda n: (np.arange(n) % 2).reshape(n, 1).astype(np.uint8), labels=["pneumonia"]
    )
    frame = manifest.frame
    assert manifest.task == "multi-label" and manifest.labels == ["pneumonia"]
    assert frame["split"].value_counts().to_dict() == SIZES
    first = frame[frame["split"] == "val"].iloc[1]
    assert first["pneumonia"] == 1.0 and first["image"].endswith("out/m_images/val/1.png")
    with np.load(tmp_path / "set.npz") as archive:
        np.testing.assert_array_equal(np.asarray(Image.open(first["image"])), archive["val_images"][1])
    assert result.balance == "11 in = 11 kept + 0 quarantined"


def test_multi_label_task_keeps_one_column_per_label(tmp_path):
    _, manifest = ingest(tmp_path, lambda n: np.eye(3, dtype=np.uint8)[np.arange(n) % 3])
    assert manifest.task == "multi-label" and manifest.labels == ["label_0", "label_1", "label_2"]
    assert (manifest.frame[manifest.labels].sum(axis=1) == 1).all()


def test_multi_class_task_is_one_hot_and_trains_with_cross_entropy(tmp_path):
    classes = ["adipose", "background", "debris", "lymphocytes"]
    _, manifest = ingest(tmp_path, lambda n: (np.arange(n) % 4).reshape(n, 1), labels=classes, rgb=True)
    frame = manifest.frame
    assert manifest.task == "multi-class" and manifest.labels == classes
    assert (frame[classes].sum(axis=1) == 1).all()
    assert np.asarray(Image.open(frame["image"][0])).shape == (28, 28, 3)
    make_loss(manifest.task, frame[classes].to_numpy(float), "seed")  # the losses accept the columns as written


def test_ordinal_task_must_be_asked_for_and_out_of_range_grades_are_quarantined(tmp_path):
    def grades(n):
        g = (np.arange(n) % 5).reshape(n, 1)
        g[0, 0] = 7  # not a grade of a 0–4 scale whose names are given
        return g

    result, manifest = ingest(tmp_path, grades, task="ordinal", labels=["0", "1", "2", "3", "4"])
    assert manifest.task == "ordinal" and manifest.labels == ["0", "1", "2", "3", "4"]
    assert result.quarantined == 3 and result.balance == "11 in = 8 kept + 3 quarantined"


def test_a_file_without_medmnist_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no {train,val,test}_images"):
        ingest_medmnist(str(tmp_path / "other.npz"), str(tmp_path / "m.parquet"))
