"""Frozen encoders for ``medray embed``: a backbone without its head, from local weights only.

Three sources, one result (``Encoder``: images in [0, 1] → one feature vector each):

- a registry backbone (medray.training.models: ``resnet18``, ``densenet121``…) minus its head, with
  weights from a torchvision state dict file or a medray checkpoint (its folder, its run, or its
  ``model.pt``) — a classifier trained by medray on other labels is a common frozen backbone;
- ``timm:<model name>`` with weights from a local ``.safetensors`` file or PyTorch state dict;
- ``hf:<folder or repo id>``: a Hugging Face vision model (``AutoModel`` + ``AutoImageProcessor``) from
  a local folder, or from a Hugging Face cache filled beforehand (``local_files_only``).

Nothing is ever downloaded: hospital clusters are offline, and weights that come from somewhere are
weights whose identity is known. A missing file or an uncached repository is one line naming what to
put where. Each encoder knows the sha256 of its weights, which the store records beside every vector.
"""

from __future__ import annotations

import hashlib
import io
import os

import torch
from torch import nn

from medray.errors import MedrayError
from medray.io import storage
from medray.training import checkpoint
from medray.training.models import BACKBONES, WeightsError, build_model, head_module, load_state_dict

TIMM, HF = "timm:", "hf:"
EXTRA = "pip install 'medray[embed]'"
HF_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
HF_FILES = ("config.json", "preprocessor_config.json")


class EncoderError(MedrayError, ValueError):
    """An encoder that cannot be loaded as asked (unknown name, missing or unfitting weights): one line."""


class Encoder(nn.Module):
    """Images scaled to [0, 1], ``(B, C, H, W)`` at ``image_size`` → features ``(B, dim)``; the model's
    own normalisation is applied inside, so every caller feeds it the same way."""

    def __init__(self, features: nn.Module, backbone: str, image_size: int, in_channels: int, mean, std, sha256: str):
        super().__init__()
        self.features = features.eval()
        self.backbone, self.image_size, self.in_channels, self.sha256 = backbone, image_size, in_channels, sha256
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1))
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1))
        self.requires_grad_(False)
        self.dim = self._probe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self._mean) / self._std).flatten(1)

    def _probe(self) -> int:
        """The feature width, from one blank image: it also proves the model takes this input size."""
        try:
            with torch.inference_mode():
                return int(self(torch.zeros(1, self.in_channels, self.image_size, self.image_size)).shape[1])
        except (RuntimeError, ValueError, AssertionError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EncoderError(
                f"{self.backbone} cannot embed {self.image_size} px images ({first[:200]}): set embed.image_size to its size"
            ) from None


def load_encoder(
    backbone: str, weights: str | None = None, in_channels: int | None = None, image_size: int | None = None,
    model_args: dict | None = None,
) -> Encoder:  # fmt: skip
    """The frozen encoder ``backbone`` names (a registry name, ``timm:<name>`` or ``hf:<folder or repo id>``),
    in eval mode on the CPU. ``in_channels`` (registry backbones from a state dict file; default 3) and
    ``image_size`` (default: the model's own) override; ``model_args`` go to ``timm.create_model``."""
    if backbone.startswith(TIMM):
        return _timm(backbone[len(TIMM) :], weights, image_size, model_args or {})
    if backbone.startswith(HF):
        if weights:
            raise EncoderError(f"embed.weights: {backbone} loads its weights from its folder or cache; leave embed.weights unset")
        return _hf(backbone[len(HF) :], image_size)
    return _registry(backbone, weights, in_channels, image_size)


def _missing(weights: str, what: str) -> EncoderError:
    return EncoderError(f"embed.weights: {weights} does not exist: put {what} there (nothing is downloaded)")


# --- the registry ------------------------------------------------------------------------------------


def _is_checkpoint(uri: str) -> bool:
    return storage.exists(storage.join(uri, checkpoint.META_FILE)) or storage.exists(storage.join(uri, checkpoint.BEST_FILE))


def _registry(name: str, weights: str | None, in_channels: int | None, image_size: int | None) -> Encoder:
    if name not in BACKBONES:
        raise EncoderError(f"embed.backbone {name!r}: not a registry backbone ({', '.join(sorted(BACKBONES))}), timm:<name> or hf:<folder>")
    if not weights:
        raise EncoderError(
            f"embed.weights: a frozen {name} needs weights (a torchvision state dict file, or a medray checkpoint or run); "
            "random weights embed nothing useful"
        )
    spec = BACKBONES[name]
    if _is_checkpoint(weights):
        uri = checkpoint.locate(weights)
        model, meta = checkpoint.load_model(uri)  # verified against its manifest, weights_only
        if meta["backbone"] != name:
            raise EncoderError(f"embed.weights: {uri} is a {meta['backbone']} checkpoint; set embed.backbone={meta['backbone']}")
        sha256, size = meta["sha256"], image_size or int(meta["image_size"])
    else:
        if not storage.exists(weights):
            raise _missing(weights, f"the {name} weights (a torchvision state dict, or a medray checkpoint folder)")
        sha256 = hashlib.sha256(storage.read_bytes(weights)).hexdigest()
        try:
            state = load_state_dict(weights)
            stem = state.get(f"backbone.{spec.stem}.weight")  # a medray model.pt: keep the channels it was trained on
            channels = int(stem.shape[1]) if stem is not None and "mean" in state else (in_channels or 3)
            model = build_model(name, 1, channels, weights=weights).eval()
        except WeightsError as err:
            raise EncoderError(str(err)) from None
        size = image_size or spec.input_size
    dim = head_module(model).in_features
    parent, _, leaf = spec.head.rpartition(".")
    setattr(model.backbone.get_submodule(parent) if parent else model.backbone, leaf, nn.Identity())  # the head belongs to its task
    encoder = Encoder(model.backbone, name, size, model.mean.shape[1], model.mean.flatten().tolist(), model.std.flatten().tolist(), sha256)
    assert encoder.dim == dim, (encoder.dim, dim)
    return encoder


# --- timm --------------------------------------------------------------------------------------------


def _state_dict(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict: safetensors, or a PyTorch file (weights only) that may wrap
    it in ``state_dict`` / ``model`` and prefix it with DDP's ``module.``."""
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — whatever a file that is not weights makes the loaders raise
        raise EncoderError(f"{uri} cannot be loaded as weights ({type(err).__name__}): a truncated download or another format?") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _timm(name: str, weights: str | None, image_size: int | None, model_args: dict) -> Encoder:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise EncoderError(f"timm:{name} needs timm: {EXTRA}") from None
    if not weights:
        raise EncoderError(
            f"embed.weights: timm:{name} needs a local weights file (.safetensors or a PyTorch state dict); nothing is downloaded"
        )
    if not storage.exists(weights):
        raise _missing(weights, f"the timm:{name} weights (.safetensors or a PyTorch state dict)")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_args)  # num_classes=0: pooled features
    except (RuntimeError, TypeError) as err:  # an unknown name, an argument the model does not take
        raise EncoderError(f"embed.backbone timm:{name}: {str(err).splitlines()[0]}") from None
    data = storage.read_bytes(weights)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in _state_dict(data, weights).items() if not k.startswith(tuple(f"{h}." for h in heads))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # layers of another shape: torch's second line names the first of them
        lines = str(err).splitlines()
        raise EncoderError(f"{weights} does not fit timm:{name}: {lines[min(1, len(lines) - 1)].strip()[:200]}") from None
    if missing or unexpected:
        raise EncoderError(
            f"{weights} does not fit timm:{name}: {len(missing)} layers missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); another model or other embed.model_args?"
        )
    cfg = resolve_data_config({}, model=model)
    size = image_size or int(cfg["input_size"][-1])
    return Encoder(model, TIMM + name, size, int(cfg["input_size"][0]), cfg["mean"], cfg["std"], hashlib.sha256(data).hexdigest())


# --- Hugging Face ------------------------------------------------------------------------------------


class _Pooled(nn.Module):
    """A transformers vision model's one vector per image: its pooled output when its weights hold the
    pooler, else the CLS token (ViTs) or the mean over positions (CNNs)."""

    def __init__(self, model: nn.Module, pooled: bool):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.pooled and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=tuple(range(2, hidden.ndim)))


def hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_folder(ref: str) -> str:
    """The folder of ``ref``: itself if it is one, else the cached snapshot of the repo id ``ref``."""
    if os.path.isdir(ref):
        return os.path.abspath(ref)
    if os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") != 1:
        raise EncoderError(
            f"embed.backbone hf:{ref}: no such folder; give a local folder or a repo id (owner/name) in the Hugging Face cache"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 — not cached (LocalEntryNotFoundError), or a cache that is not one
        raise EncoderError(
            f"hf:{ref} is not in the Hugging Face cache at {hf_cache()}: on a machine with internet run "
            f"`hf download {ref}` (or `huggingface-cli download {ref}`) and copy the cache here, or give a local folder"
        ) from None


def _folder_sha256(folder: str) -> str:
    """The identity of a model folder: its config, image processor and weight files, by name and content."""
    total = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name in HF_FILES or name.endswith(HF_WEIGHTS):
            one = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                while block := f.read(1 << 24):
                    one.update(block)
            total.update(name.encode() + b"\0" + one.digest())
    return total.hexdigest()


def _side(size) -> int | None:
    """A processor's size setting as one side: a dict (or transformers' ``SizeDict``) of height or shortest edge, or a number."""
    if hasattr(size, "get"):
        return size.get("height") or size.get("shortest_edge")
    return size


def _hf(ref: str, image_size: int | None) -> Encoder:
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError:
        raise EncoderError(f"hf:{ref} needs transformers: {EXTRA}") from None
    folder = _hf_folder(ref)
    name = HF + (folder if os.path.isdir(ref) else ref)
    if not os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        raise EncoderError(
            f"{name}: no preprocessor_config.json in {folder} (the model's input size and normalisation); copy it from the model's repo"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model, loading = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        raise EncoderError(f"{name}: cannot be loaded from {folder} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    # Weights the folder lacks are random: refuse them, except a pooler (a ViT's, trained for another task) — use CLS instead.
    missing = [k for k in loading.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise EncoderError(
            f"{name}: the weights in {folder} lack {len(missing)} layers of {type(model).__name__} (e.g. {sorted(missing)[:3]})"
        )
    pooled = not any(k.startswith("pooler.") for k in loading.get("missing_keys", []))
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = image_size or _side(crop) or _side(getattr(processor, "size", None)) or model.config.image_size
    channels = int(getattr(model.config, "num_channels", 3))
    normalise = getattr(processor, "do_normalize", True)
    mean = processor.image_mean if normalise else [0.0] * channels
    std = processor.image_std if normalise else [1.0] * channels
    return Encoder(_Pooled(model, pooled), name, int(size), channels, mean, std, _folder_sha256(folder))
