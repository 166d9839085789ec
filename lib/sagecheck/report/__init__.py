"""From run folders to what a reviewer reads: the HTML report and the PR summary of one run, and ``compare`` of several.

Everything here reads the results contract (``run.json``, ``results/*.json``) through
:class:`~sagecheck.report.loaded.LoadedRun`, never a notebook.
"""

from sagecheck.report.html import build_report
from sagecheck.report.loaded import LoadedRun, load_run

__all__ = ["build_report", "LoadedRun", "load_run"]
