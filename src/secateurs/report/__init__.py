"""Run reports: ``report.json`` for machines, ``report.md`` with PNG plots for people."""

from secateurs.report.writer import RunReport, write_report

__all__ = ["RunReport", "write_report"]
