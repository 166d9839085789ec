"""The comparison's files: ``compare.html`` (self-contained), ``compare.md`` (for the PR) and ``compare.json``.

Everything shown is computed in :mod:`sagecheck.report.compare`; this module turns it into cells (plain values,
each with how to show it) that ``templates/compare.html.j2`` lays out with escaping on.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from sagecheck import results as R
from sagecheck.report import compare as C
from sagecheck.templating import render


def _num(x: Any, unit: str = "") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else str(x)
    return R.format_number(x) + (f" {unit}" if unit else "")


def cell(text: Any, small: str = "", passed: bool | None = None, cls: str = "", code: bool = False, br: bool = False) -> dict[str, Any]:
    """One table cell: its text, a smaller note after it (on a new line with ``br``), a PASS/FAIL label, a class."""
    return {"text": "" if text is None else str(text), "small": small, "passed": passed, "cls": cls, "code": code, "br": br,
            "label": False, "word": "", "count": ""}


def _figure(fig: Any, alt: str) -> dict[str, str]:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return {"alt": alt, "src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}


def _check_cell(c: dict[str, Any], show_threshold: bool) -> dict[str, Any]:
    if "missing" in c:
        return cell(c["missing"], cls="sc-skip")
    small = f"({c['comparison']} {_num(c['threshold'])})" if show_threshold else ""
    return {**cell(_num(c["value"], c.get("unit", "")), small=small), "passed": c["passed"], "label": True}


def left_out(cmp: C.Comparison) -> dict[str, Any]:
    return {"runs": cmp.left_out_runs, "key": list(cmp.key),
            "points": [[cell(p.get(k)) for k in cmp.key] + [cell(p["why"])] for p in cmp.left_out_points]}


def nothing_side_by_side(cmp: C.Comparison, what: str) -> str | None:
    """Why a section shows no side-by-side figures, or None where it does."""
    if not cmp.runs:
        return f"No run measured {what}."
    if len(cmp.runs) == 1:
        return f"Only {cmp.runs[0]} measured {what} alike: nothing to put side by side."
    if not cmp.points:
        return f"No point of {what} was measured in every run."
    return None


# --------------------------------------------------------------------------- sections


def kernel_view(cmp: C.Comparison) -> dict[str, Any]:
    from sagecheck import plots

    view: dict[str, Any] = {"nothing": nothing_side_by_side(cmp, "kernel timings (08)"), "left_out": left_out(cmp)}
    if view["nothing"]:
        return view
    view["points"] = len(cmp.points)
    view["clocks"] = ", ".join(sorted({str(p["runs"][r].get("clock")) for p in cmp.points for r in cmp.runs}))
    figures = [_figure(plots.kernel_by_run(cmp.points, cmp.runs, "tops", "TOPS", "Attention kernel throughput per GPU (dashed: sdpa)"),
                       "kernel TOPS per run")]
    ratio = [p for p in cmp.points if p["implementation"] != "sdpa" and all(p["runs"][r].get("over_sdpa") for r in cmp.runs)]
    if ratio:
        figures.append(_figure(plots.kernel_by_run(ratio, cmp.runs, "over_sdpa", "TOPS / sdpa's TOPS",
                                                   "Kernel over sdpa at the same shape, per GPU (1: as fast)", reference=1.0),
                               "kernel speedup over sdpa per run"))
    view["figures"] = figures
    view["head"] = ["implementation", "seq len", "head dim", "mask", "shape", *cmp.runs]
    view["rows"] = [[cell(p["implementation"]), cell(p["seq_len"]), cell(p["head_dim"]), cell("causal" if p["causal"] else "full"),
                     cell(f"b{p['batch']} h{p['heads']} {p['dtype']}")]
                    + [cell(_num(p["runs"][r]["tops"]), small=f"({_num(p['runs'][r]['over_sdpa'])}× sdpa)"
                            if p["implementation"] != "sdpa" else "") for r in cmp.runs] for p in cmp.points]
    return view


def _rate(x: Any) -> str:
    """Tokens per second: whole numbers with thousands separated."""
    return f"{x:,.0f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def throughput_view(cmp: C.Comparison, runs: list[C.Run]) -> dict[str, Any]:
    from sagecheck import plots

    view: dict[str, Any] = {"nothing": nothing_side_by_side(cmp, "serving throughput (04)"), "left_out": left_out(cmp)}
    if view["nothing"]:
        return view

    def aa_words(aa: dict[str, Any] | None) -> str:
        if aa is None:
            return "none (no A/A control in this run)"
        return f"{aa['pct']:.1f} %" + ("" if aa["passed"] else f" — failed, limit {aa['limit']:g} %")

    view["points"] = len(cmp.points)
    view["aa"] = "; ".join(f"{label}: {aa_words(aa)}" for label, aa in C.aa_control(runs, cmp.runs).items())
    phases = tuple(ph for ph in ("prefill", "decode") if any(p["runs"][r].get(f"{ph}_speedup") is not None
                                                               for p in cmp.points for r in cmp.runs))
    view["figures"] = ([_figure(plots.speedup_by_run(cmp.points, cmp.runs, phases, "Candidate over baseline, per run"),
                                "serving speedup per run")] if phases else [])
    view["head"] = ["batch", "input length", *[f"{r}: prefill / decode speedup" for r in cmp.runs]]

    def speedups(v: dict[str, Any]) -> str:
        return " / ".join(f"{_num(v.get(f'{ph}_speedup'))}× [{_num(v.get(f'{ph}_speedup_p10'))}, {_num(v.get(f'{ph}_speedup_p90'))}]"
                          for ph in ("prefill", "decode"))

    view["rows"] = [[cell(p["batch"]), cell(p["input_length"])] + [cell(speedups(p["runs"][r])) for r in cmp.runs] for p in cmp.points]
    view["rates_head"] = ["batch", "input length", *cmp.runs]
    view["rates"] = [[cell(p["batch"]), cell(p["input_length"])] + [cell(
        f"{_rate(p['runs'][r]['baseline_prefill_tok_s'])} → {_rate(p['runs'][r]['prefill_tok_s'])}; "
        f"{_rate(p['runs'][r]['baseline_decode_tok_s_total'])} → {_rate(p['runs'][r]['decode_tok_s_total'])}") for r in cmp.runs]
        for p in cmp.points]
    return view


MEMORY_FIELDS = (("attention_backend", "backend", ""), ("max_total_num_tokens", "KV capacity", "tokens"),
                 ("kv_cache_GB", "KV cache", "GB"), ("cuda_graphs_GB", "CUDA graphs", "GB"),
                 ("server_GiB", "server processes (NVML)", "GiB"), ("peak_allocated_GiB", "peak allocated", "GiB"),
                 ("peak_reserved_GiB", "peak reserved", "GiB"))


def memory_view(cmp: C.Comparison) -> dict[str, Any]:
    view: dict[str, Any] = {"nothing": None if cmp.points else nothing_side_by_side(cmp, "memory (05)"), "left_out": left_out(cmp)}
    if view["nothing"]:
        return view
    fields = [f for f in MEMORY_FIELDS if any(p["runs"][r].get(f[0]) is not None for p in cmp.points for r in cmp.runs)]
    view["alone"] = cmp.runs[0] if len(cmp.runs) == 1 else None
    view["head"] = ["server / point", "figure", *cmp.runs]
    view["rows"] = [[cell(p["point"]), cell(name)] + [cell(_num(p["runs"][r].get(key), unit)) for r in cmp.runs]
                    for p in cmp.points for key, name, unit in fields]
    return view


# --------------------------------------------------------------------------- the page


def page_html(runs: list[C.Run], data: dict[str, Any], sections: dict[str, C.Comparison]) -> str:
    labels = [r.label for r in runs]
    nb_rows = []
    for row in data["notebooks"]:
        cells = [cell(row["notebook"])]
        for c in row["runs"]:
            word = {"ok": "sc-pass", "failed": "sc-fail"}.get(c["status"], "sc-skip")
            count = f" {c['passed']}/{c['checks']}" if "checks" in c else ""
            cells.append({**cell(c["status"], small=c.get("reason") or "", br=True), "word": word, "count": count})
        nb_rows.append(cells)
    checks, check_cls = [], []
    for row in data["checks"]:
        first = next((c for c in row["runs"] if "missing" not in c), {})
        threshold = "differs" if row["thresholds_differ"] else f"{first.get('comparison', '')} {_num(first.get('threshold'))}"
        checks.append([cell(row["notebook"]), cell(row["check"]), cell(threshold)]
                      + [_check_cell(c, row["thresholds_differ"]) for c in row["runs"]])
        check_cls.append("sc-differs" if row["verdicts_differ"] else "")
    return render(
        "compare.html.j2", labels=labels, headline=data["headline"],
        runs=[[cell(r.label), cell(r.path, code=True), cell(r.title), cell(f"{c['passed']}/{c['verdicts']}")]
              for r, c in zip(runs, (x["counts"] for x in data["runs"]))],
        environment=[[cell(row["fact"])] + [cell(v) for v in row["values"]] for row in data["environment"]],
        environment_cls=["sc-differs" if row["differs"] else "" for row in data["environment"]],
        environment_differs=[row["fact"] for row in data["environment"] if row["differs"]],
        differences=[[cell(d["parameter"], code=True)] + [cell(C._short_value(v)) for v in d["values"]]
                     for d in data["param_differences"]],
        notebooks=nb_rows, checks=checks, checks_cls=check_cls,
        checks_differ=sum(row["verdicts_differ"] for row in data["checks"]),
        kernel=kernel_view(sections["kernel"]), throughput=throughput_view(sections["throughput"], runs),
        memory=memory_view(sections["memory"]),
    )


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(runs: list[C.Run], data: dict[str, Any]) -> str:
    """The comparison for a PR: the headline, what ran where, and every check per run."""
    labels = [r.label for r in runs]
    lines = [f"### sagecheck comparison: {C.RUN_SEP.join(labels)}", ""]
    lines += [f"- {_md(s)}" for s in data["headline"]]
    lines += ["", "| | " + " | ".join(map(_md, labels)) + " |", "|---|" + "---|" * len(labels)]
    for row in data["environment"]:
        if row["fact"] in ("GPU", "driver", "CUDA", "torch", "sglang", "sageattention", "sagecheck commit", "parameters hash",
                           "model", "engine", "tensor parallel") or row["differs"]:
            lines.append(f"| {_md(row['fact'])}{' (differs)' if row['differs'] else ''} | "
                         + " | ".join(_md(v) for v in row["values"]) + " |")
    if data["param_differences"]:
        shown = data["param_differences"][:12]
        lines += ["", f"**Parameters differ** in {len(data['param_differences'])} key(s)"
                  + (" (first 12)" if len(data["param_differences"]) > 12 else "") + ": "
                  + "; ".join(f"`{d['parameter']}` " + " / ".join(_md(C._short_value(v)) for v in d["values"]) for d in shown)
                  + ". Measurements are compared only where the points match."]
    lines += ["", "| notebook | check | " + " | ".join(map(_md, labels)) + " |", "|---|---|" + "---|" * len(labels)]
    for row in data["checks"]:
        cells = []
        for c in row["runs"]:
            if "missing" in c:
                cells.append(c["missing"])
            else:
                cells.append(f"{'pass' if c['passed'] else '**FAIL**'} {_num(c['value'], c.get('unit', ''))}")
        mark = " (verdict differs)" if row["verdicts_differ"] else ""
        lines.append(f"| {row['notebook'][:2]} | {_md(row['check'])}{mark} | " + " | ".join(map(_md, cells)) + " |")
    differing = sum(row["verdicts_differ"] for row in data["checks"])
    lines += ["", (f"The verdict differs between runs in {differing} check(s). " if differing else
                   "No verdict differs between the runs. ")
              + "Full comparison (environment, kernel and serving curves per GPU, memory, what was left out and why): "
                "`compare.html`."]
    return "\n".join(lines) + "\n"


def build(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write compare.html, compare.md and compare.json into ``out``; return the HTML's path."""
    from sagecheck.redact import redact_text

    runs = C.load_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = C.compare_all(runs)
    data = C.comparison_data(runs, sections)
    page, _ = redact_text(page_html(runs, data, sections))
    md, _ = redact_text(markdown(runs, data))
    (out / "compare.html").write_text(page)
    (out / "compare.md").write_text(md)
    R.write_json_atomic(out / "compare.json", R.to_jsonable(data))
    return out / "compare.html"

