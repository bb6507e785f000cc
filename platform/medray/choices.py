"""The names a config chooses from, kept free of torch so that validating a config stays light:
augmentation policies with their parameters (what each does: ``medray.training.augment``) and backbones
(how each is built: ``medray.training.models``, whose table has exactly these names)."""

from __future__ import annotations

BACKBONE_NAMES = (
    "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny",
    "monai.densenet121", "monai.efficientnet-b0",
)  # fmt: skip

AUGMENT_POLICIES: dict[str, dict[str, float]] = {
    "cxr": {"degrees": 7, "translate": 0.06, "scale": 0.08, "brightness": 0.2, "contrast": 0.2},
    "derm": {
        "hflip": 0.5, "vflip": 0.5, "degrees": 180,
        "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.03,
    },
    "fundus": {"hflip": 0.5, "vflip": 0.5, "degrees": 30, "brightness": 0.2, "contrast": 0.2},
    "histo": {
        "rot90": 0.5, "hflip": 0.5, "vflip": 0.5, "crop": 0.15,
        "brightness": 0.1, "contrast": 0.1, "saturation": 0.2, "hue": 0.04, "hed_sigma": 0.05,
    },
    "none": {},
}
_PROBABILITIES = ("hflip", "vflip", "rot90")


def augment_params(name: str, params: dict[str, float] | None = None) -> dict[str, float]:
    """Policy ``name``'s parameters with ``params`` overriding its defaults by name; a ValueError
    names an unknown policy or parameter and a value that is not a number or out of range."""
    if name not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; known: {', '.join(AUGMENT_POLICIES)}")
    defaults = AUGMENT_POLICIES[name]
    merged = dict(defaults)
    for key, value in (params or {}).items():
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise ValueError(f"unknown parameter {key!r} for augmentation policy {name!r}; valid: {valid}")
        try:
            merged[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"augmentation parameter {key!r} must be a number, got {value!r}") from None
    for key in _PROBABILITIES:
        if key in merged and not 0 <= merged[key] <= 1:
            raise ValueError(f"augmentation parameter {key!r} must be a probability in [0, 1], got {merged[key]}")
    for key in ("crop", "hed_sigma"):  # a crop of the whole side leaves nothing; a stain factor of 1 − 1 erases the stain
        if not 0 <= merged.get(key, 0) < 1:
            raise ValueError(f"augmentation parameter {key!r} must be in [0, 1), got {merged[key]}")
    return merged


