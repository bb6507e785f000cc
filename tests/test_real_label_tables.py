"""Label tables as real releases publish them: absolute paths and S3 URIs, IDs whose files mix .jpg
and .png, and files in UTF-8 with a BOM, UTF-16, latin-1 or cp1252 — none of which may lose a row
or end in a traceback."""

import codecs
import logging

import pandas as pd
import pytest

from medray.cli import main
from medray.config import ColumnsConfig, IngestConfig
from medray.data.datasets import Options, ingest, ingest_chexpert, ingest_nih, ingest_table
from medray.data.datasets.encoding import TableError
from medray.data.manifest import read_manifest
from test_datasets_chexpert import chexpert  # noqa: F401  (the fixture)
from test_datasets_nih import write_release
from test_datasets_table import image

UNCHECKED = Options(check=False)


def test_absolute_paths_and_s3_uris_are_used_as_they_are_and_relative_ones_start_at_the_images_root(tmp_path, s3):
    client, bucket = s3
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "tables").mkdir()
    absolute = tmp_path / "elsewhere" / "a.png"
    absolute.write_bytes(image("PNG"))
    (tmp_path / "root" / "b.png").write_bytes(image("PNG"))
    client.put_object(Bucket=bucket, Key="release/c.png", Body=image("PNG"))
    table = pd.DataFrame({"image": [str(absolute), "b.png", f"s3://{bucket}/release/c.png", "/nowhere/d.png"],
                          "patient_id": ["p1", "p2", "p3", "p4"], "Finding": [1, 0, 1, 0]})  # fmt: skip
    table.to_csv(tmp_path / "tables" / "labels.csv", index=False)

    result = ingest_table(str(tmp_path / "tables" / "labels.csv"), str(tmp_path / "m.parquet"),
                          ColumnsConfig(labels=["Finding"]), images_root=str(tmp_path / "root"), options=UNCHECKED)  # fmt: skip
    frame = read_manifest(result.manifest).frame
    assert frame["image"].tolist() == [str(absolute), str(tmp_path / "root" / "b.png"), f"s3://{bucket}/release/c.png"]
    assert pd.read_parquet(result.quarantine).to_dict("records") == [{"image": "/nowhere/d.png", "reason": "image file not found"}]


def test_a_list_of_image_patterns_finds_ids_whose_files_are_jpg_or_png(tmp_path):
    (tmp_path / "images").mkdir()
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG", "PNG"]):
        (tmp_path / "images" / f"id{i}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(image(fmt))
    pd.DataFrame({"id": ["id0", "id1", "id2", "id3", "id4"], "patient_id": list("abcde"),
                  "Finding": [1, 0, 1, 0, 1]}).to_csv(tmp_path / "labels.csv", index=False)  # fmt: skip

    one = ColumnsConfig(image="id", image_pattern="images/{}.jpg", labels=["Finding"])
    both = one.model_copy(update={"image_pattern": ["images/{}.jpg", "images/{}.png"]})
    assert ingest_table(str(tmp_path / "labels.csv"), str(tmp_path / "one.parquet"), one, options=UNCHECKED).images == 2
    result = ingest_table(str(tmp_path / "labels.csv"), str(tmp_path / "both.parquet"), both, options=UNCHECKED)
    names = read_manifest(result.manifest).frame["image"].str.rsplit("/", n=1).str[-1]
    assert names.tolist() == ["id0.jpg", "id1.png", "id2.jpg", "id3.png"]
    assert pd.read_parquet(result.quarantine)["image"].tolist() == [str(tmp_path / "images" / "id4.jpg")]


def write_table(folder, encode) -> str:
    """A table whose metadata holds letters outside ASCII, written by ``encode(text) -> bytes``."""
    (folder / "x.png").write_bytes(image("PNG"))
    (folder / "y.png").write_bytes(image("PNG"))
    text = "image,patient_id,Finding,Site\nx.png,p1,1,Zürich\ny.png,p2,0,Genève\n"
    (folder / "labels.csv").write_bytes(encode(text))
    return str(folder / "labels.csv")


SITE = ColumnsConfig(labels=["Finding"], metadata={"Site": "site"})


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),  # Excel's "CSV UTF-8"
        lambda t: t.encode("utf-16"),  # Excel's "Unicode text": UTF-16 with its BOM
        lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
    ],
    ids=["utf-8-bom", "utf-16-le-bom", "utf-16-be-bom"],
)
def test_a_byte_order_mark_decides_the_encoding(tmp_path, encode):
    result = ingest_table(write_table(tmp_path, encode), str(tmp_path / "m.parquet"), SITE, options=UNCHECKED)
    assert read_manifest(result.manifest).frame["site"].tolist() == ["Zürich", "Genève"]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_a_table_that_is_not_utf8_is_read_as_cp1252_with_a_warning_naming_the_file(tmp_path, caplog, encoding):
    uri = write_table(tmp_path, lambda t: t.encode(encoding))
    with caplog.at_level(logging.WARNING, logger="medray.ingest"):
        result = ingest_table(uri, str(tmp_path / "m.parquet"), SITE, options=UNCHECKED)
    assert read_manifest(result.manifest).frame["site"].tolist() == ["Zürich", "Genève"]
    assert f"{uri} is not UTF-8: read as cp1252" in caplog.text


