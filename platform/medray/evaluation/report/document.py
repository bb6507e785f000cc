"""Markdown and HTML renderings of one report; the HTML embeds its plots so it travels alone.

A report is a list of ``Section``s, each a list of blocks: a paragraph (``str``), a ``Heading``,
bullets (``list[str]``), a table (``pandas.DataFrame``) or a ``Figure`` (PNG bytes). The same blocks render
to Markdown (figures as files beside it) and to one self-contained HTML file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field

import pandas as pd

from medray.io import storage


class Heading(str):
    """A sub-heading inside a section."""


@dataclass
class Figure:
    name: str  # file name, e.g. "roc.png"
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    anchor: str  # the HTML id, stable so readers (and tests) can link to it
    blocks: list = field(default_factory=list)


def format_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    head = [frame.index.name or "", *frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(idx), *(format_value(v) for v in row)]) + " |" for idx, row in frame.astype(object).iterrows()]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    body = "".join(
        "<tr>" + f"<th>{html.escape(str(idx))}</th>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
        for idx, row in frame.astype(object).iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown(block) -> str:
    if isinstance(block, Heading):
        return f"### {block}"
    if isinstance(block, pd.DataFrame):
        return markdown_table(block)
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.name})\n\n*{block.caption}*"
    if isinstance(block, list):
        return "\n".join(f"- {line}" for line in block)
    return str(block)


def _html(block) -> str:
    if isinstance(block, Heading):
        return f"<h3>{html.escape(block)}</h3>"
    if isinstance(block, pd.DataFrame):
        return _html_table(block)
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode()
        caption = html.escape(block.caption)
        return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
    if isinstance(block, list):
        return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in block) + "</ul>"
    return f"<p>{html.escape(str(block))}</p>"


STYLE = """body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}nav a{margin-right:1em}"""


def write_report(out_dir: str, title: str, sections: list[Section], metrics: dict, data_file: str = "metrics.json") -> dict[str, str]:
    """Write ``metrics`` (as ``data_file``), each figure, ``report.md`` and ``report.html`` under ``out_dir``."""
    paths = {name: storage.join(out_dir, name) for name in (data_file, "report.md", "report.html")}
    storage.write_text(paths[data_file], json.dumps(_clean(metrics), indent=2, default=_json_default))
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                paths[block.name] = storage.join(out_dir, block.name)
                storage.write_bytes(paths[block.name], block.png)

    markdown = [f"# {title}"]
    for section in sections:
        markdown += [f"## {section.title}", *(_markdown(b) for b in section.blocks)]
    storage.write_text(paths["report.md"], "\n\n".join(markdown) + "\n")

    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(_html(b) for b in s.blocks)}</section>'
        for s in sections
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>{body}</body></html>"
    )
    storage.write_text(paths["report.html"], page)
    return paths


def _clean(value):
    """NaN → null, so that the file is strict JSON that any reader accepts."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
