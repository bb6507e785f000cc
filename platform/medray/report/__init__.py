"""The evaluation report: metrics JSON, Markdown and one self-contained HTML file with plots."""

from medray.report.document import write_report

__all__ = ["write_report"]