def test_a_declared_encoding_reads_utf16_without_a_bom_which_is_otherwise_a_one_line_error(tmp_path):
    uri = write_table(tmp_path, lambda t: t.encode("utf-16-le"))
    with pytest.raises(TableError, match="set ingest.encoding") as refused:
        ingest_table(uri, str(tmp_path / "m.parquet"), SITE, options=UNCHECKED)
    assert str(refused.value).startswith(uri) and "\n" not in str(refused.value)

    config = IngestConfig(format="csv", columns=SITE, encoding="utf-16-le", check=False)
    result = ingest(uri, str(tmp_path / "m.parquet"), config)
    assert read_manifest(result.manifest).frame["site"].tolist() == ["Zürich", "Genève"]


def test_the_command_line_ends_an_unreadable_table_in_one_line_naming_it_not_a_traceback(tmp_path, ray_session, capsys):
    uri = write_table(tmp_path, lambda t: t.encode("utf-16-le"))
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", uri, str(tmp_path / "m.parquet"), "--format", "csv", "--set", "ingest.columns.labels=[Finding]"])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and error.startswith(f"medray ingest: {uri}: holds NUL bytes") and "\n" not in error


def test_a_declared_encoding_that_does_not_fit_the_file_names_it_and_the_file(tmp_path):
    uri = write_table(tmp_path, lambda t: t.encode("latin-1"))
    with pytest.raises(TableError, match=r"labels\.csv: not valid ascii \(from ingest.encoding\)"):
        ingest_table(uri, str(tmp_path / "m.parquet"), SITE, options=Options(check=False, encoding="ascii"))
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        IngestConfig(encoding="klingon")


def test_the_nih_and_chexpert_readers_share_the_decoding(tmp_path, chexpert):  # noqa: F811
    nih = tmp_path / "nih"
    nih.mkdir()
    write_release(nih, patients=3, studies=1)
    lines = (nih / "Data_Entry_2017.csv").read_text().splitlines()
    lines[1] += "remarque: opacité"  # the trailing unnamed column
    (nih / "Data_Entry_2017.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    assert ingest_nih(str(nih / "Data_Entry_2017.csv"), str(tmp_path / "nih.parquet"), options=UNCHECKED).images == 3

    train = chexpert / "train.csv"
    train.write_bytes(codecs.BOM_UTF8 + train.read_bytes())  # re-saved by Excel: "\ufeffPath" without the decoding
    result = ingest_chexpert(str(train), str(tmp_path / "chexpert.parquet"), options=UNCHECKED)
    assert result.balance == "9 in = 9 kept + 0 quarantined"
