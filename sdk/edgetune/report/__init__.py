"""Run reports: an offline HTML page with PNG plots made from an aggregator's state dir
(``edgetune report STATE_DIR --out DIR``). matplotlib is imported only when drawing."""

from .data import ReportError, RunData, load_run
from .page import write_report

__all__ = ["ReportError", "RunData", "load_run", "write_report"]
