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


SALT = "s3cr3t-salt-of-the-data-steward"


@pytest.mark.parametrize(
    "raw, overrides",
    [
        ({"ingest": {"salt": [SALT]}}, []),  # a salt of the wrong type
        ({"ingest": {"salt": {"value": SALT}}}, []),
        ({"ingest": {"slat": SALT}}, []),  # a misspelt key: its value is a secret all the same
        ({"ingest": f"salt {SALT}"}, []),  # a section written as a string
        ({}, [f"ingest.salt:{SALT}"]),  # a malformed --set
        ({}, [SALT]),
        ({}, [f"ingest.salt=[{SALT}"]),  # a --set value that is not YAML
        ({}, [f"ingest.slat={SALT}"]),
        ({"s3": {"access_key": SALT, "session_token": SALT}}, []),
    ],
)
def test_a_config_error_never_shows_a_secret(raw, overrides):
    with pytest.raises(ConfigError) as err:
        build_config(raw, overrides, source="job.yaml")
    assert SALT not in str(err.value) and "s3cr3t" not in str(err.value)


def test_a_misspelt_key_is_named_with_the_field_it_resembles():
    with pytest.raises(ConfigError) as err:
        build_config({"ingest": {"slat": SALT}}, source="job.yaml")
    assert str(err.value) == "invalid config job.yaml: ingest.slat: unknown field (did you mean ingest.salt?)"


def test_a_yaml_syntax_error_names_the_line_but_does_not_quote_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"ingest:\n  salt: {SALT}: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path} is not valid YAML: mapping values are not allowed here (line 2, column {len(SALT) + 9})"


@pytest.mark.timeout(120)  # a hang guard: expanding the bomb would run for hours; refusing it takes milliseconds
def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    # A "billion laughs": 9 levels of 9 aliases, 1 KB on disk, 9**9 values when expanded.
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(["ingest:", *(f"  {line}" for line in levels)]) + "\n")
    assert path.stat().st_size < 1500
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path} is refused: its aliases expand to more than 100,000 values (an alias bomb?)"
    with pytest.raises(ConfigError, match="--set ingest.labels: the value is not valid YAML .*alias bomb"):
        build_config(overrides=["ingest.labels=" + "{" + ", ".join(levels) + "}"])


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("ingest: &loop {labels: [*loop]}\n")
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_config(str(path))


def test_a_config_error_stays_short_however_large_the_bad_values():
    huge = {"train": {"epochs": "9" * 100_000, "lr": list(range(100_000))}, "tracking": {f"key{i}": i for i in range(1000)}}
    with pytest.raises(ConfigError) as err:
        build_config(huge, source="job.yaml")
    message = str(err.value)
    assert len(message) <= 2000 and "\n" not in message
    assert "train.epochs" in message and "train.lr: Input should be a valid number (got a list)" in message
    assert message.endswith("and 992 more")
