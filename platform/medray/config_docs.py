"""``docs/config.md``, written from the pydantic models of ``medray.config`` so that it cannot drift.

    python -m medray.config_docs > docs/config.md

A test compares the committed file with this output.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Literal

import annotated_types
from pydantic import AfterValidator, BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from medray.config import JobConfig

HEADER = """# Configuration reference

Generated from the pydantic models in `platform/medray/config.py` by `python -m medray.config_docs`;
do not edit by hand. Every job takes one YAML file (`--config`) with these sections; any key can be
overridden on the command line with `--set section.key=value`. Unknown keys are errors.
"""


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:  # Uri: a str made absolute when local
        return "path or s3:// URI"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "secret string"
    return getattr(annotation, "__name__", str(annotation))


BOUNDS = {
    annotated_types.Ge: ("≥", "ge"),
    annotated_types.Gt: (">", "gt"),
    annotated_types.Le: ("≤", "le"),
    annotated_types.Lt: ("<", "lt"),
}


def _field_type(field: FieldInfo) -> str:
    """The type as a user writes it in YAML, with its bounds (``int ≥ 1``)."""
    if any(isinstance(m, AfterValidator) for m in field.metadata):  # Uri: a str made absolute when local
        return "path or s3:// URI"
    bounds = [f"{BOUNDS[type(m)][0]} {getattr(m, BOUNDS[type(m)][1])}" for m in field.metadata if type(m) in BOUNDS]
    return " ".join([_type(field.annotation), ", ".join(bounds)]).strip()


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, str) and len(value) > 40:
        return "see description"
    return f"`{value if isinstance(value, str) else json.dumps(value)}`".replace("|", "\\|")


def _row(key: str, field: FieldInfo) -> str:
    description = (field.description or "").replace("|", "\\|").replace("<", "\\<")  # <storage> is no HTML tag
    return f"| `{key}` | {_field_type(field)} | {_default(field)} | {description} |"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One table row per setting; nested sections (``ingest.columns``) are flattened with their prefix."""
    rows = []
    for name, field in model.model_fields.items():
        if inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel):
            rows += _rows(field.annotation, f"{prefix}{name}.")
            continue
        rows.append(_row(prefix + name, field))
    return rows


def _doc(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    return "" if doc == inspect.getdoc(BaseModel) else doc


def render() -> str:
    parts = [HEADER, "## Top level\n", "| key | type | default | meaning |", "|---|---|---|---|"]
    sections = []
    for name, field in JobConfig.model_fields.items():
        if inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel):
            sections.append((name, field.annotation))
        else:
            parts.append(_row(name, field))
    for name, model in sections:
        parts += ["", f"## `{name}`\n"]
        if _doc(model):
            parts += [_doc(model), ""]
        parts += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(model, f"{name}.")]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
