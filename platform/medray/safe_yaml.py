"""YAML as ``yaml.safe_load`` reads it, bounded: a document whose aliases expand past ``MAX_NODES`` values
(a "billion laughs" of a few hundred bytes), that refers to itself, or that nests too deeply is refused
before anything is built from it; and a YAML error described without quoting the offending line,
which may hold a secret.
"""

from __future__ import annotations

import yaml

MAX_NODES = 100_000  # a real config has a few hundred values; an alias bomb expands to billions


class TooLarge(yaml.YAMLError):
    pass


class BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load``, refusing a document whose aliases expand past ``MAX_NODES`` values. Aliases
    share one object, so the document itself is small, but validating or printing it walks every copy."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Values in ``node`` with every alias expanded; each distinct node is counted once, so this is quick."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise TooLarge("an alias refers to a node that contains it (a recursive structure)")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_)
        if total > MAX_NODES:
            raise TooLarge(f"its aliases expand to more than {MAX_NODES:,} values (an alias bomb?)")
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def load(text: str):
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader with a size limit
    except RecursionError:
        raise TooLarge("it is nested too deeply") from None


def problem(err: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's snippet of the offending line: that line may hold a secret."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return cut(err.problem, 120) + where
    return cut(str(err).splitlines()[0] if str(err) else type(err).__name__, 120)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
