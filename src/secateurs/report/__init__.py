"""Run reports: JSON plus Markdown with plots."""

from secateurs.report.writer import RunReport, write_report

__all__ = ["RunReport", "write_report"]
