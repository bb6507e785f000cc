"""Stain normalisation of H&E patches (Macenko or Reinhard), fitted to a reference once per job and
applied to each patch as extraction reads it (``wsi.stain_normalise``, ``wsi.stain_reference``).

Slides from different labs and scanners differ in colour far more than in anything a label depends
on; normalisation maps every patch onto one reference stain before training, embedding or scoring.

- **Macenko** (Macenko et al., ISBI 2009) estimates a patch's two stain vectors in optical density
  (the extreme angles of its stained pixels in the plane of the two largest eigenvectors) and rebuilds
  the patch with the reference's vectors, its concentrations scaled to the reference's 99th percentiles.
- **Reinhard** (Reinhard et al., 2001) matches the mean and standard deviation of each CIE L*a*b*
  channel to the reference's: cheap, but blind to which stain is which.

Which library: torchstain's numpy backend (MIT, numpy only). Its ``fit`` does Macenko's careful part
(the eigen decomposition, the extreme angles, which vector is haematoxylin) and its Reinhard does the
whole job. MONAI's ``NormalizeHEStains`` was checked and not used: it has no Reinhard, and in MONAI
1.6 its ``ExtractHEStains`` orders the two vectors by their red/blue ratio the wrong way round for
optical densities (haematoxylin absorbs red), so a patch's eosin is rebuilt as the reference's
haematoxylin — pink stroma comes out blue.

What medray adds to torchstain's Macenko: the rebuild from the patch's fit is done here (four lines)
so that the fit can be checked first. A patch with almost no stain (glass, fat, a pale edge), or one
whose two stain vectors come out as one (a single flat colour), makes Macenko's fit meaningless —
torchstain would still return an image, every colour collapsed into one. Such a patch, and any patch
where the arithmetic fails, keeps its original pixels, and extraction records it in the shard's
``stain_normalised`` column and counts it. Reinhard skips the same stain-less patches: it would
stretch the noise of blank glass to the reference's spread of tissue colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from medray.errors import MedrayError
from medray.io import images

METHODS = ("none", "macenko", "reinhard")

# The standard H&E reference of Macenko's own implementation (torchstain's and MONAI's defaults): optical
# density vectors of haematoxylin (first column) and eosin (second) over R, G, B, and the two stains'
# 99th-percentile concentrations.
MACENKO_STAINS = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX = (1.9705, 1.0308)
# Reinhard: L*a*b* (L in 0-100) means and standard deviations averaged over ~50,000 tiles of ~450 TCGA
# slides (slideflow's "reinhard_fast" v3 fit; "fast": no brightness standardisation, as torchstain's).
REINHARD_MEANS = (58.12343, 26.483482, -12.701005)
REINHARD_STDS = (14.675022, 7.5744166, 5.226378)

# Macenko's constants: the light that reaches the camera through bare glass, and the optical density a
# pixel must reach in every channel to count as stained (below it: glass, or the palest eosin).
LIGHT, BETA = 240, 0.15
# A patch is left as it is below this share of stained pixels (too few for a fit that means anything),
# or when its two stain vectors are closer than this angle (one stain, or one flat colour). A real
# H&E's are 20-40 degrees apart.
MIN_STAINED = 0.05
MIN_ANGLE_DEGREES = 5.0
# Optical density -ln((v + 1) / LIGHT) ≥ BETA  ⟺  v ≤ LIGHT·e^(−BETA) − 1: one comparison on uint8 pixels.
_STAINED_BELOW = int(np.floor(LIGHT * np.exp(-BETA) - 1))


class StainError(MedrayError, ValueError):
    """The stain reference cannot be used (unreadable, or too little stain to fit)."""


@dataclass(frozen=True)
class StainSpec:
    """What a job normalises to: plain numbers, fitted once on the driver and shipped to every task
    (and written to ``extract.json``, so the patches say which reference they were mapped to)."""

    method: str = "none"  # none | macenko | reinhard
    reference: str = ""  # URI of the reference patch; "" = the standard reference above
    stains: tuple[tuple[float, float], ...] = MACENKO_STAINS  # macenko: 3 × 2, RGB rows, H and E columns
    max_concentrations: tuple[float, float] = MACENKO_MAX
    lab_means: tuple[float, float, float] = REINHARD_MEANS  # reinhard
    lab_stds: tuple[float, float, float] = REINHARD_STDS


def stained_share(pixels: np.ndarray) -> float:
    """Share of an RGB uint8 patch's pixels whose optical density reaches ``BETA`` in every channel."""
    return float((pixels.reshape(-1, 3).max(axis=1) <= _STAINED_BELOW).mean()) if pixels.size else 0.0


class _Macenko(NumpyMacenkoNormalizer):
    """torchstain's Macenko fit, one step made fast: every pixel's concentrations are solved through the
    2 × 3 pseudo-inverse of the stain matrix (one matrix product) instead of ``lstsq`` with a right-hand
    side per pixel, which took ~70 % of a 224-px patch's time. The same least-squares solution (with
    ``lstsq``'s cut-off for small singular values); tests/test_stain.py compares the fits. Should a
    torchstain release rename this private step, the override is not called: slower, never wrong."""

    def _NumpyMacenkoNormalizer__find_concentration(self, OD, HE):
        return _concentrations(OD, HE)


