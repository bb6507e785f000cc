"""Markdown and HTML renderings of one evaluation; the HTML embeds its plots so it travels alone."""

from __future__ import annotations

import base64
import html
import json

import pandas as pd

from medray import storage

COLUMNS = {
    "n": "images", "positives": "positives", "prevalence": "prevalence", "auroc": "AUROC",
    "threshold": "threshold (val)", "sensitivity": "sensitivity", "specificity": "specificity",
    "ppv": "PPV (test prevalence)", "npv": "NPV",
}  # fmt: skip


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.3f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    head = [frame.index.name or "", *frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(idx), *(_fmt(v) for v in row)]) + " |" for idx, row in frame.astype(object).iterrows()]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    body = "".join(
        "<tr>" + f"<th>{html.escape(str(idx))}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for idx, row in frame.astype(object).iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out_dir: str, title: str, table: pd.DataFrame, splits: pd.DataFrame, notes: list[str], roc_png: bytes) -> dict[str, str]:
    """Write ``metrics.json``, ``roc.png``, ``report.md`` and ``report.html`` under ``out_dir``."""
    shown = table[list(COLUMNS)].rename(columns=COLUMNS)
    paths = {name: storage.join(out_dir, name) for name in ("metrics.json", "roc.png", "report.md", "report.html")}
    metrics = {"labels": json.loads(table.to_json(orient="index")), "mean_auroc": float(table["auroc"].mean())}
    storage.write_text(paths["metrics.json"], json.dumps(metrics, indent=2))
    storage.write_bytes(paths["roc.png"], roc_png)

    intro = [
        "Thresholds were chosen on the validation split (Youden's J) and applied unchanged to the test split.",
        "PPV and NPV depend on prevalence: val and test may be enriched with positives of the split label, "
        "and the prevalence column gives each label's share in the test split; at a deployment's lower "
        "prevalence PPV is lower.",
        *notes,
    ]
    markdown = "\n\n".join(
        [
            f"# {title}",
            "## Data",
            markdown_table(splits),
            "## Test metrics per label",
            markdown_table(shown),
            f"Mean AUROC over labels: **{metrics['mean_auroc']:.3f}**",
            "\n".join(f"- {line}" for line in intro),
            "## ROC curves",
            "![ROC curves](roc.png)",
        ]
    )
    storage.write_text(paths["report.md"], markdown + "\n")

    image = base64.b64encode(roc_png).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1><h2>Data</h2>{_html_table(splits)}
<h2>Test metrics per label</h2>{_html_table(shown)}<p>Mean AUROC over labels: <b>{metrics['mean_auroc']:.3f}</b></p>
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in intro)}</ul>
<h2>ROC curves</h2><img alt="ROC curves" src="data:image/png;base64,{image}" style="max-width:100%"></body></html>"""
    storage.write_text(paths["report.html"], page)
    return paths
