import os

import pytest

from medray.config import ConfigError, build_config, load_config

DEMO = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo.yaml")


def test_demo_config_loads_and_overrides_apply():
    config = load_config(DEMO, ["train.epochs=3", "model.backbone=densenet121"])
    assert config.train.epochs == 3
    assert config.model.backbone == "densenet121"
    assert os.path.isabs(config.storage)


def test_a_bad_value_names_the_field_and_the_value():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"epochs": 0}}, source="job.yaml")
    assert "job.yaml" in str(err.value)
    assert "train.epochs" in str(err.value) and "0" in str(err.value)


def test_an_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        build_config({"train": {"epoch": 3}})


def test_an_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet1000'.*resnet18"):
        build_config(overrides=["model.backbone=resnet1000"])


def test_val_and_test_must_leave_room_for_train():
    with pytest.raises(ConfigError, match="val \\+ test"):
        build_config({"split": {"val": 0.5, "test": 0.5}})


def test_a_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(overrides=["train.epochs"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_an_unknown_augmentation_parameter_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown parameter 'hflip'.*'cxr'.*degrees"):
        build_config({"data": {"augment": "cxr", "augment_params": {"hflip": 0.5}}})


def test_strategies_are_chosen_by_name_and_checked():
    config = build_config(overrides=["loss.weighting=effective_number", "sampling.strategy=oversample", "model.freeze=gradual"])
    assert (config.loss.weighting, config.sampling.strategy, config.model.freeze) == ("effective_number", "oversample", "gradual")
    with pytest.raises(ConfigError, match="loss.weighting"):
        build_config(overrides=["loss.weighting=inverse"])


def test_the_defaults_that_validation_trusts_without_importing_torch_are_valid():
    from medray.augment import policy
    from medray.config import DataConfig, ModelConfig
    from medray.models import BACKBONES

    policy(DataConfig().augment, DataConfig().augment_params)
    assert ModelConfig().backbone in BACKBONES


def test_a_config_error_is_one_line_naming_each_bad_field():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"epochs": 0, "lr": -1}}, source="job.yaml")
    assert "\n" not in str(err.value) and "train.epochs" in str(err.value) and "train.lr" in str(err.value)


def test_a_malformed_salt_is_not_echoed():
    with pytest.raises(ConfigError, match="ingest.salt") as err:
        build_config({"ingest": {"salt": 271828182845}})
    assert "271828182845" not in str(err.value)
