"""Small display helpers so notebooks stay thin: tables, key/value lists, verdicts."""

from __future__ import annotations

import html
from typing import Any, Iterable, Mapping

from sagecheck import results as R


def _html(text: str) -> Any:
    from IPython.display import HTML

    return HTML(text)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(R.format_number(value))
    return html.escape("" if value is None else str(value))


def table(records: Any, caption: str = "", columns: Iterable[str] | None = None, max_rows: int = 200) -> Any:
    """A compact HTML table from a DataFrame or a list of dicts."""
    return _html(table_html(records, caption, columns, max_rows))


def table_html(records: Any, caption: str = "", columns: Iterable[str] | None = None, max_rows: int = 200) -> str:
    if hasattr(records, "to_dict"):
        records = records.to_dict(orient="records")
    records = list(records)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in records[:max_rows]:
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = " class='num'" if num else ""
            cells.append(f"<td{cls}>{_cell(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<caption style='caption-side:bottom'>{len(records) - max_rows} more rows in the results JSON</caption>" if len(records) > max_rows else ""
    cap = f"<caption><b>{html.escape(caption)}</b></caption>" if caption else ""
    return f"<table class='sc-table'>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>{more}</table>"


def folded(label: str, inner_html: str) -> Any:
    """Detail a reader opens on demand (a long table): a collapsed ``<details>`` block."""
    return _html(folded_html(label, inner_html))


def folded_html(label: str, inner_html: str) -> str:
    return f"<details class='sc-folded'><summary>{html.escape(label)}</summary>{inner_html}</details>"


def kv(mapping: Mapping[str, Any], caption: str = "") -> Any:
    return table([{"": k, "value": v} for k, v in mapping.items()], caption=caption)


def verdicts(res: R.Results) -> Any:
    """This notebook's verdicts, as the summary will show them."""
    from sagecheck.report import verdict_table_html

    return _html(verdict_table_html([res], table_id=f"verdicts-{res.notebook}"))


def say(text: str) -> Any:
    from IPython.display import Markdown

    return Markdown(text)
