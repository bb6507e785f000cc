"""Files that are not files: ingest and scoring list a folder the same way (medray.io.listing), read
regular files only, never follow a link to a folder, and record every entry they skip with its reason.
A FIFO must never hang a job: pytest-timeout is the guard, no test waits on a clock."""

import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray.config import ColumnsConfig
from medray.data.datasets import ingest_folder, ingest_table
from medray.data.manifest import read_manifest
from medray.io import images, storage
from medray.io.listing import IMAGE_EXTENSIONS, walk
from medray.scoring.score import score
from test_score_at_scale import LABELS, job, make_checkpoint, read_rows

SKIPPED = {  # path under the root → what its reason must say
    "abnormal/again": "link to a folder inside the root",
    "abnormal/p1/loop": "link to a folder above it (a loop)",
    "normal/dangling.png": "dangling link",
    "normal/out": "link to a folder out of the root",
    "normal/p2/pipe.png": "FIFO (named pipe), not a regular file",
    "normal/self.png": "link that cannot be followed",
    "normal/zero.png": "link to a character device, not a regular file",
}
IMAGES = ["abnormal/p1/a.png", "normal/p2/b.png"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path):
    """Two images in a class-per-folder tree, and every kind of entry that is not a file to read."""
    root, outside = tmp_path / "archive", tmp_path / "outside"
    for folder in (root / "abnormal" / "p1", root / "normal" / "p2", outside):
        folder.mkdir(parents=True)
    for i, name in enumerate(IMAGES):
        (root / name).write_bytes(png(i))
    (outside / "c.png").write_bytes(png(9))
    (root / "normal" / "notes.txt").write_text("not an image: not listed")
    os.mkfifo(root / "normal" / "p2" / "pipe.png")
    os.symlink("/dev/zero", root / "normal" / "zero.png")
    os.symlink("missing.png", root / "normal" / "dangling.png")
    os.symlink("self.png", root / "normal" / "self.png")
    os.symlink("../..", root / "abnormal" / "p1" / "loop")  # → abnormal: the loop that made 2 images 122 rows
    os.symlink("../normal", root / "abnormal" / "again")  # the same images under a second class
    os.symlink(outside, root / "normal" / "out")
    return root


def relative(uris, root) -> list[str]:
    return sorted(os.path.relpath(u, root) for u in uris)


def test_the_listing_yields_the_regular_files_and_every_other_entry_with_the_reason_it_is_not_read(tree):
    entries = list(walk(str(tree), IMAGE_EXTENSIONS))

    assert relative([e.uri for e in entries if not e.skipped], tree) == IMAGES
    reasons = {os.path.relpath(e.uri, tree): e.skipped for e in entries if e.skipped}
    assert sorted(reasons) == sorted(SKIPPED)
    for path, expected in SKIPPED.items():
        assert expected in reasons[path], (path, reasons[path])


def test_the_listing_reads_a_link_to_a_file_inside_the_root_not_out_of_it_and_is_in_a_stable_order(tmp_path):
    root = tmp_path / "links"
    (root / "b").mkdir(parents=True)
    (tmp_path / "archive.png").write_bytes(png(0))
    (root / "z.png").write_bytes(png(1))
    (root / "b" / "a.png").write_bytes(png(2))
    os.symlink(root / "b" / "a.png", root / "c.png")  # a second name inside the root: read
    os.symlink(tmp_path / "archive.png", root / "a.png")  # into another archive: recorded, not read

    listed = {os.path.relpath(e.uri, root): e.skipped for e in walk(str(root), IMAGE_EXTENSIONS)}

    assert list(listed) == ["a.png", "c.png", "z.png", "b/a.png"]  # files by name, then sub-folders
    assert listed["a.png"] == "link to a file out of the root: not read"
    assert not any(listed[name] for name in ("c.png", "z.png", "b/a.png"))
    assert images.read(str(root / "c.png")) == png(2)


