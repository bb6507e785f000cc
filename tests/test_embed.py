"""`medray embed`: frozen encoders from local weights only, one store row per input, resumable like scoring."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models import resnet18

from medray.config import build_config
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.embeddings.backbones import EncoderError, load_encoder
from medray.embeddings.embed import EmbedError, embed
from medray.embeddings.store import read_store
from medray.io import images
from medray.io.parts import COMMITTED, SUMMARY
from medray.wsi import demo_slides
from medray.wsi.extract import extract_patches
from medray.wsi.manifest import read_slide_manifest
from test_wsi_extract import SPEC

SIZE = 32
EXTRA = "the embed extra (pip install 'medray[embed]')"


def job(tmp_path, output, **embed_section):
    return build_config({"name": "embed", "storage": str(tmp_path / "runs"),
                         "embed": {"output": str(output), "image_size": SIZE, "batch_size": 4, **embed_section}})  # fmt: skip


def weights_file(path, seed: int) -> str:
    """A torchvision resnet18 state dict, as a user downloads one: ImageNet stem and head, random weights."""
    torch.manual_seed(seed)
    torch.save(resnet18().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def small_manifest(split_manifest_path, tmp_path_factory):
    """Nine demo radiographs and one corrupt PNG, with the demo's patients, labels and split."""
    demo = read_manifest(split_manifest_path)
    frame = demo.frame.head(9).copy()
    folder = tmp_path_factory.mktemp("small")
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    frame = pd.concat([frame, frame.head(1).assign(image=str(corrupt))], ignore_index=True)
    return write_manifest(Manifest(frame, demo.labels, demo.task), str(folder / "manifest.parquet")), frame, demo.labels


@pytest.fixture(scope="module")
def resnet_store(small_manifest, ray_session, tmp_path_factory):
    uri, _, _ = small_manifest
    folder = tmp_path_factory.mktemp("resnet")
    weights = weights_file(folder / "resnet18.pth", seed=0)
    config = job(folder, folder / "store", input=uri, weights=weights, part_size=4)
    return config, embed(config)


def test_a_registry_backbone_gives_one_row_per_image_with_its_feature_width_and_the_corrupt_one_its_error(resnet_store, small_manifest):
    config, summary = resnet_store
    _, frame, labels = small_manifest
    store = read_store(config.embeddings)

    assert (summary.inputs, summary.embedded, summary.errors, summary.parts) == (10, 9, 1, 3)
    assert store.vectors.shape == (9, 512) and np.isfinite(store.vectors).all() and store.vectors.std() > 0
    assert store.frame["image"].tolist() == frame["image"].head(9).tolist()  # the manifest's order
    carried = ["patient_id", "split", *labels]
    pd.testing.assert_frame_equal(store.frame[carried], frame[carried].head(9), check_dtype=False)
    assert store.errors["image"].tolist() == [frame["image"].iloc[-1]] and "corrupt.png" in store.errors["error"].iloc[0]
    assert (store.labels, store.info.backbone, store.info.dim, store.info.image_size, store.info.kind) == (
        labels,
        "resnet18",
        512,
        SIZE,
        "images",
    )
    assert store.info.weights_sha256 == load_encoder("resnet18", config.embed.weights).sha256


def test_the_stored_vector_is_the_backbone_without_its_head_on_the_decoded_image(resnet_store, small_manifest):
    config, _ = resnet_store
    _, frame, _ = small_manifest
    net = resnet18()
    net.load_state_dict(torch.load(config.embed.weights, weights_only=True))
    net.fc = torch.nn.Identity()
    pixels = np.array(images.load(frame["image"].iloc[0], SIZE, 3))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = net.eval()((x - mean) / std)[0].numpy()

    np.testing.assert_allclose(read_store(config.embeddings).vectors[0], expected, rtol=2e-3, atol=2e-3)


