"""The report's and the notebooks' HTML pieces come from Jinja templates (``report/templates/``) rendered with escaping
on: every value from a run (a model name, an error message, a parameter) reaches the page as text, never as markup.
Its own module, below both the report and the notebooks' tables (:mod:`sagecheck.show`), so that neither imports the
other to render."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "report" / "templates"


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    from sagecheck.results import format_number

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["number"] = format_number
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)
