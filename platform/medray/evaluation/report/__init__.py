"""The evaluation report: metrics JSON, Markdown and one self-contained HTML file with plots."""

from medray.evaluation.report.document import Figure, Heading, Section, write_report

__all__ = ["Figure", "Heading", "Section", "write_report"]
