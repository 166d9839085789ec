"""Executed notebooks -> one self-contained HTML report, plus ``summary.md`` for the PR.

The report opens with the run's overview (what ran, what failed, the verdict
counts), a table of contents and the summary notebook; then every executed
notebook in order. Code is hidden except in cells tagged ``show-code``; a failed
notebook is shown with its error, never hidden.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Iterable

import nbformat

from sagecheck import recommendation
from sagecheck import results as R

SHOW_CODE_TAG = "show-code"
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"


# --------------------------------------------------------------------------- tables


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _result_label(passed: bool | None, status: str = "ok") -> str:
    if status == "skipped":
        return '<span class="sc-skip">SKIPPED</span>'
    if passed is None:
        return '<span class="sc-fail">FAILED</span>'
    return '<span class="sc-pass">PASS</span>' if passed else '<span class="sc-fail">FAIL</span>'


def verdict_table_html(results: Iterable[R.Results], table_id: str = "sagecheck-summary") -> str:
    """Every verdict of the run as one HTML table (the summary notebook shows it)."""
    rows = []
    for r in results:
        if r.status == "failed" and not r.verdicts:
            rows.append(
                f"<tr><td>{_esc(r.notebook)}</td><td colspan='3'>notebook failed: {_esc((r.reason or '')[:300])}</td>"
                f"<td>{_result_label(None)}</td></tr>"
            )
        if r.status == "skipped" and not r.verdicts:
            rows.append(
                f"<tr><td>{_esc(r.notebook)}</td><td colspan='3'>skipped: {_esc(r.reason)}</td>"
                f"<td>{_result_label(None, 'skipped')}</td></tr>"
            )
        for v in r.verdicts:
            detail = f"<br><small>{_esc(v.detail)}</small>" if v.detail else ""
            unit = f" {_esc(v.unit)}" if v.unit else ""
            rows.append(
                "<tr>"
                f"<td>{_esc(r.notebook)}</td>"
                f"<td>{_esc(v.name)}{detail}</td>"
                f"<td class='num'>{_esc(R.format_number(v.value))}{unit}</td>"
                f"<td class='num'>{_esc(v.comparison)} {_esc(R.format_number(v.threshold))}{unit}</td>"
                f"<td>{_result_label(v.passed)}</td>"
                "</tr>"
            )
    if not rows:
        rows.append("<tr><td colspan='5'>no verdicts were recorded in this run</td></tr>")
    head = "<tr><th>notebook</th><th>check</th><th>value</th><th>threshold</th><th>result</th></tr>"
    return f"<table class='sc-table' id='{table_id}'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def counts(results: Iterable[R.Results]) -> dict[str, int]:
    res = list(results)
    verdicts = [v for r in res for v in r.verdicts]
    return {
        "verdicts": len(verdicts),
        "passed": sum(v.passed for v in verdicts),
        "failed": sum(not v.passed for v in verdicts),
        "notebooks_ok": sum(r.status == "ok" for r in res),
        "notebooks_failed": sum(r.status == "failed" for r in res),
        "notebooks_skipped": sum(r.status == "skipped" for r in res),
    }


def _resolved(env: dict[str, Any], key: str, params: dict[str, Any]) -> str:
    """`` (cpu)`` when the parameter said auto and the environment notebook recorded what it became."""
    value = env.get(key)
    return f" ({value})" if value and params.get(key) == "auto" else ""


def _short_sha(sha: Any) -> str:
    """A commit cut to 12 characters; "unknown (why)" kept whole."""
    sha = str(sha or "?")
    return sha if sha.startswith("unknown") else sha[:12]


def commit_label(git: dict[str, Any]) -> str:
    """The recorded commit, and that the code that ran differed from it where the checkout was dirty."""
    return _short_sha(git.get("sha")) + (" + uncommitted changes" if git.get("dirty") else "")


def compared(p: dict[str, Any]) -> str:
    """What was compared, in the engine's own names: SGLang's --attention-backend names, or the in-process implementations."""
    if p.get("engine") == "sglang":
        decode = (p.get("sglang") or {}).get("sage_attn_decode", "?")
        extra = f"; sage_attn decode on {decode}" if p.get("sglang_attention_backend") == "sage_attn" else ""
        return (f"SGLang --attention-backend `{p.get('sglang_baseline_backend', '?')}` (baseline) vs "
                f"`{p.get('sglang_attention_backend', '?')}` (candidate{extra})")
    phases = ", ".join(p.get("candidate_phases", [])) or "?"
    return f"baseline `{p.get('baseline', '?')}` vs candidate `{p.get('candidate', '?')}` (phases: {phases})"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(results: list[R.Results], manifest: dict[str, Any] | None = None) -> str:
    """A GitHub Markdown block to paste into the pull request."""
    manifest = manifest or {}
    p = manifest.get("params", {})
    env = next((r.metrics for r in results if r.notebook.startswith("00_")), {})
    c = counts(results)
    lines = [f"### {p.get('title', 'sagecheck report')}", ""]
    if p:
        lines.append(
            f"Model `{p.get('model')}` on engine `{p.get('engine')}`: {compared(p)}; dtype `{p.get('dtype')}`{_resolved(env, 'dtype', p)}, "
            f"device `{p.get('device')}`{_resolved(env, 'device', p)}."
        )
    if env:
        versions = env.get("versions", {})
        lines.append(
            f"GPU: {env.get('gpu', 'n/a')} · torch {versions.get('torch', '?')} · transformers {versions.get('transformers', '?')}"
            f" · sageattention {versions.get('sageattention', '?')} · sglang {versions.get('sglang', '?')}"
            f" · sagecheck {versions.get('sagecheck', '?')} · git `{commit_label(env.get('git', {}))}`"
        )
    lines.append("")
    lines.append(
        f"**{c['passed']} passed, {c['failed']} failed** ({c['verdicts']} checks); notebooks: "
        f"{c['notebooks_ok']} ok, {c['notebooks_failed']} failed, {c['notebooks_skipped']} skipped."
    )
    bad = [r for r in results if r.status != "ok"]
    for r in bad:
        lines.append(f"- `{r.notebook}` {r.status}: {_md_cell((r.reason or '')[:300])}")
    lines += ["", "**What this run says:** " + " ".join(recommendation.sentences(results, p))]
    lines += ["", "| Notebook | Check | Value | Threshold | Result |", "|---|---|---|---|---|"]
    for r in results:
        for v in r.verdicts:
            unit = f" {v.unit}" if v.unit else ""
            mark = "✅ pass" if v.passed else "❌ FAIL"
            lines.append(
                f"| {r.notebook} | {_md_cell(v.name)} | {R.format_number(v.value)}{unit} | "
                f"{_md_cell(v.comparison)} {R.format_number(v.threshold)}{unit} | {mark} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the HTML report


def _load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _order(stems: Iterable[str]) -> list[str]:
    """The summary first, then the notebooks in their numeric order."""
    stems = sorted(set(stems))
    return [s for s in stems if s.startswith("99_")] + [s for s in stems if not s.startswith("99_")]


def _hide_code(cell: Any) -> None:
    if cell.cell_type != "code":
        return
    tags = cell.get("metadata", {}).get("tags", [])
    if SHOW_CODE_TAG not in tags:
        cell.metadata.setdefault("transient", {})["remove_source"] = True


def _is_parameter_cell(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return "parameters" in tags or "injected-parameters" in tags


def _status_banner(stem: str, res: R.Results | None, run_entry: dict[str, Any] | None) -> str:
    status = res.status if res else (run_entry or {}).get("status", "missing")
    if run_entry and run_entry.get("status") == "failed":
        status = "failed"
    reason = (res.reason if res else None) or (run_entry or {}).get("error")
    if status == "failed":
        return (
            f"<div class='sc-banner'><b>{_esc(stem)} FAILED.</b> {_esc(reason)}<br>"
            "The cell that raised is shown below with its traceback.</div>"
        )
    if status == "skipped":
        return f"<div class='sc-banner sc-skipped'><b>{_esc(stem)} skipped:</b> {_esc(reason)}</div>"
    if res and res.verdicts:
        n_fail = sum(not v.passed for v in res.verdicts)
        cls = "" if n_fail else " sc-ok"
        return (
            f"<div class='sc-banner{cls}'><b>{_esc(stem)}:</b> {len(res.verdicts) - n_fail} of {len(res.verdicts)} "
            "checks passed.</div>"
        )
    return ""


def combined_notebook(run_dir: Path) -> nbformat.NotebookNode:
    run_dir = Path(run_dir)
    manifest = _load_manifest(run_dir)
    results = {r.notebook: r for r in R.load_all(run_dir / "results")}
    executed = {p.stem: p for p in sorted((run_dir / "notebooks").glob("*.ipynb"))}
    entries = {e["name"]: e for e in manifest.get("notebooks", [])}
    stems = _order(list(executed) + list(results))
    p = manifest.get("params", {})
    title = p.get("title", "sagecheck report")

    # one count and one order everywhere: the measuring notebooks in numeric order; 99_summary is the
    # report's summary (shown first as a section), not a notebook of the count, as in its own table
    measured = [s for s in stems if not s.startswith("99_")]
    c = counts(results[s] for s in measured if s in results)
    rows = []
    for stem in measured:
        res = results.get(stem)
        entry = entries.get(stem, {})
        status = entry.get("status") or (res.status if res else "missing")
        if res and res.status == "skipped":
            status = "skipped"
        label = {"ok": "sc-pass", "reused": "sc-pass", "failed": "sc-fail"}.get(status, "sc-skip")
        nv = len(res.verdicts) if res else 0
        npass = sum(v.passed for v in res.verdicts) if res else 0
        dur = entry.get("duration_s")
        rows.append(
            f"<tr><td><a href='#nb-{_esc(stem)}'>{_esc(stem)}</a></td><td class='{label}'>{_esc(status)}</td>"
            f"<td class='num'>{npass}/{nv}</td><td class='num'>{'' if dur is None else f'{dur:.1f} s'}</td></tr>"
        )
    gpu = next((r.environment["gpu"] for r in results.values() if r.environment.get("gpu")), "not recorded")
    tp = (p.get("sglang") or {}).get("tp", 1) if p.get("engine") == "sglang" else 1
    tp = f" · tensor parallel {tp}" if tp > 1 else ""
    header = [
        f"# {title}",
        "",
        f"Run `{manifest.get('run', run_dir.name)}` · started {manifest.get('started_at', '?')} · "
        f"model `{p.get('model', '?')}` · engine `{p.get('engine', '?')}` · {compared(p)} · dtype `{p.get('dtype', '?')}` · "
        f"device `{p.get('device', '?')}` · GPU `{gpu}`{tp}",
        "",
        f"<p id='sagecheck-counts'><b>{c['passed']} checks passed, {c['failed']} failed</b>; notebooks: "
        f"{c['notebooks_ok']} ok, {c['notebooks_failed']} failed, {c['notebooks_skipped']} skipped.</p>",
        "",
        "<div id='sagecheck-recommendation' class='sc-recommendation'><b>What this run says</b><ul>"
        + "".join(f"<li>{_esc(s)}</li>" for s in recommendation.sentences([results[s] for s in measured if s in results], p))
        + "</ul></div>",
        "",
        "<table class='sc-table' id='sagecheck-notebooks'><thead><tr><th>notebook</th><th>status</th>"
        f"<th>checks passed</th><th>time</th></tr></thead><tbody>{''.join(rows)}</tbody></table>",
    ]
    summary = [s for s in stems if s.startswith("99_")]
    for stem in summary:
        status = entries.get(stem, {}).get("status") or (results[stem].status if stem in results else "missing")
        if status not in ("ok", "reused"):
            header.append(f"\n**The summary notebook {stem} {status}**: the checks above are counted from the results files.")
    not_run = [s for s in manifest.get("available", []) if s not in stems]
    if not_run:
        header.append(f"\nNot part of this run: {', '.join(not_run)}.")
    cells = [nbformat.v4.new_markdown_cell("\n".join(header))]
    cells.append(
        nbformat.v4.new_markdown_cell(
            "<h2>Contents</h2><ul class='sc-toc'>"
            + "".join(f"<li><a href='#nb-{_esc(s)}'>{_esc(s)}</a></li>" for s in stems)
            + "</ul>"
        )
    )
    for stem in stems:
        res = results.get(stem)
        cells.append(
            nbformat.v4.new_markdown_cell(
                f"<div class='sc-section' id='nb-{_esc(stem)}'></div>\n\n"
                + _status_banner(stem, res, entries.get(stem))
            )
        )
        if stem not in executed:
            cells.append(nbformat.v4.new_markdown_cell(f"*No executed notebook for {stem} in this run folder.*"))
            continue
        nb = nbformat.read(executed[stem], as_version=4)
        for cell in nb.cells:
            if _is_parameter_cell(cell):
                continue
            _hide_code(cell)
            cell.metadata["alt"] = f"figure of {stem}"
            cell["id"] = f"{stem}-{len(cells)}"
            cells.append(cell)
    combined = nbformat.v4.new_notebook()
    combined.cells = cells
    combined.metadata["title"] = title
    combined.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    combined.metadata["language_info"] = {"name": "python"}
    return combined


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and ``summary.md`` into the run folder; return the HTML's path."""
    from nbconvert import HTMLExporter

    from sagecheck.redact import redact_text

    run_dir = Path(run_dir)
    if not (run_dir / "results").is_dir() and not (run_dir / "notebooks").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no results/ or notebooks/)")
    combined = combined_notebook(run_dir)
    exporter = HTMLExporter(
        template_file=str(TEMPLATE),
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    body, _ = exporter.from_notebook_node(combined)
    body, _ = redact_text(body)
    out = run_dir / "report.html"
    out.write_text(body)
    results = [r for r in R.load_all(run_dir / "results") if not r.notebook.startswith("99_")]  # as the summary counts them
    md, _ = redact_text(summary_markdown(results, _load_manifest(run_dir)))
    (run_dir / "summary.md").write_text(md)
    return out
