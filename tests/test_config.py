import os
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from medray.config import ConfigError, IngestConfig, build_config, load_config

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


ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "jobs" / "configs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_config_loads_through_the_config_model(path):
    config = load_config(str(path))  # raises, naming the field, for any key or value the model refuses
    assert yaml.safe_load(path.read_text())["ingest"]["format"] == config.ingest.format  # stated, not the default
    assert config.evaluate.intended_use or path.stem in ("csv", "folder")  # templates leave it to the user


def test_there_is_an_example_config_for_every_adapter_and_grouping_rule():
    loaded = {p.stem: load_config(str(p)).ingest for p in EXAMPLES}
    assert {i.format for i in loaded.values()} == set(get_args(IngestConfig.model_fields["format"].annotation))
    assert (loaded["ham10000"].grouping, loaded["eyepacs"].grouping) == ("ham10000", "eyes")


def test_the_ham10000_example_ingests_the_published_layout(tmp_path):
    from medray.data.datasets import ingest
    from medray.data.manifest import read_manifest
    from test_datasets_table import HAM_CLASSES, write_ham10000

    write_ham10000(tmp_path)
    config = load_config(str(ROOT / "jobs" / "configs" / "examples" / "ham10000.yaml"), ["ingest.check=false"])
    result = ingest(str(tmp_path / "HAM10000_metadata.csv"), str(tmp_path / "m.parquet"), config.ingest)
    manifest = read_manifest(result.manifest)
    assert manifest.labels == HAM_CLASSES and result.balance == "8 in = 8 kept + 0 quarantined"


def test_every_config_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?:jobs/configs|tune_spaces)/[\w./-]+\.yaml", readme) + re.findall(r"--config (\S+\.yaml)", readme))
    placeholders = {"my_run.yaml", "ingest.yaml", ".../best.yaml"}  # the user's own files
    assert named and [n for n in sorted(named - placeholders) if not (ROOT / n).exists()] == []


def test_the_backbone_names_a_config_accepts_are_exactly_the_backbone_table():
    from medray.choices import BACKBONE_NAMES
    from medray.training.models import BACKBONES

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)


def test_a_config_error_is_one_line_naming_each_bad_field():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"epochs": 0, "lr": -1}}, source="job.yaml")
    assert "\n" not in str(err.value) and "train.epochs" in str(err.value) and "train.lr" in str(err.value)


def test_a_malformed_salt_is_not_echoed():
    with pytest.raises(ConfigError, match="ingest.salt") as err:
        build_config({"ingest": {"salt": 271828182845}})
    assert "271828182845" not in str(err.value)