@pytest.mark.timeout(60)
def test_reading_a_fifo_or_a_link_to_dev_zero_is_refused_at_once(tmp_path):
    fifo, zero = tmp_path / "pipe.png", tmp_path / "zero.png"
    os.mkfifo(fifo)  # no writer: a blocking open or read would wait forever
    os.symlink("/dev/zero", zero)  # read whole, it would fill the memory

    with pytest.raises(images.ImageError, match=r"pipe\.png: a FIFO \(named pipe\), not a regular file"):
        images.read(str(fifo))
    with pytest.raises(images.ImageError, match=r"zero\.png: a character device, not a regular file"):
        images.read(str(zero))
    with pytest.raises(storage.NotRegularFileError, match="a folder, not a regular file"):
        storage.read_bytes(str(tmp_path))


@pytest.mark.timeout(60)
def test_a_file_that_became_a_fifo_after_it_was_listed_is_refused_when_read(tmp_path):
    (tmp_path / "x.png").write_bytes(png(0))
    [entry] = walk(str(tmp_path), IMAGE_EXTENSIONS)
    assert entry.skipped == ""
    os.remove(entry.uri)
    os.mkfifo(entry.uri)

    with pytest.raises(images.ImageError, match="FIFO"):
        images.read(entry.uri)


@pytest.mark.timeout(300)
def test_folder_ingest_lists_each_image_once_and_quarantines_every_skipped_entry(tree, tmp_path, ray_session):
    result = ingest_folder(str(tree), str(tmp_path / "m.parquet"))

    manifest = read_manifest(result.manifest)
    assert relative(manifest.frame["image"], tree) == IMAGES
    assert manifest.frame.set_index("image").loc[str(tree / IMAGES[0]), "abnormal"] == 1.0
    quarantine = pd.read_parquet(result.quarantine)
    reasons = {os.path.relpath(image, tree): reason for image, reason in zip(quarantine["image"], quarantine["reason"])}
    assert sorted(reasons) == sorted(SKIPPED)
    assert all(expected in reasons[path] for path, expected in SKIPPED.items()), reasons
    assert (result.rows_in, result.images, result.quarantined) == (len(IMAGES) + len(SKIPPED), len(IMAGES), len(SKIPPED))


@pytest.mark.timeout(300)
def test_a_table_row_naming_a_fifo_or_a_file_behind_a_folder_link_is_quarantined_with_the_reason(tree, tmp_path, ray_session):
    table = tree / "labels.csv"
    files = [IMAGES[0], "normal/p2/pipe.png", "normal/out/c.png"]
    pd.DataFrame({"file": files, "patient": ["p1", "p2", "p3"], "Mass": ["1", "0", "1"]}).to_csv(table, index=False)
    columns = ColumnsConfig(image="file", patient="patient", labels=["Mass"])

    result = ingest_table(str(table), str(tmp_path / "t.parquet"), columns)

    quarantine = pd.read_parquet(result.quarantine).set_index("image")["reason"]
    assert "FIFO (named pipe), not a regular file" in quarantine[str(tree / files[1])]
    assert f"under {tree / 'normal' / 'out'}, a link to a folder out of the root" in quarantine[str(tree / files[2])]
    assert (result.images, result.quarantined) == (1, 2)


@pytest.mark.timeout(300)
def test_scoring_lists_what_ingest_lists_and_gives_every_skipped_entry_its_row_with_the_reason(tree, tmp_path, ray_session):
    model = make_checkpoint(tmp_path / "model")
    summary = score(job(tmp_path, model, str(tree), str(tmp_path / "scores"), part_size=4, batch_size=4))

    rows = read_rows(summary.output).set_index("image")
    assert relative(rows.index, tree) == sorted(IMAGES + list(SKIPPED))  # one row per entry, each once
    assert (summary.inputs, summary.scored, summary.errors) == (len(IMAGES) + len(SKIPPED), len(IMAGES), len(SKIPPED))
    for path, expected in SKIPPED.items():
        error = rows.loc[str(tree / path), "error"]
        assert error.startswith(f"{tree / path}: ") and expected in error, error
    assert rows.loc[[str(tree / p) for p in IMAGES], f"prob_{LABELS[0]}"].between(0, 1).all()
