"""Synthetic chest X-rays in the NIH ChestX-ray14 layout, so the whole platform runs without real data.

The images are simple but honest: a torso, two lung fields with ribs, a mediastinum and a heart
shadow, and four findings a CNN must really learn to see —

- *Mass*: a soft lobulated opacity over 3 cm in a lung field (rare: ~7 % of images),
- *Nodule*: a small (1–2.5 cm), sharper opacity,
- *Cardiomegaly*: a heart shadow widened past a cardiothoracic ratio of ~0.5 (commoner with age),
- *Effusion*: a dense, meniscus-shaped opacity filling a costophrenic angle.

Each patient has several studies (follow-ups) sharing their anatomy and a patient-specific necklace,
so a model that memorises patients profits from leakage between splits — which is what the leakage
audit and patient-level splits are for. Three simulated raters read every image with finding-specific
sensitivity and specificity, written to a side CSV. Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

FINDINGS = ("Mass", "Nodule", "Cardiomegaly", "Effusion")
FIELD_OF_VIEW_MM = 360.0
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
# Per finding: probability that a patient has it, and (sensitivity, specificity) of a typical rater.
PATIENT_PREVALENCE = {"Mass": 0.10, "Nodule": 0.09, "Cardiomegaly": 0.08, "Effusion": 0.10}
RATER_ACCURACY = {"Mass": (0.93, 0.99), "Nodule": (0.72, 0.97), "Cardiomegaly": (0.85, 0.95), "Effusion": (0.86, 0.96)}
SHOWN_AT_FOLLOW_UP = 0.9  # a patient's finding is visible on most, not all, of their studies


@dataclass(frozen=True)
class Patient:
    pid: int
    sex: str
    age: int
    anatomy: np.ndarray  # lung/heart shape jitter, fixed for the patient
    necklace: tuple[float, float, int, float]  # height, curvature, bead count, pendant size
    findings: frozenset[str]
    studies: int


def _ellipse(xx, yy, cx, cy, ax, ay, softness=0.02):
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return np.clip((1.0 - r) / softness + 0.5, 0.0, 1.0)


def _make_patient(pid: int, rng: np.random.Generator, prevalence: dict[str, float]) -> Patient:
    age = int(np.clip(rng.normal(55, 17), 18, 95))
    prevalence = dict(prevalence)
    prevalence["Cardiomegaly"] *= 0.5 if age < 50 else 1.6
    findings = frozenset(f for f in FINDINGS if rng.random() < prevalence[f])
    return Patient(
        pid=pid,
        sex=str(rng.choice(["M", "F"])),
        age=age,
        anatomy=rng.normal(0, 1, size=6),
        necklace=(rng.uniform(0.10, 0.22), rng.uniform(0.6, 2.2), int(rng.integers(5, 14)), rng.uniform(0.0, 0.02)),
        findings=findings,
        studies=int(min(1 + rng.poisson(1.6), 6)),
    )


def _lungs(p: Patient):
    a = p.anatomy
    scale = 1 + 0.05 * a[0]
    right = (0.33 + 0.01 * a[1], 0.47, 0.13 * scale, 0.26 * scale)  # patient's right = image left
    left = (0.67 + 0.01 * a[1], 0.48, 0.12 * scale, 0.25 * scale)
    return right, left


def render(p: Patient, shown: frozenset[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """One study of patient ``p`` showing the findings in ``shown``, as a uint8 image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shift = rng.normal(0, 0.008, size=2)
    xx, yy = xx - shift[0], yy - shift[1]
    a = p.anatomy
    body = _ellipse(xx, yy, 0.5, 0.58, 0.43, 0.52)
    img = 0.08 + body * (0.47 + _ellipse(xx, yy, 0.5, 0.6, 0.035, 0.6, 0.1) * 0.2)  # torso and spine
    right, left = _lungs(p)
    lung = np.maximum(_ellipse(xx, yy, *right), _ellipse(xx, yy, *left))
    ribs = 0.05 * (np.sin(2 * np.pi * (yy * 11 + 2.5 * (xx - 0.5) ** 2)) > 0.4)
    img = img * (1 - 0.6 * lung) + lung * ribs

    heart_w = (0.215 if "Cardiomegaly" in shown else 0.145) * (1 + 0.05 * a[2]) + rng.normal(0, 0.004)
    img = np.maximum(img, _ellipse(xx, yy, 0.55 + 0.015 * a[3], 0.66, heart_w, 0.12 * (1 + 0.04 * a[4]), 0.06) * 0.62)

    if "Effusion" in shown:
        cx, cy, ax, ay = right if rng.random() < 0.5 else left
        level = cy + ay * rng.uniform(0.35, 0.65)
        meniscus = yy > level - 0.06 * ((xx - cx) / ax) ** 2
        img = np.maximum(img, _ellipse(xx, yy, cx, cy, ax, ay, 0.05) * meniscus * 0.58)

    for finding, (lo, hi), gain, soft in (("Mass", (30, 60), 0.33, 0.25), ("Nodule", (10, 25), 0.28, 0.08)):
        if finding not in shown:
            continue
        cx, cy, ax, ay = right if rng.random() < 0.5 else left
        t, rho = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.45))
        radius = rng.uniform(lo, hi) / 2 / FIELD_OF_VIEW_MM
        lobes = 1 + 0.15 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + t) if finding == "Mass" else 1
        blob = _ellipse(xx, yy, cx + rho * ax * np.cos(t), cy + rho * ay * np.sin(t), radius * lobes, radius, soft)
        img = img + blob * gain

    height, curve, beads, pendant = p.necklace  # the patient's own jewellery
    for i in range(beads):
        bx = 0.36 + 0.28 * i / (beads - 1)
        img = np.maximum(img, _ellipse(xx, yy, bx, height + curve * (bx - 0.5) ** 2, 0.007, 0.007, 0.3) * 0.95)
    if pendant > 0.005:
        img = np.maximum(img, _ellipse(xx, yy, 0.5, height + 0.03, pendant, pendant * 1.4, 0.2) * 0.95)

    exposure = rng.uniform(0.85, 1.15)
    img = np.clip(img * exposure + rng.normal(0, 0.02, img.shape), 0, 1) ** rng.uniform(0.9, 1.1)
    return (img * 255).astype(np.uint8)


