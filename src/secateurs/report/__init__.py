"""Reports: a run's ``report.json`` for machines, ``report.md`` and one self-contained
``report.html`` (plots embedded) for people; the benchmark's ``report.html`` and its JSON.
Both pages are built from the same pieces (:mod:`secateurs.report.html`)."""

from secateurs.report.bench_html import write_bench_report
from secateurs.report.run_html import rebuild_report, write_report
from secateurs.report.writer import RunReport

__all__ = ["RunReport", "rebuild_report", "write_bench_report", "write_report"]
