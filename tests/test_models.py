import hashlib

import pytest
import torch
from torchvision import models as tvm

from medray.training.models import BACKBONES, WeightsError, build_model, head_module, stage_modules


@pytest.mark.parametrize(
    "name",
    ["resnet18", "densenet121", "efficientnet_b0", "convnext_tiny", "monai.densenet121", "monai.efficientnet-b0"],
)
def test_backbones_take_gray_images_and_give_one_logit_per_label(name):
    model = build_model(name, num_labels=4, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)


def test_every_registered_backbone_knows_its_input_size_and_normalisation():
    for spec in BACKBONES.values():
        assert spec.input_size > 0 and len(spec.mean) == len(spec.std) == 3


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stages_and_head_hold_every_parameter_exactly_once_stem_first(name):
    spec = BACKBONES[name]
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        net = spec.build()
    owned = [
        f"{path}.{p}" if p else path
        for path in [*(path for stage in spec.stages for path in stage), spec.head]
        for p, _ in net.get_submodule(path).named_parameters()
    ]
    assert sorted(owned) == sorted(n for n, _ in net.named_parameters())
    assert net.get_submodule(spec.stem) in list(net.get_submodule(spec.stages[0][0]).modules())
    assert isinstance(net.get_submodule(spec.stem), torch.nn.Conv2d)
    assert isinstance(net.get_submodule(spec.head), torch.nn.Linear)


def test_stage_and_head_modules_of_a_built_classifier():
    model = build_model("resnet18", 3)
    assert [[type(m).__name__ for m in stage] for stage in stage_modules(model)] == [
        ["Conv2d", "BatchNorm2d"], ["Sequential"], ["Sequential"], ["Sequential"], ["Sequential"]
    ]
    assert head_module(model) is model.backbone.fc and head_module(model).out_features == 3


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


def _save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "epoch": 3}, path)  # as a training epoch leaves model.pt
    return str(path)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "monai.efficientnet-b0"])
def test_a_medray_checkpoint_loads_its_backbone_under_a_fresh_head_for_other_labels(tmp_path, name):
    trained = build_model(name, num_labels=14)
    path = _save_checkpoint(trained, tmp_path / "model.pt")

    model = build_model(name, num_labels=3, weights=path)
    head = BACKBONES[name].head
    expected = {k: v for k, v in trained.backbone.state_dict().items() if not k.startswith(head + ".")}
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert head_module(model).out_features == 3


def test_the_head_of_a_checkpoint_is_new_even_when_the_labels_fit(tmp_path):
    trained = build_model("resnet18", num_labels=3)
    model = build_model("resnet18", num_labels=3, weights=_save_checkpoint(trained, tmp_path / "model.pt"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, trained.backbone.layer4[1].conv2.weight)
    assert not torch.equal(model.backbone.fc.weight, trained.backbone.fc.weight)


def test_a_gray_checkpoint_spreads_its_stem_over_three_channels(tmp_path):
    trained = build_model("resnet18", num_labels=3, in_channels=1)
    model = build_model("resnet18", num_labels=2, in_channels=3, weights=_save_checkpoint(trained, tmp_path / "m.pt"))
    assert model.backbone.conv1.weight.shape[1] == 3
    assert torch.allclose(model.backbone.conv1.weight.sum(dim=1, keepdim=True), trained.backbone.conv1.weight)


def test_a_checkpoint_of_another_backbone_is_refused_naming_layers(tmp_path):
    path = _save_checkpoint(build_model("resnet50", num_labels=3), tmp_path / "model.pt")
    message = r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"
    with pytest.raises(WeightsError, match=message):
        build_model("resnet18", 3, weights=path)


def test_weights_with_layers_the_backbone_lacks_are_refused(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(tvm.resnet34(weights=None).state_dict(), path)  # resnet18's layers are a subset of these
    with pytest.raises(WeightsError, match=r"unexpected \(e\.g\. \['layer1\.2\."):
        build_model("resnet18", 3, weights=str(path))
