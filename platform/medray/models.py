"""The one table of backbones, and building a classifier from a name.

Each entry knows its native input size, its normalisation and where its stem convolution and its
classifier head live, so adapting it to grayscale input and to our labels is the same code for all.
Weights never come from the internet: they load from a local or ``s3://`` file, checked by sha256
when one is given.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

from medray import storage

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]
    input_size: int
    stem: str
    head: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(tvm.resnet18, 224, stem="conv1", head="fc"),
    "resnet34": Backbone(tvm.resnet34, 224, stem="conv1", head="fc"),
    "resnet50": Backbone(tvm.resnet50, 224, stem="conv1", head="fc"),
    "densenet121": Backbone(tvm.densenet121, 224, stem="features.conv0", head="classifier"),
    "efficientnet_b0": Backbone(tvm.efficientnet_b0, 224, stem="features.0.0", head="classifier.1"),
}


class WeightsError(ValueError):
    pass


class Classifier(nn.Module):
    """Normalisation inside the model, so training, evaluation and scoring cannot disagree on it.

    Takes images scaled to [0, 1], ``(B, C, H, W)``; returns one logit per label.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, module)


def load_state_dict(uri: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(uri)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise WeightsError(f"{uri}: sha256 does not match model.weights_sha256")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def _load_pretrained(net: nn.Module, state: dict, uri: str) -> None:
    own = net.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if mismatched or missing:
        details = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5]]
        raise WeightsError(
            f"{uri} does not fit this backbone: {len(mismatched)} layers of another shape "
            f"({'; '.join(details)}), {len(missing)} missing (e.g. {missing[:3]})"
        )
    net.load_state_dict(state, strict=False)


def build_model(
    backbone: str, num_labels: int, in_channels: int = 1, weights: str | None = None, sha256: str | None = None
) -> Classifier:
    spec = BACKBONES[backbone]
    net = spec.build(weights=None)
    if weights:
        _load_pretrained(net, load_state_dict(weights, sha256), weights)

    stem = net.get_submodule(spec.stem)
    if in_channels != stem.in_channels:
        # Summing the RGB filters keeps a pretrained stem's response to a gray image unchanged.
        conv = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=stem.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(stem.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        _replace(net, spec.stem, conv)
    head = net.get_submodule(spec.head)
    _replace(net, spec.head, nn.Linear(head.in_features, num_labels))

    mean, std = spec.mean, spec.std
    if in_channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return Classifier(net, mean, std)
