"""Leakage audit of a split manifest: what could make a test score a memory test instead.

Four checks, each an error when it finds anything (and "not checked", never "pass", when the data
do not allow it):

- ``patient_overlap``: a patient with images in two splits;
- ``study_overlap``: one study in two splits — from the ``study_id`` column, or else from NIH-style
  file names ``<patient>_<study>.png`` (which also catches one file copied into two folders);
- ``image_overlap``: one image URI in two splits (a duplicated manifest row);
- ``near_duplicates``: images in different splits whose perceptual hashes differ by at most
  ``max_distance`` bits — the same picture re-encoded, resized or filed under another patient ID.

The perceptual hash is pHash (the DCT hash ``imagehash.phash`` computes, 16 × 16 coefficients of a
64 × 64 thumbnail, 256 bits) taken of each thumbnail *minus the mean thumbnail of the manifest*.
Images of one modality share most of their low frequencies — all chest X-rays look alike at 64 px —
and a plain pHash calls different patients duplicates: on the demo data, 1 in 1,000 pairs of
different patients have identical plain 64-bit pHashes. What is left after subtracting the mean is
what tells one image from another: on the same data, re-encoded copies (JPEG, 2× resize) land at
0–8 bits and different patients at 22 or more, as do a patient's own follow-up studies.

Pairs are found without comparing every image with every other: split into ``max_distance + 1``
chunks, two hashes within ``max_distance`` bits agree exactly on at least one chunk (pigeonhole),
so only images sharing a chunk value are compared. Thumbnails are decoded in parallel with Ray Data.
Outputs (``audit.json`` is read by the evaluation report, keep its shape): ``audit.json``,
``audit.md``, ``near_duplicates.parquet`` and ``near_duplicates.png``. Messages give counts only,
never patient IDs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.fft

from medray.data import rows
from medray.data.manifest import SPLITS, read_manifest
from medray.io import images, storage

log = logging.getLogger(__name__)
THUMB = 64
HASH_SIDE = 16  # 16 × 16 DCT coefficients: a 256-bit hash
BITS = HASH_SIDE * HASH_SIDE
LISTED = 50  # near-duplicate pairs listed in audit.json and audit.md; the Parquet file has all
NIH_NAME = re.compile(r"^(\d+)_(\d+)\.[A-Za-z0-9]+$")


@dataclass
class Audit:
    passed: bool
    checks: list[dict]
    pairs: pd.DataFrame
    paths: dict[str, str]


def _check(name: str, count: int | None, detail: str) -> dict:
    """One check's result; ``count`` None: the data did not allow the check, which is not a pass
    (``passed`` stays true only so that an audit is not failed for what it could not look at)."""
    status = "not checked" if count is None else "pass" if count == 0 else "FAIL"
    return {"name": name, "passed": status != "FAIL", "status": status, "count": count, "detail": detail}


def _in_several_splits(frame: pd.DataFrame, key: pd.Series) -> int:
    return int((frame.groupby(key.to_numpy())["split"].nunique() > 1).sum())


def study_keys(frame: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The study of each row, and where it came from; None when neither source has one for every row."""
    if "study_id" in frame and frame["study_id"].notna().all():
        return frame["study_id"].astype(str), "study_id column"
    names = frame["image"].map(lambda uri: posixpath.basename(str(uri).replace("\\", "/")))
    parts = names.str.extract(NIH_NAME)
    if len(frame) and parts.notna().all().all():
        return parts[0].astype(int).astype(str) + "_" + parts[1].astype(int).astype(str), "file names <patient>_<study>"
    return None, ""


