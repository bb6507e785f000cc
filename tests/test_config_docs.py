"""docs/config.md is the config models, rendered: it cannot fall behind them."""

from pathlib import Path

from medray.config import JobConfig
from medray.config_docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_committed_config_reference_is_up_to_date():
    assert DOCS.read_text() == render(), "docs/config.md is stale: run `python -m medray.config_docs > docs/config.md`"


def test_every_setting_of_every_section_is_documented():
    text = render()
    for section, field in JobConfig.model_fields.items():
        for key in getattr(field.annotation, "model_fields", {}):
            assert f"| `{section}.{key}" in text, f"{section}.{key}"
