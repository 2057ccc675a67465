"""The run report: ``write_report(RUN)`` → ``RUN/report/index.html`` (``page``), its pictures (``figures``)."""

from mars_ray.report.page import write_report

__all__ = ["write_report"]
