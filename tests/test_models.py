import hashlib

import pytest
import torch
from torchvision import models as tvm

from medray.models import BACKBONES, WeightsError, build_model


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_backbones_take_gray_images_and_give_one_logit_per_label(name):
    model = build_model(name, num_labels=4, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)


def test_every_registered_backbone_knows_its_input_size_and_normalisation():
    for spec in BACKBONES.values():
        assert spec.input_size > 0 and len(spec.mean) == len(spec.std) == 3


def test_pretrained_weights_load_from_a_file_and_gray_stem_sums_rgb_filters(tmp_path):
    source = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    model = build_model("resnet18", 3, weights=str(path), sha256=digest)
    assert torch.allclose(model.backbone.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_weights_with_the_wrong_checksum_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="sha256"):
        build_model("resnet18", 3, weights=str(path), sha256="0" * 64)


def test_weights_of_another_architecture_are_refused_naming_layers(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(tvm.resnet50(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        build_model("resnet18", 3, weights=str(path))
