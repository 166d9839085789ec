"""One loaded run -> one self-contained HTML report (``report.html``), plus ``summary.md`` for the PR.

The report opens with the run's overview (what ran, what failed, the verdict counts, what the run says), a
table of contents and the summary notebook; then every executed notebook in order. Code is hidden except in
cells tagged ``show-code``; a failed notebook is shown with its error, never hidden. The results are read
once (:class:`~sagecheck.report.loaded.LoadedRun`), the recommendation computed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat

from sagecheck import results as R
from sagecheck.report.loaded import LoadedRun, load_run
from sagecheck.templating import TEMPLATES, render

SHOW_CODE_TAG = "show-code"
TEMPLATE = TEMPLATES / "report.html.j2"


# --------------------------------------------------------------------------- the HTML report


def _order(stems: list[str]) -> list[str]:
    """The summary first, then the notebooks in their numeric order."""
    stems = sorted(set(stems))
    return [s for s in stems if s == R.SUMMARY_NOTEBOOK] + [s for s in stems if s != R.SUMMARY_NOTEBOOK]


def _hide_code(cell: Any) -> None:
    if cell.cell_type != "code":
        return
    tags = cell.get("metadata", {}).get("tags", [])
    if SHOW_CODE_TAG not in tags:
        cell.metadata.setdefault("transient", {})["remove_source"] = True


def _is_parameter_cell(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return "parameters" in tags or "injected-parameters" in tags


def notebook_status(stem: str, res: R.Results | None, entry: dict[str, Any]) -> tuple[str, str | None]:
    """(status, reason) of one notebook as the run recorded it: a failure in run.json or results wins."""
    status = entry.get("status") or (res.status if res else "missing")
    if res and res.status in ("skipped", "failed") and status != "failed":
        status = res.status
    return status, (res.reason if res else None) or entry.get("error")


def header_context(run: LoadedRun, stems: list[str], executed: dict[str, Path]) -> dict[str, Any]:
    """Everything the report's opening shows (templates/header.html.j2)."""
    p = run.params
    entries = {e["name"]: e for e in run.manifest.get("notebooks", [])}
    rows = []
    for stem in stems:
        if stem == R.SUMMARY_NOTEBOOK:
            continue
        res = run.results.get(stem)
        status, _ = notebook_status(stem, res, entries.get(stem, {}))
        rows.append({"stem": stem, "status": status, "passed": sum(v.passed for v in res.verdicts) if res else 0,
                     "checks": len(res.verdicts) if res else 0, "duration_s": entries.get(stem, {}).get("duration_s")})
    summary_status = None
    if R.SUMMARY_NOTEBOOK in stems:
        status, _ = notebook_status(R.SUMMARY_NOTEBOOK, run.results.get(R.SUMMARY_NOTEBOOK), entries.get(R.SUMMARY_NOTEBOOK, {}))
        summary_status = None if status in ("ok", "reused") else status
    tp = int(run.facts.get("tp") or 1)
    return {"title": run.title, "model": run.model, "run": run.manifest.get("run", run.path.name),
            "started": run.manifest.get("started_at", "?"), "params": p, "compared": run.facts["description"], "gpu": run.gpu,
            "sageattention": run.sageattention,
            "tp": tp, "counts": run.counts, "sentences": run.recommendation, "rows": rows, "summary": R.SUMMARY_NOTEBOOK,
            "summary_status": summary_status, "stems": stems,
            "not_run": [s for s in run.manifest.get("available", []) if s not in stems]}


def _banner(stem: str, res: R.Results | None, entry: dict[str, Any]) -> str:
    status, reason = notebook_status(stem, res, entry)
    return render("banner.html.j2", stem=stem, status=status, reason=reason, verdicts=res.verdicts if res else [])


def combined_notebook(run: LoadedRun) -> nbformat.NotebookNode:
    executed = {p.stem: p for p in sorted((run.path / "notebooks").glob("*.ipynb"))}
    stems = _order(list(executed) + list(run.results))
    entries = {e["name"]: e for e in run.manifest.get("notebooks", [])}
    ctx = header_context(run, stems, executed)
    cells = [nbformat.v4.new_markdown_cell(render("header.html.j2", **ctx)),
             nbformat.v4.new_markdown_cell(render("contents.html.j2", stems=stems))]
    for stem in stems:
        cells.append(nbformat.v4.new_markdown_cell(_banner(stem, run.results.get(stem), entries.get(stem, {}))))
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
    combined.metadata["title"] = ctx["title"]
    combined.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    combined.metadata["language_info"] = {"name": "python"}
    return combined


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and ``summary.md`` into the run folder; return the HTML's path."""
    from nbconvert import HTMLExporter

    from sagecheck.redact import redact_text
    from sagecheck.report.summary import summary_markdown

    run_dir = Path(run_dir)
    if not (run_dir / "results").is_dir() and not (run_dir / "notebooks").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no results/ or notebooks/)")
    run = load_run(run_dir, require_results=False)
    exporter = HTMLExporter(template_file=str(TEMPLATE), exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    body, _ = exporter.from_notebook_node(combined_notebook(run))
    body, _ = redact_text(body)
    out = run_dir / "report.html"
    out.write_text(body)
    md, _ = redact_text(summary_markdown(run))
    (run_dir / "summary.md").write_text(md)
    return out
