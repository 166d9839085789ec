"""The run in a table and in words: every verdict, the counts, what was compared, and the Markdown block for the PR."""

from __future__ import annotations

from typing import Any, Iterable

from sagecheck import results as R
from sagecheck.thresholds import short


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
    if not git.get("dirty"):
        return _short_sha(git.get("sha"))
    tree = f" (source {git['tree']})" if git.get("tree") else ""
    return _short_sha(git.get("sha")) + f" + uncommitted changes{tree}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def verdict_lines(run: Any) -> list[str]:
    """The three lines a reviewer reads first: the reading, the checks (with what fails), the speed."""
    c = run.counts
    reading, checks, speed = run.reading["overall"], run.reading["failures"], run.reading["speed"]
    notebooks = (f"notebooks: {c['notebooks_ok']} ok, {c['notebooks_failed']} failed, {c['notebooks_skipped']} skipped")
    failed = c["failed"] or c["notebooks_failed"]
    # words, not emoji: the HTML report must read the same without an emoji font (nothing failed, but nothing shows it
    # accurate: a caution)
    status = "FAIL:" if failed else "PASS:" if run.accurate else "CAUTION:"
    counted = f"**{c['passed']} of {c['verdicts']} checks pass, {c['failed']} fail**; {notebooks}."
    return [f"**{status} {reading.removeprefix('Reading: ')}**", counted + (f" {checks}" if failed else ""),
            f"**Speed:** {_without_heading(speed)}"]


def _without_heading(speed: str) -> str:
    """The speed sentence after a "**Speed:**" heading: "Speed of A against B: ..." reads "A against B: ...", not
    "Speed: Speed of ..."."""
    return speed.removeprefix("Speed: ").removeprefix("Speed of ")


def _model_line(model: dict[str, Any], p: dict[str, Any]) -> str:
    """The model that ran: its name, where it came from and its checksum (the parameter where nothing was recorded)."""
    text = f"**{model.get('name') or p.get('model')}**"
    if model.get("source"):
        text += f" ({model['source']}" + (f", sha256 `{model['sha256'][:16]}…`" if model.get("sha256") else "") + ")"
    return text


def summary_markdown(run: Any) -> str:
    """A GitHub Markdown block to paste into the pull request (``run``: a :class:`~sagecheck.report.loaded.LoadedRun`):
    three lines of verdict, then what ran, the full reading and every check folded in ``<details>``."""
    p = run.params
    results = run.measured
    env = run.environment if run.result("00") else {}
    c = run.counts
    lines = [f"### {run.title}", ""]
    lines += [line + "<br>" for line in verdict_lines(run)[:-1]] + [verdict_lines(run)[-1], ""]
    lines += [f"<details><summary>What ran, the full reading and all {c['verdicts']} checks</summary>", ""]
    if p:
        lines.append(
            f"Model {_model_line(run.model, p)} on engine `{p.get('engine')}`: {run.facts['description']}; dtype `{p.get('dtype')}`{_resolved(env, 'dtype', p)}, "
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
    for r in results:
        if r.status != "ok":
            lines.append(f"- `{r.notebook}` {r.status}: {_md_cell((r.reason or '')[:300])}")
    lines += ["", "**What this run says:** " + " ".join(run.recommendation)]
    lines += ["", "| Notebook | Check | Value | Threshold | Result |", "|---|---|---|---|---|"]
    for r in results:
        for v in r.verdicts:
            unit = f" {v.unit}" if v.unit else ""
            mark = "pass" if v.passed else "**FAIL**"
            origin = short(v.source)
            lines.append(
                f"| {r.notebook} | {_md_cell(v.name)} | {R.format_number(v.value)}{unit} | "
                f"{_md_cell(v.comparison)} {R.format_number(v.threshold)}{unit}{f' ({origin})' if origin else ''} | {mark} |"
            )
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def problems(run: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The notebooks that failed or were skipped (with why), and those of the notebooks folder not part of the run."""
    bad = [{"notebook": r.notebook, "status": r.status, "reason": r.reason} for r in run.measured if r.status != "ok"]
    ran = set(run.results)
    not_run = [s for s in run.manifest.get("available", []) if s not in ran and s != R.SUMMARY_NOTEBOOK]
    return bad, not_run


def record(results: Any, run: Any) -> None:
    """The summary notebook's own results: the counts and which notebooks did not run as they should."""
    bad, not_run = problems(run)
    for key, value in run.counts.items():
        results.metric(key, value)
    results.metric("failed_notebooks", [p["notebook"] for p in bad if p["status"] == "failed"])
    results.metric("skipped_notebooks", [p["notebook"] for p in bad if p["status"] == "skipped"])
    results.metric("not_run", not_run)