def _thumb_batch(batch: dict) -> dict:
    n = len(batch["image"])
    pixels = np.zeros((n, THUMB, THUMB), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    for i, uri in enumerate(batch["image"]):
        try:
            pixels[i] = images.load(str(uri), THUMB, 1)
        except Exception:  # noqa: BLE001 — whatever reading one input raises, it has no thumbnail
            ok[i] = False
    return {"row": batch["row"], "pixels": pixels, "ok": ok}


def thumbnails(uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 64, 64)`` grayscale thumbnails in the order of ``uris``, and which ones could be read."""
    ds = rows(pd.DataFrame({"image": uris, "row": np.arange(len(uris))})).map_batches(_thumb_batch, batch_size=64)
    pixels = np.zeros((len(uris), THUMB, THUMB), dtype=np.uint8)
    ok = np.zeros(len(uris), dtype=bool)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        pixels[batch["row"]], ok[batch["row"]] = batch["pixels"], batch["ok"]
    return pixels, ok


def residual_hashes(pixels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """256-bit pHash of each thumbnail minus the mean of the readable ones, as ``(N, 4)`` uint64."""
    x = pixels.astype(np.float32)
    x -= x[ok].mean(axis=0) if ok.any() else 0
    coefficients = scipy.fft.dct(scipy.fft.dct(x, axis=1), axis=2)[:, :HASH_SIDE, :HASH_SIDE].reshape(len(x), BITS)
    bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(axis=-1).astype(np.int64)


def cross_split_pairs(hashes: np.ndarray, split: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Row pairs ``(i, j)`` in different splits whose hashes differ by at most ``max_distance`` bits."""
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    index = np.arange(len(hashes))
    found = []
    for columns in np.array_split(np.arange(BITS), max_distance + 1):
        keys = [k.tobytes() for k in np.packbits(bits[:, columns], axis=1)]
        table = pd.DataFrame({"key": keys, "i": index, "split": split})
        candidates = table.merge(table, on="key", suffixes=("_a", "_b"))
        candidates = candidates[(candidates["i_a"] < candidates["i_b"]) & (candidates["split_a"] != candidates["split_b"])]
        found.append(candidates[["i_a", "i_b"]].to_numpy())
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.empty((0, 2), dtype=np.int64)
    distance = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]]) if len(pairs) else np.empty(0, dtype=np.int64)
    keep = distance <= max_distance
    return pd.DataFrame({"i": pairs[keep, 0], "j": pairs[keep, 1], "distance": distance[keep]})


def _pairs_table(frame: pd.DataFrame, found: pd.DataFrame) -> pd.DataFrame:
    order = {name: k for k, name in enumerate(SPLITS)}
    a, b = frame.iloc[found["i"]].reset_index(drop=True), frame.iloc[found["j"]].reset_index(drop=True)
    swap = (a["split"].map(order).fillna(9) > b["split"].map(order).fillna(9)).to_numpy()
    first = pd.concat([a[~swap], b[swap]]).sort_index()
    second = pd.concat([b[~swap], a[swap]]).sort_index()
    table = pd.DataFrame({
        "a": first["image"].astype(str).to_numpy(), "b": second["image"].astype(str).to_numpy(),
        "split_a": first["split"].to_numpy(), "split_b": second["split"].to_numpy(),
        "distance": found["distance"].to_numpy(),
        "same_patient": (first["patient_id"].to_numpy() == second["patient_id"].to_numpy()),
        "i": np.where(swap, found["j"], found["i"]), "j": np.where(swap, found["i"], found["j"]),
    })  # fmt: skip
    return table.sort_values(["distance", "a", "b"], kind="stable").reset_index(drop=True)


