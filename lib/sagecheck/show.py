"""What a notebook shows besides figures: tables, key/value lists, verdicts, sentences.

Tables are rendered from the report's templates with escaping on (``report/templates/show.html.j2``), so a
value from a run (an error message, a model name) shows as text. Numbers are formatted as the results
contract formats them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from sagecheck import results as R


def html(text: str) -> Any:
    from IPython.display import HTML

    return HTML(text)


def _cell(value: Any) -> tuple[str, bool]:
    """(text, is a number) of one table cell."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, float):
        return R.format_number(value), True
    return ("" if value is None else str(value)), number


def table(records: Any, caption: str = "", columns: Iterable[str] | None = None, max_rows: int = 200) -> Any:
    """A compact HTML table from a DataFrame or a list of dicts."""
    return html(table_html(records, caption, columns, max_rows))


def table_html(records: Any, caption: str = "", columns: Iterable[str] | None = None, max_rows: int = 200) -> str:
    from sagecheck.templating import render

    if hasattr(records, "to_dict"):
        records = records.to_dict(orient="records")
    records = list(records)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in records for k in r))
    rows = [[_cell(r.get(c)) for c in cols] for r in records[:max_rows]]
    return render("show.html.j2", caption=caption, columns=[_header(c) for c in cols], rows=rows,
                  more=max(0, len(records) - max_rows))


def _header(name: Any) -> Any:
    """A column name that may wrap after its underscores (``prefill_speedup_p10``): a wide table of such names then
    fits its column instead of running past the page; the text itself is unchanged."""
    from markupsafe import Markup, escape

    return Markup(str(escape(str(name))).replace("_", "_<wbr>"))


def folded(label: str, inner_html: str) -> Any:
    """Detail a reader opens on demand (a long table): a collapsed ``<details>`` block around HTML made here."""
    return html(folded_html(label, inner_html))


def folded_html(label: str, inner_html: str) -> str:
    from markupsafe import Markup

    from sagecheck.templating import render

    return render("folded.html.j2", label=label, inner=Markup(inner_html))


def kv(mapping: Mapping[str, Any], caption: str = "") -> Any:
    return table([{"": k, "value": v} for k, v in mapping.items()], caption=caption)


def verdict_rows(results: Iterable[R.Results]) -> list[dict[str, Any]]:
    """One row per verdict; a notebook that failed or was skipped without verdicts gets one row saying so."""
    rows = []
    for r in results:
        if not r.verdicts and r.status == "failed":
            rows.append({"notebook": r.notebook, "verdict": None, "status": "ok", "text": f"notebook failed: {(r.reason or '')[:300]}"})
        elif not r.verdicts and r.status == "skipped":
            rows.append({"notebook": r.notebook, "verdict": None, "status": "skipped", "text": f"skipped: {r.reason}"})
        rows += [{"notebook": r.notebook, "verdict": v} for v in r.verdicts]
    return rows


def verdict_table_html(results: Iterable[R.Results], table_id: str = "sagecheck-summary") -> str:
    """Every verdict of the run as one HTML table (the summary notebook shows it; each notebook its own)."""
    from sagecheck.templating import render

    return render("verdicts.html.j2", rows=verdict_rows(results), table_id=table_id)


def verdicts(res: R.Results) -> Any:
    """This notebook's verdicts, as the summary shows them."""
    return html(verdict_table_html([res], table_id=f"verdicts-{res.notebook}"))


def say(text: str) -> Any:
    from IPython.display import Markdown

    return Markdown(text)


def pre(text: str) -> Any:
    """Text shown as it is (a Markdown block to copy), escaped."""
    from sagecheck.templating import render

    return html(render("pre.html.j2", text=text))
