"""Secrets (a hub token) come from the environment and must never reach an output file.

Notebooks never print the environment; this is the second line of defence: after
a run, every text file of the run folder is scanned for the values of the secret
variables, and any occurrence is replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
REPLACEMENT = "[redacted]"
TEXT_SUFFIXES = {".ipynb", ".json", ".html", ".md", ".log", ".txt", ".yaml", ".csv"}


def secret_values() -> dict[str, str]:
    """Secret variables that are set, with values long enough to be recognisable."""
    return {k: v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 8}


def redact_text(text: str) -> tuple[str, int]:
    hits = 0
    for value in secret_values().values():
        if value in text:
            hits += text.count(value)
            text = text.replace(value, REPLACEMENT)
    return text, hits


def redact_tree(folder: Path) -> int:
    """Redact every text file below ``folder``; returns how many files changed."""
    if not secret_values():
        return 0
    changed = 0
    for path in Path(folder).rglob("*"):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        new, hits = redact_text(text)
        if hits:
            path.write_text(new)
            changed += 1
    return changed
