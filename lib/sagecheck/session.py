"""The first lines of every notebook: validated parameters, seeds, and its results object."""

from __future__ import annotations

from typing import Any

from sagecheck import params as sp
from sagecheck import results, runtime


def start(notebook: str, namespace: dict[str, Any]) -> tuple[sp.NotebookParams, results.Results]:
    """``P, R = sagecheck.session.start("02_logits", globals())`` after the parameters cell.

    ``P`` reads the notebook's own section and the common keys alike (``P.n_short``, ``P.model``).
    """
    params = sp.from_notebook(notebook, namespace)
    runtime.seed_everything(params.seed)
    R = results.start(notebook, params, namespace.get("run_dir", ""))
    return sp.NotebookParams(params, notebook, namespace.get("sglang_servers")), R
