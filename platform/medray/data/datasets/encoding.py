"""Label tables as published: UTF-8, UTF-8 with a BOM (Excel), UTF-16 (Excel's "Unicode text"),
and the cp1252 / latin-1 files that many sites still export. Every CSV reader of the adapters goes
through ``read_csv`` here, so that an encoding is never a traceback.

The order is: a byte-order mark, which is definitive; then the encoding the user declared
(``ingest.encoding``), since they know their file; then UTF-8, which almost never decodes text that
was written in another encoding; then cp1252 (a superset of latin-1's printable characters), with a
warning naming the file, and latin-1 for the five bytes cp1252 leaves undefined — latin-1 decodes
any byte, so a table in an unknown 8-bit encoding is read, at worst with odd accented letters.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from medray.io import storage

log = logging.getLogger("medray.ingest")
BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)  # fmt: skip
FALLBACKS = ("cp1252", "latin-1")


class TableError(ValueError):
    """A label table that cannot be read; the message names the file and what to do."""


def decode(data: bytes, uri: str, declared: str | None = None) -> str:
    """The text of a table file, and never an exception for a file in an 8-bit encoding."""
    for bom, name in BOMS:
        if data.startswith(bom):
            return _strict(data, uri, name, "its byte-order mark")
    if declared:
        return _strict(data, uri, declared, "ingest.encoding")
    if b"\x00" in data[:4096]:  # UTF-8 decodes NUL bytes; no text table holds them, UTF-16 does
        raise TableError(f"{uri}: holds NUL bytes, as UTF-16 without a byte-order mark does: "
                         "set ingest.encoding (e.g. utf-16-le)")  # fmt: skip
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for name in FALLBACKS:
        try:
            text = data.decode(name)
        except UnicodeDecodeError:
            continue
        log.warning("%s is not UTF-8: read as %s; set ingest.encoding if that is wrong", uri, name)
        return text
    raise AssertionError("latin-1 decodes every byte")


def _strict(data: bytes, uri: str, name: str, why: str) -> str:
    try:
        return data.decode(name)
    except UnicodeDecodeError as err:
        raise TableError(f"{uri}: not valid {name} (from {why}) at byte {err.start}: "
                         "set ingest.encoding to the file's encoding") from None  # fmt: skip


def ragged_row(text: str):
    """The first row whose number of fields differs from the header's (pyarrow's ``InvalidRow``), or None.

    pandas reads such rows without a word: a short row is padded with blanks, and when every row has
    one field more than the header, the first column silently becomes the index, shifting every label
    by one column. pyarrow's parser reports both. A header's trailing unnamed columns (NIH's published
    CSV ends its header, not its rows, with a comma) may be missing from a row: nothing is shifted."""
    header = next(csv.reader(io.StringIO(text)), [])
    named = len(header)
    while named and not header[named - 1].strip():
        named -= 1
    ragged = []

    def record(row) -> str:
        if named <= row.actual_columns < row.expected_columns:
            return "skip"  # only unnamed trailing columns missing
        ragged.append(row)
        return "error"  # stop at the first

    parse = pacsv.ParseOptions(invalid_row_handler=record, newlines_in_values=True)
    try:  # one thread, so that pyarrow knows the row's number
        pacsv.read_csv(io.BytesIO(text.encode("utf-8")), parse_options=parse, read_options=pacsv.ReadOptions(use_threads=False))
    except pa.ArrowInvalid:
        pass  # not ragged (e.g. empty): pandas says what else is wrong
    return ragged[0] if ragged else None


def read_csv(uri: str, encoding: str | None = None, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` of a local or ``s3://`` file in whatever encoding it was written; a file
    pandas cannot parse, or with a row of more or fewer fields than its header, is one ``TableError``
    naming it (and the row)."""
    text = decode(storage.read_bytes(uri), uri, encoding)
    row = ragged_row(text)
    if row is not None:
        raise TableError(f"{uri}: row {row.number} has {row.actual_columns} fields where the header has "
                         f"{row.expected_columns} (counting the header as row 1): fix or remove that row")  # fmt: skip
    try:
        return pd.read_csv(io.StringIO(text), **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "empty"
        raise TableError(f"{uri}: not a readable CSV table ({reason})") from None
