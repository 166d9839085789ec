"""From run folders to what a reviewer reads: the HTML report and the PR summary of one run, and ``compare`` of several.

Everything here reads the results contract (``run.json``, ``results/*.json``) through
:class:`~sagecheck.report.loaded.LoadedRun`, never a notebook.

Its names are imported when first used: a notebook that renders a table (``sagecheck.show`` uses this package's
templates) must not import nbformat for the report builder, whose jsonschema compiles some forty grammars at import
where ``rfc3987-syntax`` is installed (as JupyterLab's dependencies install it): a second or two in every kernel.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"build_report": "sagecheck.report.html", "LoadedRun": "sagecheck.report.loaded",
         "load_run": "sagecheck.report.loaded"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sagecheck.report' has no attribute {name!r}")
