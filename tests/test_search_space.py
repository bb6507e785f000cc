import pytest

from medray.config import JobConfig
from medray.sweeps.space import SearchSpaceError, load_space, nest

BASE = JobConfig().model_dump(mode="json", exclude={"tune"})


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["imbalance", "freezing", "full"])
def test_shipped_spaces_are_valid(name):
    spec = load_space(f"tune_spaces/{name}.yaml", BASE)
    assert spec.space and spec.metric


def test_an_unknown_key_is_named(tmp_path):
    with pytest.raises(SearchSpaceError, match="'loss.wieghting'.*not a training config field"):
        load_space(write(tmp_path, "space:\n  loss.wieghting: {choice: [seed]}\n"), BASE)


def test_an_empty_choice_is_refused(tmp_path):
    with pytest.raises(SearchSpaceError, match="'loss.weighting': choice has no values"):
        load_space(write(tmp_path, "space:\n  loss.weighting: {choice: []}\n"), BASE)


def test_reversed_bounds_are_refused(tmp_path):
    with pytest.raises(SearchSpaceError, match="'train.lr': lower bound 0.01 is not below upper bound 0.0001"):
        load_space(write(tmp_path, "space:\n  train.lr: {loguniform: [0.01, 0.0001]}\n"), BASE)


def test_a_value_the_config_refuses_is_named(tmp_path):
    with pytest.raises(SearchSpaceError, match="'sampling.strategy': value 'smote' is refused"):
        load_space(write(tmp_path, "space:\n  sampling.strategy: {choice: [none, smote]}\n"), BASE)


def test_a_whole_section_cannot_be_searched(tmp_path):
    with pytest.raises(SearchSpaceError, match="whole section"):
        load_space(write(tmp_path, "space:\n  loss: {choice: [1]}\n"), BASE)


def test_dotted_keys_nest_into_config_sections():
    assert nest({"loss.weighting": "seed", "train.lr": 0.1}) == {"loss": {"weighting": "seed"}, "train": {"lr": 0.1}}