def _votes(truth: frozenset[str], rng: np.random.Generator, raters: int = 3) -> list[dict]:
    rows = []
    for rater in range(raters):
        skill = 1 + 0.04 * (rater - 1)  # raters differ a little in how much they see
        row = {"Rater": f"R{rater + 1}"}
        for f in FINDINGS:
            sens, spec = RATER_ACCURACY[f]
            p_positive = min(sens * skill, 0.995) if f in truth else (1 - spec) / skill
            row[f] = int(rng.random() < p_positive)
        rows.append(row)
    return rows


def generate(
    out: str, patients: int = 600, image_size: int = 256, seed: int = 0, prevalence: dict[str, float] | None = None
) -> str:
    """Write ``images/*.png``, ``Data_Entry_2017.csv`` and ``rater_votes.csv`` under ``out``; return the CSV path.

    ``prevalence`` overrides the share of patients with a finding, e.g. ``{"Mass": 0.015}`` for a rare one.
    """
    prevalence = {**PATIENT_PREVALENCE, **(prevalence or {})}
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    spacing = f"{FIELD_OF_VIEW_MM / image_size:.3f}"
    entries, votes = [], []
    streams = np.random.SeedSequence(seed).spawn(patients)
    # disable=None: a bar on a terminal only; in a log file or a pipe every redraw would be a line
    for pid, stream in enumerate(tqdm(streams, desc="demo patients", unit="patient", disable=None), start=1):
        rng = np.random.default_rng(stream)
        patient = _make_patient(pid, rng, prevalence)
        for follow_up in range(patient.studies):
            # In FINDINGS' order: a frozenset's order follows Python's per-process string hashing, and the draws would too.
            shown = frozenset(f for f in FINDINGS if f in patient.findings and rng.random() < SHOWN_AT_FOLLOW_UP)
            name = f"{pid:08d}_{follow_up:03d}.png"
            Image.fromarray(render(patient, shown, image_size, rng)).save(os.path.join(images, name))
            labels = "|".join(sorted(shown)) or "No Finding"
            view = "AP" if rng.random() < 0.35 else "PA"
            age = min(patient.age + follow_up, 99)
            entries.append([name, labels, follow_up, pid, age, patient.sex, view, image_size, image_size, spacing, spacing])
            votes += [{"Image Index": name, **v} for v in _votes(shown, rng)]

    csv_path = os.path.join(out, "Data_Entry_2017.csv")
    with open(csv_path, "w", newline="") as f:
        f.write(NIH_HEADER + "\n")  # the published header: bracketed two-field names and a trailing comma
        csv.writer(f).writerows(entries)
    with open(os.path.join(out, "rater_votes.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["Image Index", "Rater", *FINDINGS])
        writer.writeheader()
        writer.writerows(votes)
    return csv_path
