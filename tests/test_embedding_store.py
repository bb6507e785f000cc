"""The embedding store: one row per input, vectors beside the manifest's columns, errors kept."""

import numpy as np
import pandas as pd
import pytest

from medray.embeddings.store import StoreError, StoreInfo, part_bytes, read_info, read_store, to_table
from medray.io import storage

INFO = StoreInfo(backbone="resnet18", dim=4, weights_sha256="ab" * 32, image_size=64)


def _part(rows: int, split: str, failed: set[int]) -> tuple[pd.DataFrame, np.ndarray]:
    frame = pd.DataFrame(
        {
            "image": [f"/data/{split}-{i}.png" for i in range(rows)],
            "patient_id": [f"p{i}" for i in range(rows)],
            "split": split,
            "Effusion": np.arange(rows, dtype=np.float32) % 2,
            "error": ["decode failed" if i in failed else "" for i in range(rows)],
        }
    )
    return frame, np.arange(rows * INFO.dim, dtype=np.float32).reshape(rows, INFO.dim) / 10


def test_a_store_reads_back_its_vectors_labels_and_backbone_with_failed_rows_kept_apart(tmp_path):
    for index, (split, failed) in enumerate([("train", {1}), ("test", set())]):
        frame, vectors = _part(3, split, failed)
        storage.write_bytes(
            str(tmp_path / f"part-{index:05d}.parquet"), part_bytes(to_table(frame, vectors, ["Effusion"], "multi-label", INFO))
        )

    store = read_store(str(tmp_path))

    assert read_info(str(tmp_path)) == (["Effusion"], "multi-label", INFO)
    assert store.labels == ["Effusion"] and store.info == INFO
    assert list(store.frame["image"]) == [
        "/data/train-0.png",
        "/data/train-2.png",
        "/data/test-0.png",
        "/data/test-1.png",
        "/data/test-2.png",
    ]
    assert list(store.errors["image"]) == ["/data/train-1.png"] and list(store.errors["error"]) == ["decode failed"]
    # The failed row's slots do not shift the vectors after it (float16 keeps these values within 1e-3).
    np.testing.assert_allclose(store.vectors[1], [0.8, 0.9, 1.0, 1.1], atol=1e-3)
    test_frame, test_vectors = store.split("test")
    assert len(test_frame) == 3 and test_vectors.shape == (3, 4)


def test_a_folder_without_parts_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="run `medray embed`"):
        read_store(str(tmp_path / "nowhere"))
