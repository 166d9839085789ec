"""papermill's own command line, run on a sagecheck notebook with a bad parameter, says so in one line.

A notebook stops in its first cell on a parameter it does not have or of the wrong type
(:class:`sagecheck.session.NotebookParameterError`, one line in the notebook). papermill's CLI then raises
``PapermillExecutionError`` out of click, and Python prints some thirty lines of papermill's own traceback above that
line. papermill loads the entry points of ``papermill.engine`` when it starts, so sagecheck declares one
(:class:`SagecheckEngine`, papermill's own nbclient engine under another name) and, loaded in the ``papermill``
command's process only, installs an excepthook that prints the parameter's one line and exits 2, as
``python -m sagecheck`` does for bad input. Every other error keeps papermill's output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from papermill.engines import NBClientEngine

PARAMETER_ERROR = "NotebookParameterError"


class SagecheckEngine(NBClientEngine):
    """papermill's nbclient engine, unchanged (``--engine sagecheck`` runs as the default does)."""


def _excepthook(previous):  # noqa: ANN001, ANN202 - sys.excepthook's signature
    def hook(exc_type, exc, tb):  # noqa: ANN001
        if exc_type.__name__ == "PapermillExecutionError" and getattr(exc, "ename", "") == PARAMETER_ERROR:
            sys.stderr.write(f"sagecheck: {getattr(exc, 'evalue', exc)}\n")
            sys.stderr.flush()
            os._exit(2)
        previous(exc_type, exc, tb)

    return hook


if Path(sys.argv[0] if sys.argv else "").name == "papermill":
    sys.excepthook = _excepthook(sys.excepthook)
