"""Augmentation policies by modality, run per sample on whatever device holds the batch.

Each policy makes only changes that keep an image's labels true.

``cxr`` (chest X-ray): small rotations, shifts and zooms, brightness and contrast — what changes
between two exposures of the same chest. Never a left-right flip: the heart sits on the patient's
left, and a mirrored film shows dextrocardia, a different diagnosis; laterality markers would lie too.
That is why ``cxr`` has no ``hflip`` parameter to switch on.

``derm`` (dermoscopy): any rotation and both flips, since a skin lesion has no canonical
orientation, and colour jitter with hue and saturation kept small because colour is itself a
diagnostic sign (blue-white veil, red vessels).

``fundus`` (retinal photographs): rotation, flips, brightness and contrast. A horizontal flip makes a
right eye look like a left one (the optic disc changes side): harmless for grading tasks such as
diabetic retinopathy, but laterality labels, or labels tied to one side of the retina, need
``hflip=0`` and ``vflip=0``.

``histo`` (histopathology patches): quarter turns and flips (a patch under the microscope can lie in
any of its eight orientations), random crops resized back to the input size, and two kinds of colour
change for the stain differences between labs: HED stain jitter (below) and hue/saturation jitter.

HED stain jitter (Tellez et al. 2018, 2019; ``hed_sigma``): each RGB image is unmixed into optical
densities of haematoxylin, eosin and DAB with Ruifrok and Johnston's colour deconvolution (the
matrix scikit-image's ``rgb2hed`` uses), each stain's density ``s`` becomes ``α·s + β`` with its own
``α`` in [1 − σ, 1 + σ] and ``β`` in [−σ, σ] (in optical density units), and the image is mixed back
and clipped to [0, 1]: more or less haematoxylin or eosin, as another lab's staining gives, on every
pixel alike. It moves no pixel, so nothing a diagnosis rests on changes place.

``none``: the identity.

Parameters (``POLICIES`` has each policy's own, with defaults; 0 switches a transform off):
``degrees`` largest rotation either way; ``translate`` largest shift, as a fraction of the side;
``scale`` largest zoom in or out, as a fraction; ``hflip``/``vflip`` flip probabilities; ``rot90``
probability of a quarter turn (square images only: a turn would swap height and width); ``crop``
largest fraction of each side a crop cuts away; ``brightness``/``contrast``/``saturation``/``hue`` as
in torchvision's ``ColorJitter``; ``hed_sigma`` the HED jitter's σ (hue, saturation and HED leave
grayscale images alone).

Why on the device: on a GPU the CPUs cannot augment as fast as the model trains (measured on an H100:
0.27× of the model's speed with augmentation in Ray Data tasks). So Ray Data ships uint8 batches and
the training worker augments them where they land, every sample with its own draw: orientation
changes are exact pixel moves (flips, quarter turns), rotation, shift, zoom and crop are one
``affine_grid``/``grid_sample`` pass, and the colour changes are per-sample blends. The same code runs
on CPU, so the policies' tests hold for both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medray.choices import AUGMENT_POLICIES as POLICIES
from medray.choices import augment_params as resolve

__all__ = ["POLICIES", "Augment", "augment_batch", "resolve"]

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Ruifrok & Johnston (2001): optical density of haematoxylin, eosin and DAB (rows) in R, G, B, as
# scikit-image's ``rgb_from_hed``; its inverse unmixes an image's densities into the three stains.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# Darkest value taken into optical density (as scikit-image's): black pixels would have infinite density.
_DARKEST = 1e-6


class Augment:
    """A policy as a callable on float ``(B, C, H, W)`` batches in [0, 1], on any device."""

    def __init__(self, name: str, params: dict[str, float] | None = None):
        self.p = {key: value for key, value in resolve(name, params).items() if value}
        # Transforms at 0 are left out rather than run at 0, so that all-zero parameters give exactly the input back.

    @property
    def identity(self) -> bool:
        return not self.p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.identity:
            return x
        n, channels, height, width = x.shape
        p = self.p

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, device=x.device, dtype=x.dtype, generator=generator)

        def uniform(bound: float, centre: float = 0.0) -> torch.Tensor:
            return centre + bound * (2 * rand() - 1)

        def coin(probability: float) -> torch.Tensor:
            return (rand() < probability).view(n, 1, 1, 1)

        # Orientation: exact pixel moves. With flips at 0.5 each, a quarter turn at 0.5 makes all
        # eight orientations of a square patch equally likely.
        if p.get("rot90") and height == width:
            x = torch.where(coin(p["rot90"]), x.rot90(1, dims=(-2, -1)), x)
        if p.get("hflip"):
            x = torch.where(coin(p["hflip"]), x.flip(-1), x)
        if p.get("vflip"):
            x = torch.where(coin(p["vflip"]), x.flip(-2), x)
        if any(p.get(key) for key in ("degrees", "translate", "scale", "crop")):
            x = self._resample(x, rand, uniform)
        if channels == 3 and p.get("hed_sigma"):
            sigma = p["hed_sigma"]
            x = _jitter_stains(x, 1 + sigma * (2 * rand(3) - 1), sigma * (2 * rand(3) - 1))
        return self._colour(x, uniform, channels)

    def _resample(self, x: torch.Tensor, rand, uniform) -> torch.Tensor:
        """Crop (resized back), rotation, shift and zoom as one sampling grid per image."""
        n, _, height, width = x.shape
        p = self.p
        angle = torch.deg2rad(uniform(p.get("degrees", 0)))
        zoom = uniform(p.get("scale", 0), 1.0)
        # Pixel units around the centre, so that a rotation keeps its angles on non-square images.
        half = torch.tensor([width / 2, height / 2], device=x.device, dtype=x.dtype)
        shift = torch.stack([uniform(p.get("translate", 0)) * width, uniform(p.get("translate", 0)) * height], 1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # Output pixel q samples the input at R(-angle)/zoom · (q - shift).
        rotate = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (n, 2, 2)
        linear = rotate * half.view(1, 1, 2) / half.view(1, 2, 1)  # in grid_sample's [-1, 1] coordinates
        offset = -(rotate @ shift.unsqueeze(2)).squeeze(2) / half
        # A crop keeps the same fraction of each side (cells keep their shape) at a random place.
        keep = 1 - p.get("crop", 0) * rand()
        centre = (1 - keep).unsqueeze(1) * (2 * rand(2) - 1)
        theta = torch.cat([keep.view(n, 1, 1) * linear, (keep.unsqueeze(1) * offset + centre).unsqueeze(2)], 2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, x: torch.Tensor, uniform, channels: int) -> torch.Tensor:
        p, view = self.p, (-1, 1, 1, 1)
        if p.get("brightness"):
            x = (x * uniform(p["brightness"], 1.0).view(view)).clamp_(0, 1)
        if p.get("contrast"):
            mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
            factor = uniform(p["contrast"], 1.0).view(view)
            x = (factor * x + (1 - factor) * mean).clamp_(0, 1)
        if channels == 3 and p.get("saturation"):
            factor = uniform(p["saturation"], 1.0).view(view)
            x = (factor * x + (1 - factor) * _gray(x)).clamp_(0, 1)
        if channels == 3 and p.get("hue"):
            x = _rotate_hue(x, uniform(p["hue"])).clamp_(0, 1)
        return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


def _jitter_stains(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → stain densities (H, E, DAB) → ``alpha · s + beta`` per image and stain (``(n, 3)``
    each) → RGB, clipped. Per pixel, so the image's geometry is untouched."""
    hed_from_rgb = torch.tensor(_HED_FROM_RGB, device=x.device, dtype=x.dtype)
    rgb_from_hed = torch.tensor(_RGB_FROM_HED, device=x.device, dtype=x.dtype)
    density = -torch.log(x.clamp(min=_DARKEST))
    stains = torch.einsum("nchw,cs->nshw", density, hed_from_rgb)
    stains = alpha.view(-1, 3, 1, 1) * stains + beta.view(-1, 3, 1, 1)
    return torch.exp(-torch.einsum("nshw,sc->nchw", stains, rgb_from_hed)).clamp_(0, 1)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each image's hue moved by its own fraction of a turn, through HSV as torchvision's ``adjust_hue``
    does (which takes one factor per call, so it cannot draw per sample)."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(high == r, (g - b) / safe, torch.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + turns.view(-1, 1, 1), 1.0)
    saturation = torch.where(high > 0, chroma / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    # HSV → RGB: channel c takes v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6 * hue.unsqueeze(1), 6)
    return high.unsqueeze(1) * (1 - saturation.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def augment_batch(pixels: np.ndarray, name: str, params: dict[str, float] | None = None, seed: int | None = None) -> np.ndarray:
    """``(B, H, W)`` grayscale or ``(B, H, W, 3)`` RGB uint8 → the same shape and dtype, each image
    with its own random draw (on the CPU: for tests, previews and CPU-only pipelines)."""
    gray = pixels.ndim == 3
    if pixels.dtype != np.uint8 or not (gray or (pixels.ndim == 4 and pixels.shape[-1] == 3)):
        raise ValueError(f"expected uint8 (B, H, W) or (B, H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    augment = Augment(name, params)
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    x = (x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2)).float().div_(255)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = augment(x, generator).mul_(255).round_().to(torch.uint8)
    out = out.squeeze(1) if gray else out.permute(0, 2, 3, 1)
    return np.ascontiguousarray(out.numpy())