def _sheet(table: pd.DataFrame, pixels: np.ndarray, count: int) -> bytes:
    """Thumbnail pairs side by side, closest first: what a reader checks by eye."""
    from medray.io.figures import plt, png

    shown = table.head(count)
    per_row = 2  # pairs per row of the sheet
    n_rows = math.ceil(len(shown) / per_row)
    fig, axes = plt.subplots(n_rows, 2 * per_row, figsize=(2.2 * 2 * per_row, 2.4 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(shown.itertuples()):
        left, right = axes.flat[2 * k], axes.flat[2 * k + 1]
        left.imshow(pixels[pair.i], cmap="gray", vmin=0, vmax=255)
        right.imshow(pixels[pair.j], cmap="gray", vmin=0, vmax=255)
        left.set_title(f"{pair.split_a}", fontsize=9)
        right.set_title(f"{pair.split_b} · {pair.distance} bits", fontsize=9)
    fig.suptitle(f"Near-duplicate images across splits ({len(shown)} of {len(table)} pairs, closest first)")
    return png(fig)


def _markdown(result: dict, source: str, max_distance: int) -> str:
    lines = [f"# Leakage audit — {'passed' if result['passed'] else 'FAILED'}", "", f"Manifest: `{source}`", "",
             "| check | result | count | detail |", "|---|---|---|---|"]  # fmt: skip
    for c in result["checks"]:
        status = "**FAIL**" if c["status"] == "FAIL" else c["status"]
        lines.append(f"| {c['name']} | {status} | {'–' if c['count'] is None else c['count']} | {c['detail']} |")
    pairs = result["near_duplicates"]
    if pairs:
        lines += ["", f"## Near-duplicate pairs (at most {max_distance} of {BITS} bits apart; first {len(pairs)})", "",
                  "| a | b | splits | distance |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{p['a']}` | `{p['b']}` | {p['split_a']} / {p['split_b']} | {p['distance']} |" for p in pairs]
    if result["thumbnails"]:
        lines += ["", f"![near duplicates]({result['thumbnails']})"]
    return "\n".join(lines) + "\n"


def audit(manifest_uri: str, out: str, max_distance: int = 12, thumbnail_pairs: int = 12) -> Audit:
    """Run every check on the split manifest at ``manifest_uri``; write the results under ``out``."""
    frame = read_manifest(manifest_uri).frame
    if "split" not in frame:
        raise ValueError(f"{manifest_uri}: no 'split' column to audit; run `medray split` first")
    frame = frame[frame["split"].notna()].reset_index(drop=True)
    checks = [_check("patient_overlap", _in_several_splits(frame, frame["patient_id"]), "patients with images in more than one split")]
    studies, source = study_keys(frame)
    if studies is None:
        checks.append(_check("study_overlap", None, "no study_id column, and file names are not <patient>_<study>"))
    else:
        checks.append(_check("study_overlap", _in_several_splits(frame, studies), f"studies in more than one split (from the {source})"))
    checks.append(_check("image_overlap", _in_several_splits(frame, frame["image"].astype(str)), "image URIs in more than one split"))

    pixels, ok = thumbnails(frame["image"].astype(str).tolist())
    hashes = residual_hashes(pixels, ok)
    readable = np.flatnonzero(ok)
    found = cross_split_pairs(hashes[readable], frame["split"].to_numpy()[readable], max_distance)
    found["i"], found["j"] = readable[found["i"].to_numpy()], readable[found["j"].to_numpy()]
    table = _pairs_table(frame, found)
    detail = f"pairs of images in different splits at most {max_distance} of {BITS} bits apart (mean-residual pHash)"
    if (~ok).any():
        detail += f"; {int((~ok).sum())} unreadable images not compared"
    checks.append(_check("near_duplicates", len(table), detail))

    paths = {"audit.json": storage.join(out, "audit.json"), "audit.md": storage.join(out, "audit.md"),
             "near_duplicates.parquet": storage.join(out, "near_duplicates.parquet")}  # fmt: skip
    columns = ["a", "b", "split_a", "split_b", "distance"]
    thumbs = None
    if len(table) and thumbnail_pairs:
        thumbs = "near_duplicates.png"
        paths[thumbs] = storage.join(out, thumbs)
        storage.write_bytes(paths[thumbs], _sheet(table, pixels, thumbnail_pairs))
    passed = all(c["passed"] for c in checks)
    result = {
        "passed": passed,
        "checks": checks,
        "near_duplicates": [{k: (int(v) if k == "distance" else str(v)) for k, v in row.items()} for row in table[columns].head(LISTED).to_dict("records")],
        "thumbnails": thumbs,
    }  # fmt: skip
    buffer = io.BytesIO()
    table[[*columns, "same_patient"]].to_parquet(buffer, index=False)
    storage.write_bytes(paths["near_duplicates.parquet"], buffer.getvalue())
    storage.write_text(paths["audit.json"], json.dumps(result, indent=2))
    storage.write_text(paths["audit.md"], _markdown(result, manifest_uri, max_distance))
    # One line for the whole audit; the callers print the checks, audit.md keeps them.
    failed = ", ".join(f"{c['name']} ({c['count']})" for c in checks if not c["passed"])
    (log.error if failed else log.info)("leakage audit %s → %s", f"FAILED: {failed}" if failed else "passed", paths["audit.md"])
    return Audit(passed, checks, table.drop(columns=["i", "j"]), paths)
