"""The first lines of every notebook: validated parameters, seeds, and its results object."""

from __future__ import annotations

from typing import Any

from sagecheck import params as sp
from sagecheck import results, runtime


def start(notebook: str, namespace: dict[str, Any]) -> tuple[sp.Params, results.Results]:
    """``P, R = sagecheck.session.start("02_logits", globals())`` after the parameters cell."""
    P = sp.from_notebook(notebook, namespace)
    runtime.seed_everything(P.seed)
    R = results.start(notebook, P, namespace.get("run_dir", ""))
    return P, R