def _concentrations(density: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """``(2, N)`` concentrations of H and E that best explain ``(N, 3)`` optical densities."""
    return np.linalg.pinv(stains, rcond=3 * np.finfo(float).eps) @ np.reshape(density, (-1, 3)).T


def _fit_macenko(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patch's ``(3, 2)`` stain vectors and 99th-percentile concentrations; ValueError where they mean nothing."""
    fit = _Macenko()
    fit.fit(pixels, Io=LIGHT, beta=BETA)
    stains, top = np.asarray(fit.HERef, dtype=float), np.asarray(fit.maxCRef, dtype=float)
    h, e = stains.T / np.linalg.norm(stains, axis=0)[:, None]
    if not (np.isfinite(stains).all() and np.isfinite(top).all() and (top > 0).all()):
        raise ValueError("no stain concentrations")
    if np.degrees(np.arccos(np.clip(h @ e, -1, 1))) < MIN_ANGLE_DEGREES:
        raise ValueError("one stain vector")
    return stains, top


def fit_stain(method: str, reference: str | None = None) -> StainSpec:
    """The ``StainSpec`` of ``method`` fitted to the PNG patch at ``reference`` (local or s3://), or to the
    standard H&E reference when there is none. A reference that cannot be used is a ``StainError``."""
    if method not in METHODS:
        raise StainError(f"wsi.stain_normalise: {method!r} is not one of {', '.join(METHODS)}")
    if method == "none":
        return StainSpec()
    if not reference:
        return StainSpec(method)
    where = f"wsi.stain_reference {reference}"
    try:
        pixels = images.load(reference, None, 3)
    except MedrayError as err:
        raise StainError(f"{where}: {err}; give a PNG patch of H&E-stained tissue") from None
    if stained_share(pixels) < MIN_STAINED:
        raise StainError(f"{where}: under {MIN_STAINED:.0%} of its pixels are stained; give a patch of tissue, not of glass")
    try:
        with np.errstate(divide="raise", invalid="raise"):
            if method == "macenko":
                stains, top = _fit_macenko(pixels)
                return StainSpec(method, reference, _tuple(stains), _tuple(top))
            fit = NumpyReinhardNormalizer()
            fit.fit(pixels)
            means, stds = _tuple(fit.target_means), _tuple(fit.target_stds)
    except (ArithmeticError, ValueError, np.linalg.LinAlgError) as err:
        raise StainError(f"{where}: {method} cannot be fitted to it ({err}); give another H&E patch") from None
    if not (np.isfinite(means + stds).all() and min(stds) > 0):
        raise StainError(f"{where}: reinhard cannot be fitted to it (a flat colour); give another H&E patch")
    return StainSpec(method, reference, lab_means=means, lab_stds=stds)


def _tuple(values: np.ndarray):
    values = np.asarray(values, dtype=float)
    return tuple(_tuple(row) for row in values) if values.ndim > 1 else tuple(float(v) for v in values)


class StainNormaliser:
    """``normalise(pixels)`` → ``(pixels, normalised)``: an RGB uint8 patch mapped to the spec's reference,
    or the patch unchanged with ``False`` where the method is ``none`` or cannot be fitted to it."""

    def __init__(self, spec: StainSpec | None = None):
        self.spec = spec or StainSpec()
        self._stains = np.array(self.spec.stains, dtype=float)
        self._top = np.array(self.spec.max_concentrations, dtype=float)
        self._reinhard = NumpyReinhardNormalizer()
        self._reinhard.target_means = np.array(self.spec.lab_means, dtype=float)
        self._reinhard.target_stds = np.array(self.spec.lab_stds, dtype=float)

    @property
    def active(self) -> bool:
        return self.spec.method != "none"

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        if not self.active or stained_share(pixels) < MIN_STAINED:
            return pixels, False
        try:
            # Raised, not warned: a NaN would otherwise be cast silently to black pixels.
            with np.errstate(divide="raise", invalid="raise"):
                out = self._macenko(pixels) if self.spec.method == "macenko" else self._reinhard.normalize(pixels)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError):
            return pixels, False
        return out, True

    def _macenko(self, pixels: np.ndarray) -> np.ndarray:
        """The patch's concentrations of its own stains, scaled to the reference's maxima and mixed with the
        reference's stain vectors (torchstain's ``normalize``, after the fit has been checked)."""
        stains, top = _fit_macenko(pixels)
        density = -np.log((pixels.reshape(-1, 3).astype(float) + 1) / LIGHT)
        concentrations = _concentrations(density, stains) * (self._top / top)[:, None]
        out = LIGHT * np.exp(-self._stains @ concentrations)
        return np.clip(out.T, 0, 255).astype(np.uint8).reshape(pixels.shape)
