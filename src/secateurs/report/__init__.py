"""Run reports: ``report.json`` for machines, ``report.md`` with PNG plots for people; and the
benchmark report, one self-contained ``report.html`` (plots embedded) with its ``report.json``."""

from secateurs.report.bench_html import write_bench_report
from secateurs.report.writer import RunReport, write_report

__all__ = ["RunReport", "write_bench_report", "write_report"]