def test_a_rerun_skips_committed_parts_redoes_an_uncommitted_one_and_refuses_another_model(resnet_store, tmp_path):
    config, _ = resnet_store
    store = config.embeddings
    lost = os.path.join(store, COMMITTED, "part-00002.json")
    os.remove(lost)  # as if the job had been killed between writing part 2 and committing it
    before = {n: os.stat(os.path.join(store, COMMITTED, n)).st_mtime_ns for n in os.listdir(os.path.join(store, COMMITTED))}

    summary = embed(config)

    after = {n: os.stat(os.path.join(store, COMMITTED, n)).st_mtime_ns for n in os.listdir(os.path.join(store, COMMITTED))}
    assert (summary.parts_skipped, summary.inputs, summary.errors) == (2, 10, 1)
    assert {n: after[n] for n in before} == before and "part-00002.json" in after
    assert len(read_store(store).frame) == 9 and json.loads(open(os.path.join(store, SUMMARY)).read())["inputs"] == 10
    other = config.model_copy(update={"embed": config.embed.model_copy(update={"weights": weights_file(tmp_path / "other.pth", seed=1)})})
    with pytest.raises(EmbedError, match="holds embeddings of another model.*use a new output") as caught:
        embed(other)
    assert "\n" not in str(caught.value)


def test_a_timm_model_loads_from_a_local_safetensors_file_and_embeds_as_its_own_pooled_features(small_manifest, ray_session, tmp_path):
    timm = pytest.importorskip("timm", reason=EXTRA)
    safetensors = pytest.importorskip("safetensors.torch", reason=EXTRA)
    uri, frame, _ = small_manifest
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()  # with its 1000-class head, as published weights come
    safetensors.save_file(model.state_dict(), str(tmp_path / "resnet10t.safetensors"))

    summary = embed(
        job(tmp_path, tmp_path / "store", input=uri, backbone="timm:resnet10t", weights=str(tmp_path / "resnet10t.safetensors"))
    )

    store = read_store(summary.output)
    pixels = np.array(images.load(frame["image"].iloc[0], SIZE, 3))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    cfg = timm.data.resolve_data_config({}, model=model)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
    assert (store.info.backbone, store.info.dim, summary.errors) == ("timm:resnet10t", model.num_features, 1)
    np.testing.assert_allclose(store.vectors[0], expected, rtol=2e-3, atol=2e-3)


def tiny_vit(folder, pooler: bool = True) -> str:
    """A one-layer ViT with random weights and its image processor, saved as a Hugging Face model folder."""
    transformers = pytest.importorskip("transformers", reason=EXTRA)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=SIZE, patch_size=8
    )
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=pooler).save_pretrained(str(folder))
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        str(folder)
    )
    return str(folder)


def test_a_hugging_face_model_loads_from_a_local_folder_offline_and_embeds_with_its_pooled_output(small_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason=EXTRA)
    folder = tiny_vit(tmp_path / "vit")

    encoder = load_encoder(f"hf:{folder}")  # what each actor of `medray embed` loads

    x = torch.from_numpy(np.array(images.load(small_manifest[1]["image"].iloc[0], SIZE, 3))).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        expected = transformers.ViTModel.from_pretrained(folder).eval()(pixel_values=(x - 0.5) / 0.25).pooler_output
        assert torch.allclose(encoder(x), expected, atol=1e-5)
    assert (encoder.backbone, encoder.dim, encoder.image_size, encoder.in_channels) == (f"hf:{folder}", 32, SIZE, 3)


def test_a_vit_saved_without_its_pooler_embeds_with_its_cls_token_not_a_random_pooler(tmp_path):
    transformers = pytest.importorskip("transformers", reason=EXTRA)
    folder = tiny_vit(tmp_path / "vit", pooler=False)
    encoder = load_encoder(f"hf:{folder}")
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        cls = (
            transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False)
            .eval()(pixel_values=(x - 0.5) / 0.25)
            .last_hidden_state[:, 0]
        )
        assert torch.allclose(encoder(x), cls, atol=1e-5)


