"""Seeded mutations of real images: every mutated file is decoded or gets its recorded error, by the same
rule in ingest and in scoring; no exception ever escapes the function that reads one input."""

import io
import struct

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from bombs import deflated_dicom
from dicom_files import dataset, gradient, jpeg_baseline, to_bytes
from medray.data.datasets.ingest import _inspect  # the per-file function of ingest's Ray Data pass
from medray.evaluation.predict import decode_batch
from medray.io.images import attempt

CASES = 400
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}  # 4-byte length after 2 reserved


def _encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _compressed(syntax) -> bytes:
    ds = dataset(gradient(32))
    ds.compress(syntax)
    return to_bytes(ds)


def sources() -> dict[str, bytes]:
    return {
        "plain.dcm": to_bytes(dataset(gradient(32))),
        "windowed16.dcm": to_bytes(dataset(gradient(32, np.uint16, 4000), WindowCenter=2000, WindowWidth=4000)),
        "frames.dcm": to_bytes(dataset(np.stack([gradient(32), 255 - gradient(32)]))),
        "rgb.dcm": to_bytes(dataset(np.stack([gradient(32)] * 3, axis=-1), "RGB")),
        "j2k.dcm": _compressed(JPEG2000Lossless),
        "rle.dcm": _compressed(RLELossless),
        "jpeg.dcm": jpeg_baseline(gradient(32)),
        "deflated.dcm": deflated_dicom(32, 32, frames=2, bits=16),
        "image.png": _encoded(gradient(32), "PNG"),
        "image16.png": _encoded(gradient(32, np.uint16, 60000), "PNG"),
        "image.jpg": _encoded(gradient(32), "JPEG"),
    }


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of length fields: explicit VR DICOM elements and PNG chunks."""
    if data[:4] == b"\x89PNG":
        return [(data.find(kind) - 4, 4) for kind in (b"IHDR", b"IDAT", b"IEND") if data.find(kind) >= 4]
    fields = []
    for at in range(132, len(data) - 8):
        vr = data[at + 4 : at + 6]
        if vr.isalpha() and vr.isupper():  # a plausible explicit VR element header
            fields.append((at + 8, 4) if vr in LONG_VRS else (at + 6, 2))
    return fields


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = ["flip", "truncate", "insert", "length"][rng.integers(4)]
    out = bytearray(data)
    if kind == "flip":
        for at in rng.integers(0, len(out), rng.integers(1, 9)):
            out[at] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        out = out[: rng.integers(0, len(out))]
    elif kind == "insert":
        at = int(rng.integers(0, len(out)))
        out[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
    else:
        fields = _length_fields(data)
        at, width = fields[rng.integers(len(fields))]
        value = int(rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, int(rng.integers(0, 1 << 31))])) & ((1 << (8 * width)) - 1)
        out[at : at + width] = struct.pack("<H" if width == 2 else "<I", value) if data[:4] != b"\x89PNG" else struct.pack(">I", value)
    return kind, bytes(out)


@pytest.fixture(scope="module")
def mutated(tmp_path_factory):
    """CASES files, each one of the real sources under a seeded mutation."""
    root, rng, originals = tmp_path_factory.mktemp("fuzz"), np.random.default_rng(18), sources()
    names = sorted(originals)
    files = {}
    for i in range(CASES):
        source = names[i % len(names)]
        kind, data = mutate(originals[source], rng)
        path = root / f"{i:03d}-{kind}-{source}"
        path.write_bytes(data)
        files[str(path)] = kind
    return files


def test_every_mutated_file_is_decoded_or_recorded_with_its_name_in_ingest_and_in_scoring(mutated):
    ingest = {uri: _inspect(uri, ids_from_dicom=True, salt=b"salt")[0] for uri in mutated}
    scoring = decode_batch({"image": np.array(list(mutated), dtype=object)}, size=16, channels=1)
    scored = dict(zip(mutated, scoring["error"]))

    for uri in mutated:
        assert ingest[uri] == "" or ingest[uri].startswith(f"{uri}: "), ingest[uri]
        assert scored[uri] == "" or scored[uri].startswith(f"{uri}: "), scored[uri]
    failed = {uri for uri, reason in ingest.items() if reason}
    assert failed == {uri for uri, error in scored.items() if error}  # one rule: the same inputs fail in both
    assert 0.2 * CASES < len(failed) < 0.9 * CASES  # the mutations do harm, and not all of it fatal
    assert {mutated[uri] for uri in failed} == {"flip", "truncate", "insert", "length"}
    assert (scoring["pixels"][[not e for e in scoring["error"]]].reshape(-1, 256).max(axis=1) > 0).any()


def test_an_input_that_exhausts_memory_is_recorded_and_an_interrupt_is_not_swallowed():
    def exhausted():
        raise MemoryError

    def interrupted():
        raise KeyboardInterrupt

    assert attempt("s3://b/huge.dcm", exhausted) == "s3://b/huge.dcm: too large to decode in the memory left (MemoryError)"
    with pytest.raises(KeyboardInterrupt):
        attempt("s3://b/any.png", interrupted)
