"""How a config that does not validate reads: one bounded line naming each bad field and what is wrong.

Values are shown only when short and safe: never a mapping, never under a secret-looking key (a salt, a
token), never an unknown key's value (a misspelt ``ingest.salt`` is still a salt) — and an unknown key gets
the closest known name of its section as a suggestion.
"""

from __future__ import annotations

import difflib
import re

from pydantic import BaseModel, ValidationError

from medray import safe_yaml

MAX_MESSAGE = 2000  # characters of a config error
SHOWN = 40  # characters of a bad value, or of a key, shown in a config error
SECRET = re.compile(r"salt|secret|token|passw|key|credential", re.IGNORECASE)


def _known(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The field names at the level of ``loc``'s last part: what a misspelt key was probably meant to be."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _shown(value) -> str | None:
    """A bad value as an error shows it: a short scalar, a container by its type, a mapping not at all."""
    if isinstance(value, dict):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return safe_yaml.cut(repr(value), SHOWN)
    return f"a {type(value).__name__}"


def _problem(err: dict, root: type[BaseModel]) -> str:
    loc = tuple(safe_yaml.cut(str(p), SHOWN) for p in err["loc"])
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _known(loc, root), n=1)
        return f"{where}: unknown field" + (f" (did you mean {'.'.join((*loc[:-1], close[0]))}?)" if close else "")
    secret = any(SECRET.search(p) for p in loc)
    shown = None if secret or err["type"] in ("missing", "model_type") else _shown(err["input"])
    return f"{where}: {safe_yaml.cut(err['msg'], 200)}" + (f" (got {shown})" if shown else "")


def describe(error: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One bounded line: each bad field, what is wrong with it and, when it is safe and short, the value given."""
    problems = [_problem(err, root) for err in error.errors()[:10]]
    if error.error_count() > 10:
        problems.append(f"and {error.error_count() - 10} more")
    return safe_yaml.cut(f"invalid config {source}: " + "; ".join(problems), MAX_MESSAGE)
