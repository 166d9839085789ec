"""The run's inputs, checked before any work starts: the model, the texts, the task files, the SGLang interpreter.

:func:`load` is what the runner and the CLI call: the schema (:func:`sagecheck.params.load_params`),
then every local path the parameters name must exist. Local paths are made absolute (notebooks run
in ``notebooks/``, not where the run was started), relative to the params file, else to where the
run started. A name that is no local path is a hub id, loaded where it is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sagecheck.params import ParamError, Params, load_params

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_NAMED_TEXTS = ("builtin", "wikitext", "ptb")  # anything else must be a local file or folder
TEXT_FIELDS = (("logits", "text"), ("perplexity", "dataset"), ("activation_drift", "text"), ("context_length", "text"),
               ("code_paths", "text"))
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def looks_like_path(value: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is a local path."""
    if value.startswith((".", "/", "~")) or Path(value).exists():
        return True
    return not _HUB_ID.fullmatch(value)


def existing(key: str, value: str, base: Path) -> Path:
    """The existing local path ``value`` (as given, else relative to ``base``), or ParamError."""
    candidate = Path(os.path.expanduser(value))
    if not candidate.is_absolute() and not candidate.exists():
        candidate = base / candidate
    if not candidate.exists():
        raise ParamError(f"parameter '{key}' = {value!r}: local path does not exist")
    return candidate


def resolve(params: Params, base: Path) -> Params:
    """Check every local input ``params`` names and make it absolute (in place); returns ``params``."""
    model = params.model
    if model.startswith("random:"):
        from sagecheck.models import random_config_path

        try:
            random_config_path(model.split(":", 1)[1])
        except FileNotFoundError as e:
            raise ParamError(f"parameter 'model' = {model!r}: {e}") from None
    elif model != "builtin" and looks_like_path(model):
        params.model = str(existing("model", model, base).resolve())
    for section, field in TEXT_FIELDS:
        value = getattr(getattr(params, section), field)
        if value not in _NAMED_TEXTS:
            setattr(getattr(params, section), field, str(existing(f"{section}.{field}", value, base).resolve()))
    for i, task in enumerate(params.tasks.tasks):
        if Path(task.source).suffix in TASK_FILE_SUFFIXES:
            task.source = str(existing(f"tasks.tasks[{i}].source", task.source, base).resolve())
    if params.sglang.python:
        existing("sglang.python", params.sglang.python, base)
    return params


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """A params file with ``key=value`` overrides: validated, and every local input found (paths made absolute)."""
    params = load_params(path, overrides)
    return resolve(params, Path(path).parent if path is not None else Path.cwd())
