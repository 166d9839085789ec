"""The comparison's files: ``compare.html`` (self-contained), ``compare.md`` (for the PR) and ``compare.json``.

Everything shown is computed in :mod:`sagecheck.compare`; this module only lays it out.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from sagecheck import compare as C
from sagecheck import results as R
from sagecheck.report import _esc, _result_label
from sagecheck.show import folded_html

TEMPLATES = Path(__file__).with_name("templates")


def _num(x: Any, unit: str = "") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else str(x)
    return R.format_number(x) + (f" {unit}" if unit else "")


def _figure(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return f"<img class='sc-figure' alt='{_esc(alt)}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _table(head: list[str], rows: list[list[str]], table_id: str = "", cls: list[str] | None = None) -> str:
    """``rows`` are HTML already escaped; ``cls`` an optional class per row."""
    ident = f" id='{table_id}'" if table_id else ""
    body = "".join(f"<tr{(' class=' + repr(cls[i])) if cls and cls[i] else ''}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    return (f"<div class='sc-scroll'><table class='sc-table'{ident}><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table></div>")


def _check_cell(cell: dict[str, Any], show_threshold: bool) -> str:
    if "missing" in cell:
        return f"<span class='sc-skip'>{_esc(cell['missing'])}</span>"
    value = _esc(_num(cell["value"], cell.get("unit", "")))
    threshold = f" <small>({_esc(cell['comparison'])} {_esc(_num(cell['threshold']))})</small>" if show_threshold else ""
    return f"{value}{threshold} {_result_label(cell['passed'])}"


def _left_out(cmp: C.Comparison) -> str:
    parts = []
    if cmp.left_out_runs:
        parts.append("<p><b>Runs left out of this section</b></p><ul>" + "".join(
            f"<li>{_esc(x['run'])}: {_esc(x['why'])}</li>" for x in cmp.left_out_runs) + "</ul>")
    if cmp.left_out_points:
        rows = [[_esc(p.get(k)) for k in cmp.key] + [_esc(p["why"])] for p in cmp.left_out_points]
        parts.append(folded_html(f"{len(cmp.left_out_points)} point(s) left out: not measured alike in every run (which, "
                                 f"and why)", _table([*cmp.key, "why left out"], rows)))
    return "".join(parts)


# --------------------------------------------------------------------------- sections


def kernel_html(cmp: C.Comparison) -> str:
    from sagecheck import plots

    if len(cmp.runs) < 2 or not cmp.points:
        return _nothing_side_by_side(cmp, "kernel timings (08)") + _left_out(cmp)
    out = [f"<p>{len(cmp.points)} timings (implementation × shape) measured in every run compared; TOPS of attention "
           f"(4·batch·heads·n<sub>q</sub>·n<sub>k</sub>·head dim per call, halved where causal), median of repeated calls, "
           f"clock: {_esc(', '.join(sorted({str(p['runs'][r].get('clock')) for p in cmp.points for r in cmp.runs})))}.</p>"]
    out.append(_figure(plots.kernel_by_run(cmp.points, cmp.runs, "tops", "TOPS",
                                           "Attention kernel throughput per GPU (dashed: sdpa)"), "kernel TOPS per run"))
    ratio = [p for p in cmp.points if p["implementation"] != "sdpa" and all(p["runs"][r].get("over_sdpa") for r in cmp.runs)]
    if ratio:
        out.append(_figure(plots.kernel_by_run(ratio, cmp.runs, "over_sdpa", "TOPS / sdpa's TOPS",
                                               "Kernel over sdpa at the same shape, per GPU (1: as fast)", reference=1.0),
                           "kernel speedup over sdpa per run"))
    rows = []
    for p in cmp.points:
        rows.append([_esc(p["implementation"]), _esc(p["seq_len"]), _esc(p["head_dim"]), _esc("causal" if p["causal"] else "full"),
                     _esc(f"b{p['batch']} h{p['heads']} {p['dtype']}")]
                    + [_esc(_num(p["runs"][r]["tops"])) + (f" <small>({_esc(_num(p['runs'][r]['over_sdpa']))}× sdpa)</small>"
                                                          if p["implementation"] != "sdpa" else "") for r in cmp.runs])
    out.append(folded_html("Every matched timing (TOPS)",
                           _table(["implementation", "seq len", "head dim", "mask", "shape", *cmp.runs], rows)))
    return "".join(out) + _left_out(cmp)


def throughput_html(cmp: C.Comparison, runs: list[C.Run]) -> str:
    from sagecheck import plots

    if len(cmp.runs) < 2 or not cmp.points:
        return _nothing_side_by_side(cmp, "serving throughput (04)") + _left_out(cmp)
    phases = tuple(ph for ph in ("prefill", "decode") if any(p["runs"][r].get(f"{ph}_speedup") is not None
                                                               for p in cmp.points for r in cmp.runs))
    def aa_words(aa: dict[str, Any] | None) -> str:
        if aa is None:
            return "none (no A/A control in this run)"
        return f"{aa['pct']:.1f} %" + ("" if aa["passed"] else f" — failed, limit {aa['limit']:g} %")

    aa_text = "; ".join(f"{label}: {aa_words(aa)}" for label, aa in C.aa_control(runs, cmp.runs).items())
    out = [f"<p>{len(cmp.points)} points (batch × input length) measured in every run. Speedup = candidate tokens/s over "
           f"the baseline's on the same machine, median of the repeats, bars p10–p90. The A/A control of each run "
           f"(median |A/A speedup − 1|, the larger phase) is the smallest difference it resolves: {_esc(aa_text)}.</p>"]
    if phases:
        out.append(_figure(plots.speedup_by_run(cmp.points, cmp.runs, phases, "Candidate over baseline, per run"),
                           "serving speedup per run"))
    rows = []
    for p in cmp.points:
        cells = [_esc(p["batch"]), _esc(p["input_length"])]
        for r in cmp.runs:
            v = p["runs"][r]
            cells.append(" / ".join(
                f"{_esc(_num(v.get(f'{ph}_speedup')))}× <small>[{_esc(_num(v.get(f'{ph}_speedup_p10')))}, "
                f"{_esc(_num(v.get(f'{ph}_speedup_p90')))}]</small>" for ph in ("prefill", "decode")))
        rows.append(cells)
    out.append(_table(["batch", "input length", *[f"{r}: prefill / decode speedup" for r in cmp.runs]], rows,
                      table_id="compare-throughput"))
    def rate(x: Any) -> str:  # tokens per second: whole numbers with thousands separated
        return f"{x:,.0f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"

    absolute = []
    for p in cmp.points:
        absolute.append([_esc(p["batch"]), _esc(p["input_length"])] + [
            f"{rate(p['runs'][r]['baseline_prefill_tok_s'])} → {rate(p['runs'][r]['prefill_tok_s'])}; "
            f"{rate(p['runs'][r]['baseline_decode_tok_s_total'])} → {rate(p['runs'][r]['decode_tok_s_total'])}"
            for r in cmp.runs])
    out.append(folded_html("Tokens per second, baseline → candidate (prefill; decode, all sequences)",
                           _table(["batch", "input length", *cmp.runs], absolute)))
    return "".join(out) + _left_out(cmp)


MEMORY_FIELDS = (("attention_backend", "backend", ""), ("max_total_num_tokens", "KV capacity", "tokens"),
                 ("kv_cache_GB", "KV cache", "GB"), ("cuda_graphs_GB", "CUDA graphs", "GB"),
                 ("server_GiB", "server processes (NVML)", "GiB"), ("peak_allocated_GiB", "peak allocated", "GiB"),
                 ("peak_reserved_GiB", "peak reserved", "GiB"))


def memory_html(cmp: C.Comparison) -> str:
    if not cmp.points:
        return _nothing_side_by_side(cmp, "memory (05)") + _left_out(cmp)
    fields = [f for f in MEMORY_FIELDS if any(p["runs"][r].get(f[0]) is not None for p in cmp.points for r in cmp.runs)]
    rows = []
    for p in cmp.points:
        for key, name, unit in fields:
            rows.append([_esc(p["point"]), _esc(name)] + [_esc(_num(p["runs"][r].get(key), unit)) for r in cmp.runs])
    note = "" if len(cmp.runs) > 1 else f"<p>Only {_esc(cmp.runs[0])} measured memory alike; its figures alone:</p>"
    return note + _table(["server / point", "figure", *cmp.runs], rows, table_id="compare-memory") + _left_out(cmp)


def _nothing_side_by_side(cmp: C.Comparison, what: str) -> str:
    if not cmp.runs:
        return f"<p>No run measured {_esc(what)}.</p>"
    if len(cmp.runs) == 1:
        return f"<p>Only {_esc(cmp.runs[0])} measured {_esc(what)} alike: nothing to put side by side.</p>"
    return f"<p>No point of {_esc(what)} was measured in every run.</p>"


# --------------------------------------------------------------------------- the page


def page_html(runs: list[C.Run], data: dict[str, Any], sections: dict[str, C.Comparison]) -> str:
    import jinja2

    labels = [r.label for r in runs]
    env_rows = [[_esc(row["fact"])] + [_esc(v) for v in row["values"]] for row in data["environment"]]
    env_cls = ["sc-differs" if row["differs"] else "" for row in data["environment"]]
    diffs = data["param_differences"]
    diff_rows = [[f"<code>{_esc(d['parameter'])}</code>"] + [_esc(C._short_value(v)) for v in d["values"]] for d in diffs]
    nb_rows = []
    for row in data["notebooks"]:
        cells = [_esc(row["notebook"])]
        for c in row["runs"]:
            word = {"ok": "sc-pass", "failed": "sc-fail"}.get(c["status"], "sc-skip")
            count = f" {c['passed']}/{c['checks']}" if "checks" in c else ""
            reason = f"<br><small>{_esc(c['reason'])}</small>" if c.get("reason") else ""
            cells.append(f"<span class='{word}'>{_esc(c['status'])}</span>{count}{reason}")
        nb_rows.append(cells)
    check_rows, check_cls = [], []
    for row in data["checks"]:
        first = next((c for c in row["runs"] if "missing" not in c), {})
        threshold = "differs" if row["thresholds_differ"] else f"{first.get('comparison', '')} {_num(first.get('threshold'))}"
        check_rows.append([_esc(row["notebook"]), _esc(row["check"]), _esc(threshold)]
                          + [_check_cell(c, row["thresholds_differ"]) for c in row["runs"]])
        check_cls.append("sc-differs" if row["verdicts_differ"] else "")
    template = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False).get_template("compare.html.j2")
    return template.render(
        labels=labels, runs=runs, headline=data["headline"],
        runs_table=_table(["run", "folder", "title", "checks passed"], [
            [_esc(r.label), f"<code>{_esc(r.path)}</code>", _esc(r.params.get("title", "")),
             _esc(f"{c['passed']}/{c['verdicts']}")] for r, c in zip(runs, (x["counts"] for x in data["runs"]))]),
        environment=_table(["", *labels], env_rows, table_id="compare-environment", cls=env_cls),
        differences=len(diffs),
        differences_table=_table(["parameter", *labels], diff_rows, table_id="compare-parameters") if diffs else "",
        notebooks=_table(["notebook", *labels], nb_rows, table_id="compare-notebooks"),
        checks=_table(["notebook", "check", "threshold", *labels], check_rows, table_id="compare-checks", cls=check_cls),
        checks_differ=sum(row["verdicts_differ"] for row in data["checks"]),
        kernel=kernel_html(sections["kernel"]), throughput=throughput_html(sections["throughput"], runs),
        memory=memory_html(sections["memory"]),
    )


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(runs: list[C.Run], data: dict[str, Any]) -> str:
    """The comparison for a PR: the headline, what ran where, and every check per run."""
    labels = [r.label for r in runs]
    lines = [f"### sagecheck comparison: {', '.join(labels)}", ""]
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
                cells.append(f"{'✅' if c['passed'] else '❌'} {_num(c['value'], c.get('unit', ''))}")
        mark = " ⚠️" if row["verdicts_differ"] else ""
        lines.append(f"| {row['notebook'][:2]} | {_md(row['check'])}{mark} | " + " | ".join(map(_md, cells)) + " |")
    lines += ["", "⚠️: the verdict differs between runs. Full comparison (environment, kernel and serving curves per GPU, "
              "memory, what was left out and why): `compare.html`."]
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

