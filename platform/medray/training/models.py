"""The one table of backbones, and building a classifier from a name.

Each entry knows its native input size, its normalisation, where its stem convolution and its
classifier head live, and the stages of its feature extractor, so adapting it to grayscale input,
to our labels and to a freezing strategy is the same code for all. Weights never come from the
internet: they load from a local or ``s3://`` file, checked by sha256 when one is given.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision import models as tvm

from medray.errors import MedrayError
from medray.io import storage

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """``build()`` makes the randomly initialised 3-channel, 1000-class ImageNet network.

    ``stages`` run from input to output, stem first; each is one or more module paths. Together
    with ``head`` they hold every parameter of the network, each exactly once.
    """

    build: Callable[[], nn.Module]
    input_size: int
    stem: str
    head: str
    stages: tuple[tuple[str, ...], ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def _monai(name: str, **kwargs) -> nn.Module:
    from monai.networks import nets  # importing MONAI takes seconds: only pay for it when used

    return getattr(nets, name)(**kwargs)


_RESNET = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
# torchvision and MONAI share DenseNet's module names; a transition layer opens the next block's resolution.
_DENSENET = (
    ("features.conv0", "features.norm0"),
    ("features.denseblock1", "features.transition1"),
    ("features.denseblock2", "features.transition2"),
    ("features.denseblock3", "features.transition3"),
    ("features.denseblock4", "features.norm5"),
)

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(partial(tvm.resnet18, weights=None), 224, "conv1", "fc", _RESNET),
    "resnet34": Backbone(partial(tvm.resnet34, weights=None), 224, "conv1", "fc", _RESNET),
    "resnet50": Backbone(partial(tvm.resnet50, weights=None), 224, "conv1", "fc", _RESNET),
    "densenet121": Backbone(partial(tvm.densenet121, weights=None), 224, "features.conv0", "classifier", _DENSENET),
    "efficientnet_b0": Backbone(
        partial(tvm.efficientnet_b0, weights=None), 224, "features.0.0", "classifier.1",
        tuple((f"features.{i}",) for i in range(9)),
    ),
    # features.2/4/6 downsample into the next stage; the head's LayerNorm belongs to the last stage.
    "convnext_tiny": Backbone(
        partial(tvm.convnext_tiny, weights=None), 224, "features.0.0", "classifier.2",
        (("features.0",), ("features.1",), ("features.2", "features.3"), ("features.4", "features.5"),
         ("features.6", "features.7", "classifier.0")),
    ),
    "monai.densenet121": Backbone(
        partial(_monai, "DenseNet121", spatial_dims=2, in_channels=3, out_channels=1000), 224,
        "features.conv0", "class_layers.out", _DENSENET,
    ),
    "monai.efficientnet-b0": Backbone(
        partial(_monai, "EfficientNetBN", model_name="efficientnet-b0", pretrained=False, spatial_dims=2,
                in_channels=3, num_classes=1000), 224,
        "_conv_stem", "_fc",
        (("_conv_stem", "_bn0"), *((f"_blocks.{i}",) for i in range(7)), ("_conv_head", "_bn1")),
    ),
}


class WeightsError(MedrayError, ValueError):
    pass


class Classifier(nn.Module):
    """Normalisation inside the model, so training, evaluation and scoring cannot disagree on it.

    Takes images scaled to [0, 1], ``(B, C, H, W)``; returns one logit per label.
    """

    def __init__(self, backbone: nn.Module, spec: Backbone, in_channels: int):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        mean, std = spec.mean, spec.std
        if in_channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def stage_modules(model: Classifier) -> list[list[nn.Module]]:
    return [[model.backbone.get_submodule(path) for path in stage] for stage in model.spec.stages]


def head_module(model: Classifier) -> nn.Module:
    return model.backbone.get_submodule(model.spec.head)


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, module)


def _spread(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # Summing the input filters keeps a stem's response to a gray image, repeated over channels, unchanged.
    return weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def load_state_dict(uri: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(uri)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise WeightsError(f"{uri}: sha256 does not match model.weights_sha256")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — whatever torch makes of a file that is not a state dict
        raise WeightsError(f"{uri} cannot be loaded as PyTorch weights ({type(err).__name__}): a truncated download or another format?") from None
    return state.get("model", state) if isinstance(state, dict) else state


def _is_medray(state: dict) -> bool:
    return "mean" in state and "std" in state and any(k.startswith("backbone.") for k in state)


def _load(net: nn.Module, state: dict, uri: str, skip: str | None = None) -> None:
    """Load ``state`` into ``net``, refusing any layer of another shape, missing or unexpected.

    Parameters and buffers under ``skip`` are neither loaded nor required.
    """
    if skip is not None:
        state = {k: v for k, v in state.items() if not k.startswith(skip + ".")}
    own = {k: v for k, v in net.state_dict().items() if skip is None or not k.startswith(skip + ".")}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        details = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5]]
        raise WeightsError(
            f"{uri} does not fit this backbone: {len(mismatched)} layers of another shape "
            f"({'; '.join(details)}), {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    net.load_state_dict(state, strict=False)


def build_model(
    backbone: str, num_labels: int, in_channels: int = 1, weights: str | None = None, sha256: str | None = None
) -> Classifier:
    """A classifier for ``num_labels`` labels, from random weights or from the file ``weights``.

    That file is either a state dict of the whole ImageNet network (3-channel stem, 1000-class
    head) or a medray checkpoint's ``model.pt``; from a checkpoint every layer but the head loads,
    since the head belongs to the task it was trained for.
    """
    spec = BACKBONES[backbone]
    net = spec.build()
    state = load_state_dict(weights, sha256) if weights else None
    if state is not None and not _is_medray(state):
        _load(net, state, weights)
        state = None

    stem = net.get_submodule(spec.stem)
    if in_channels != stem.in_channels:
        conv = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                         stem.dilation, stem.groups, bias=stem.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(_spread(stem.weight, in_channels))
            if stem.bias is not None:
                conv.bias.copy_(stem.bias)
        _replace(net, spec.stem, conv)
    head = net.get_submodule(spec.head)
    _replace(net, spec.head, nn.Linear(head.in_features, num_labels))

    if state is not None:
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        stem_key = spec.stem + ".weight"
        if stem_key in state and state[stem_key].shape[1] != in_channels:
            state[stem_key] = _spread(state[stem_key], in_channels)
        _load(net, state, weights, skip=spec.head)
    return Classifier(net, spec, in_channels)


def to_input(images: torch.Tensor, device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 ``(B, H, W)`` or ``(B, H, W, C)`` → float ``(B, C, H, W)`` in [0, 1] on ``device``, through
    ``transform`` (augmentation) when given; channels-last on GPU, where convolutions run faster in that layout."""
    x = images.to(device, non_blocking=True)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255)
    if transform is not None:
        x = transform(x)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