def test_a_repo_id_loads_from_a_filled_hugging_face_cache_without_the_network(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason=EXTRA)
    snapshot = tmp_path / "hub" / "models--medray--tiny-vit" / "snapshots" / ("0" * 40)
    tiny_vit(snapshot)
    (tmp_path / "hub" / "models--medray--tiny-vit" / "refs").mkdir()
    (tmp_path / "hub" / "models--medray--tiny-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    encoder = load_encoder("hf:medray/tiny-vit")

    assert (encoder.backbone, encoder.dim, encoder.image_size) == ("hf:medray/tiny-vit", 32, SIZE)
    assert encoder.sha256 == load_encoder(f"hf:{snapshot}").sha256  # the same files, the same identity


@pytest.mark.parametrize(
    "backbone, weights, message",
    [
        ("resnet18", "/nowhere/resnet18.pth", r"embed\.weights: /nowhere/resnet18\.pth does not exist: put the resnet18 weights .* there"),
        ("resnet18", None, r"embed\.weights: a frozen resnet18 needs weights"),
        ("timm:resnet10t", "/nowhere/uni.safetensors", r"/nowhere/uni\.safetensors does not exist: put the timm:resnet10t weights"),
        (
            "hf:nobody/not-cached",
            None,
            r"hf:nobody/not-cached is not in the Hugging Face cache at .*: on a machine with internet run `hf download nobody/not-cached`",
        ),
        ("hf:/nowhere/folder", None, r"hf:/nowhere/folder: no such folder"),
    ],
)
def test_missing_weights_are_one_line_naming_what_to_put_where(backbone, weights, message, monkeypatch):
    if backbone.startswith(("timm:", "hf:")):
        pytest.importorskip("timm" if backbone.startswith("timm:") else "transformers", reason=EXTRA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match=message) as caught:
        load_encoder(backbone, weights)
    assert "\n" not in str(caught.value)


def test_weights_of_another_backbone_are_refused_in_one_line(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(EncoderError, match=r"resnet18\.pth does not fit this backbone") as caught:
        load_encoder("densenet121", str(tmp_path / "resnet18.pth"))
    assert "\n" not in str(caught.value)


def test_a_patch_store_embeds_every_finished_patch_with_its_slide_and_place(ray_session, tmp_path):
    demo_slides.generate(str(tmp_path / "slides"), slides=2, width=512, height=384, seed=1, masks=1.0)
    manifest = read_slide_manifest(str(tmp_path / "slides" / "slides.csv"))
    spec = dataclasses.replace(SPEC, grid=dataclasses.replace(SPEC.grid, max_patches=6), chunk_patches=4)
    extract_patches(
        Manifest(manifest.frame.assign(split=["train", "test"]), manifest.labels), str(tmp_path / "patches"), spec, progress=False
    )
    patches = pd.read_parquet(tmp_path / "patches" / "patches").drop(columns=["patch", "tissue"])
    weights = weights_file(tmp_path / "resnet18.pth", seed=0)

    summary = embed(build_config({"name": "wsi", "storage": str(tmp_path / "runs"), "wsi": {"patches": str(tmp_path / "patches")},
                                  "embed": {"weights": weights, "image_size": SIZE, "part_size": 5}}))  # fmt: skip

    store = read_store(summary.output)
    keys = ["slide_id", "x", "y", "level", "size"]
    assert summary.output == str(tmp_path / "runs" / "wsi" / "embeddings") and (summary.kind, summary.errors) == ("patches", 0)
    assert len(store.frame) == len(patches) == summary.inputs > 4
    merged = store.frame.merge(patches, on=keys, suffixes=("", "_extracted"), validate="one_to_one")
    assert len(merged) == len(patches)
    for column in ("image", "patient_id", "split", "tumour_fraction", *manifest.labels):
        assert merged[column].equals(merged[f"{column}_extracted"].astype(merged[column].dtype)), column
    assert set(store.frame["split"]) == {"train", "test"} and store.info.kind == "patches" and store.vectors.shape[1] == 512
