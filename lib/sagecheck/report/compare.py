"""Runs side by side (``python -m sagecheck compare RUN_DIR... --out DIR``): what each ran on, every check per run,
and the measured points that can be compared.

Reads only what a run folder holds: ``run.json`` and ``results/*.json`` (the results contract), never a notebook.
Runs of different machines are the point (another GPU, another tensor-parallel size); runs of different models
or parameters are compared only where their points match. Each section names the parameters its values depend
on: a run whose values for them differ from the first run's is left out of that section, and a point that is
not measured (or not ok) in every run is left out of it; both are listed with the reason, never silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sagecheck import results as R
from sagecheck.metrics.kernel import read_timings
from sagecheck.metrics.memory import MemoryResults
from sagecheck.metrics.throughput import ThroughputResults
from sagecheck.params import RUN_LEVEL, ParamError
from sagecheck.report.loaded import LoadedRun as Run
from sagecheck.report.loaded import load_run
from sagecheck.report.summary import commit_label

# what tells two runs on the same GPU apart in their labels, in this order (else the run folder's name); the candidate
# as the engine's facts name it (an in-process implementation, or a server's backend)
LABEL_FIELDS: dict[str, Callable[[Run], Any]] = {
    "model": lambda r: r.params.get("model"), "engine": lambda r: r.params.get("engine"),
    "candidate": lambda r: r.facts["labels"]["candidate"], "dtype": lambda r: r.params.get("dtype"),
    "seed": lambda r: r.params.get("seed"),
    # the kernel under test: its version's first word ("1.0.6"; "2.x" for a source build, described at length)
    "sageattention": lambda r: (str(_version(r.environment, "sageattention") or "none").split() or ["none"])[0]}
NAMED_FIELDS = ("seed", "sageattention")  # their values mean nothing without the name
RUN_SEP = " · "  # between runs in a sentence: a run's label may hold commas ("H100, sageattention 2.x")


# --------------------------------------------------------------------------- runs


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    paths = list(paths)
    if len(paths) < 2:
        raise ParamError(f"compare needs two or more run folders, got {len(paths)}")
    runs = [load_run(p) for p in paths]
    resolved = [r.path.resolve() for r in runs]
    if len(set(resolved)) < len(resolved):
        raise ParamError("the same run folder is named twice")
    assign_labels(runs)
    return runs


# --------------------------------------------------------------------------- labels and environment


def gpu_short(name: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``, ``NVIDIA GeForce RTX 4090`` -> ``RTX 4090``; CPU-only runs -> ``CPU``."""
    if not name or name.startswith("none") or name == "CPU":
        return "CPU"
    text = name.replace("NVIDIA", "").replace("GeForce", "").strip()
    m = re.search(r"\b(RTX \w+|[A-Z]+\d+[A-Za-z]*)\b", text)
    return m.group(1) if m else text.split()[0]


def tensor_parallel(run: Run) -> int:
    return int(run.facts.get("tp") or 1)


def assign_labels(runs: list[Run]) -> None:
    """A short, unique name per run: its GPU (and tensor-parallel size), then what differs, then the folder."""
    base = []
    for run in runs:
        label = gpu_short(run.environment.get("gpu"))
        if tensor_parallel(run) > 1:
            label += f" tp{tensor_parallel(run)}"
        base.append(label)
    diffs = []
    for name, read in LABEL_FIELDS.items():
        values = [read(r) for r in runs]
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str) for v in values):
            diffs.append({"parameter": name, "values": values})
    for i, run in enumerate(runs):
        label = base[i]
        if base.count(label) > 1:
            own = [f"{d['parameter']} {_short_value(d['values'][i])}" if d["parameter"] in NAMED_FIELDS
                   else _short_value(d["values"][i]) for d in diffs[:2]]
            label = ", ".join([label, *own]) if own else label  # "·" separates runs in the headlines, not a run's parts
        run.label = label
    labels = [r.label for r in runs]
    tails = distinct_tails([r.path for r in runs])
    for run, tail in zip(runs, tails):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({tail})"


def distinct_tails(paths: list[Path]) -> list[str]:
    """Each folder by as few of its path's last parts as tell it from the others: ``acc_v2`` where the names differ,
    ``h100-s5/all35/acc_v2`` beside ``h100-s6/all35/acc_v2``."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        tails = ["/".join(ps[-k:]) for ps in parts]
        if all(tails.count(t) == 1 or len(ps) <= k for t, ps in zip(tails, parts)):
            return tails
    return [str(p) for p in paths]


def _short_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sglang": {"tp": 2}}`` -> ``{"sglang.tp": 2}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_differences(runs: list[Run]) -> list[dict[str, Any]]:
    """Every parameter whose value is not the same in all runs (``missing`` where a run has no such key)."""
    flats = [flatten(r.params) for r in runs]
    keys = sorted(set().union(*flats))
    out = []
    for key in keys:
        if key.split(".")[0] in RUN_LEVEL:
            continue
        values = [f.get(key, "missing") for f in flats]
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str) for v in values):
            out.append({"parameter": key, "values": values})
    return out


def run_params_hash(run: Run) -> str:
    got = run.environment.get("params_hash")
    if got:
        return str(got)
    from sagecheck.params import params_hash

    return params_hash(run.params) if run.params else "n/a"


def _version(env: dict[str, Any], name: str) -> Any:
    return (env.get("versions") or {}).get(name) or env.get(name)


ENVIRONMENT_FIELDS: list[tuple[str, Callable[[Run], Any]]] = [
    ("run folder", lambda r: r.path.name),
    ("started", lambda r: r.manifest.get("started_at")),
    ("GPU", lambda r: r.environment.get("gpu")),
    ("GPUs in the machine", lambda r: len(r.environment.get("gpus") or []) or None),
    ("GPU memory (GiB)", lambda r: r.environment.get("gpu_memory_gib")),
    # a GPU capped below its default limit runs power-dense kernels, and the decode after them, at lower clocks
    ("GPU power limit (W)", lambda r: ((r.environment.get("gpus") or [{}])[0]).get("power_limit_w")),
    ("driver", lambda r: r.environment.get("driver")),
    ("CUDA", lambda r: r.environment.get("cuda")),
    ("torch", lambda r: _version(r.environment, "torch")),
    ("triton", lambda r: _version(r.environment, "triton")),
    ("transformers", lambda r: _version(r.environment, "transformers")),
    ("sglang", lambda r: _version(r.environment, "sglang")),
    ("sageattention", lambda r: _version(r.environment, "sageattention")),
    ("python", lambda r: r.environment.get("python")),
    ("CPU", lambda r: r.environment.get("cpu")),
    ("sagecheck commit", lambda r: _commit(r.environment.get("git") or {})),
    ("parameters file", lambda r: r.manifest.get("params_file")),
    ("parameters hash", run_params_hash),
    ("model", lambda r: r.params.get("model")),
    ("engine", lambda r: r.params.get("engine")),
    ("compared", lambda r: r.facts["description"].replace("`", "")),
    ("dtype", lambda r: r.environment.get("dtype") or r.params.get("dtype")),
    ("tensor parallel", tensor_parallel),
]


def _commit(git: dict[str, Any]) -> str:
    return commit_label(git) if git.get("sha") else "n/a"



IDENTIFYING_FACTS = ("run folder", "started")  # different in every pair of runs: never flagged


def environment_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per fact, one column per run, and whether the runs differ in it."""
    rows = []
    for name, get in ENVIRONMENT_FIELDS:
        values = []
        for run in runs:
            try:
                v = get(run)
            except Exception:  # noqa: BLE001 - an odd environment record is shown as unknown, not a crash
                v = None
            values.append("n/a" if v in (None, "") else v)
        differs = name not in IDENTIFYING_FACTS and len({str(v) for v in values}) > 1
        rows.append({"fact": name, "values": values, "differs": differs})
    return rows


# --------------------------------------------------------------------------- checks


def check_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Every check of every run, in notebook order, matched by its id: per run its verdict, or why there is none."""
    order: list[tuple[str, str]] = []
    names: dict[tuple[str, str], str] = {}
    for run in runs:
        for res in run.measured:
            for v in res.verdicts:
                if (res.notebook, v.id) not in order:
                    order.append((res.notebook, v.id))
                    names[(res.notebook, v.id)] = v.name
    order.sort(key=lambda k: k[0])  # stable: within a notebook, first appearance
    rows = []
    for notebook, vid in order:
        name = names[(notebook, vid)]
        cells = []
        for run in runs:
            res = run.results.get(notebook)
            v = res.find(vid) if res else None
            if v is not None:
                cells.append({"value": v.value, "passed": v.passed, "comparison": v.comparison, "threshold": v.threshold,
                              "unit": v.unit})
            else:
                cells.append({"missing": _why_missing(res)})
        verdicts = {c.get("passed") for c in cells if "missing" not in c}
        thresholds = {(c["comparison"], c["threshold"]) for c in cells if "missing" not in c}
        rows.append({"notebook": notebook, "id": vid, "check": name, "runs": cells, "verdicts_differ": len(verdicts) > 1,
                     "thresholds_differ": len(thresholds) > 1, "in_every_run": all("missing" not in c for c in cells)})
    return rows


def _why_missing(res: R.Results | None) -> str:
    if res is None:
        return "not run"
    if res.status == "failed":
        return "notebook failed"
    if res.status == "skipped":
        return "skipped"
    return "no such check"


def notebook_status_rows(runs: list[Run]) -> list[dict[str, Any]]:
    names = sorted({n for run in runs for n in run.results if n != R.SUMMARY_NOTEBOOK})
    rows = []
    for name in names:
        cells = []
        for run in runs:
            res = run.results.get(name)
            if res is None:
                cells.append({"status": "not run", "reason": ""})
            else:
                cells.append({"status": res.status, "reason": (res.reason or "")[:160],
                              "passed": sum(v.passed for v in res.verdicts), "checks": len(res.verdicts)})
        rows.append({"notebook": name, "runs": cells})
    return rows


# --------------------------------------------------------------------------- matched points


@dataclass(frozen=True)
class Section:
    """A measured quantity compared point by point.

    ``rows(run)`` gives the run's points (None: the notebook did not measure them, with ``missing(run)`` saying why);
    ``key`` names a point; ``values`` are copied per run; ``depends_on`` names the list of the engine's facts that
    holds the parameters (dotted) the values depend on besides the machine (None: none): runs that differ from the
    first run in one of them are left out of the section.
    """

    name: str
    notebook: str
    key: tuple[str, ...]
    values: tuple[str, ...]
    depends_on: str | None
    rows: Callable[[Run], list[dict[str, Any]] | None]


@dataclass
class Comparison:
    section: str
    key: tuple[str, ...]
    values: tuple[str, ...]
    runs: list[str]  # labels of the runs compared
    points: list[dict[str, Any]] = field(default_factory=list)  # key fields + {"runs": {label: {value: ...}}}
    left_out_runs: list[dict[str, str]] = field(default_factory=list)  # {"run", "why"}
    left_out_points: list[dict[str, Any]] = field(default_factory=list)  # key fields + {"why"}

    def series(self, label: str, value: str) -> list[Any]:
        return [p["runs"][label].get(value) for p in self.points]


def throughput_rows(run: Run) -> list[dict[str, Any]] | None:
    """The candidate's points of 04 with its speedups, and the baseline's tokens/s beside them."""
    tp = ThroughputResults.read(run.result("04"))
    return tp.matched_points() if tp and tp.rows else None


def kernel_rows(run: Run) -> list[dict[str, Any]] | None:
    """08's timings, with each implementation's TOPS over sdpa's at the same shape."""
    return read_timings(run.result("08"))


def memory_rows(run: Run) -> list[dict[str, Any]] | None:
    """05's figures: per server (KV capacity, its processes' GPU memory), or per in-process point (peaks)."""
    got = MemoryResults.read(run.result("05"))
    return got.points if got and got.points else None


SECTIONS = (
    Section("throughput", "04_throughput", key=("batch", "input_length"),
            values=("prefill_speedup", "prefill_speedup_p10", "prefill_speedup_p90", "decode_speedup", "decode_speedup_p10",
                    "decode_speedup_p90", "prefill_tok_s", "baseline_prefill_tok_s", "decode_tok_s_total",
                    "baseline_decode_tok_s_total"),
            depends_on="speed", rows=throughput_rows),
    Section("kernel", "08_kernel", key=("implementation", "seq_len", "batch", "heads", "head_dim", "causal", "dtype"),
            values=("tops", "ms_median", "ms_p10", "ms_p90", "over_sdpa", "clock"), depends_on=None, rows=kernel_rows),
    Section("memory", "05_memory", key=("point",),
            values=("attention_backend", "max_total_num_tokens", "kv_cache_GB", "cuda_graphs_GB", "server_GiB",
                    "peak_allocated_GiB", "peak_reserved_GiB"),
            depends_on="memory", rows=memory_rows),
)


def _why_no_rows(run: Run, section: Section) -> str:
    res = run.result(section.notebook.split("_", 1)[0])
    if res is None:
        return f"{section.notebook} was not run"
    if res.status != "ok":
        return f"{section.notebook} {res.status}" + (f": {res.reason.splitlines()[0][:160]}" if res.reason else "")
    return f"{section.notebook} recorded no such table"


def compare_section(runs: list[Run], section: Section) -> Comparison:
    rows = {run.label: section.rows(run) for run in runs}
    cmp = Comparison(section.name, section.key, section.values, [])
    with_rows = [run for run in runs if rows[run.label]]
    for run in runs:
        if not rows[run.label]:
            cmp.left_out_runs.append({"run": run.label, "why": _why_no_rows(run, section)})
    if not with_rows:
        return cmp
    reference = with_rows[0]
    ref_flat = flatten(reference.params)
    depends_on = reference.facts.get("depends_on", {}).get(section.depends_on, []) if section.depends_on else []
    for run in with_rows:
        flat = flatten(run.params)
        differs = [k for k in depends_on if json.dumps(flat.get(k), default=str) != json.dumps(ref_flat.get(k), default=str)]
        if differs:
            what = "; ".join(f"{k} {_short_value(flat.get(k))} vs {_short_value(ref_flat.get(k))} in {reference.label}"
                             for k in differs)
            cmp.left_out_runs.append({"run": run.label, "why": f"measured differently: {what}"})
        else:
            cmp.runs.append(run.label)
    by_run = {label: {tuple(r.get(k) for k in section.key): r for r in rows[label]} for label in cmp.runs}
    keys: list[tuple] = []
    for label in cmp.runs:
        keys += [k for k in by_run[label] if k not in keys]
    for key in sorted(keys, key=lambda k: tuple((str(type(x)), x) for x in k)):
        point = dict(zip(section.key, key))
        problems = []
        for label in cmp.runs:
            r = by_run[label].get(key)
            if r is None:
                problems.append(f"not measured in {label}")
            elif r.get("status", "ok") != "ok":
                problems.append(f"{r.get('status')} in {label}")
        if problems:
            cmp.left_out_points.append({**point, "why": "; ".join(problems)})
        else:
            point["runs"] = {label: {v: by_run[label][key].get(v) for v in section.values} for label in cmp.runs}
            cmp.points.append(point)
    return cmp


def compare_all(runs: list[Run]) -> dict[str, Comparison]:
    return {s.name: compare_section(runs, s) for s in SECTIONS}


# --------------------------------------------------------------------------- headline


def _median(values: list[float | None]) -> float | None:
    import numpy as np

    vals = [v for v in values if isinstance(v, (int, float))]
    return float(np.median(vals)) if vals else None


def headline(runs: list[Run], sections: dict[str, Comparison], checks: list[dict[str, Any]]) -> list[str]:
    """Two to five sentences computed from the comparison: the runs' checks, where verdicts differ, speed per machine."""
    out = []
    counts = [r.counts for r in runs]
    out.append("Checks passed: " + RUN_SEP.join(f"{r.label} {c['passed']}/{c['verdicts']} in {len(r.measured)} notebooks" + (
        f" ({c['notebooks_failed']} notebook(s) failed)" if c["notebooks_failed"] else "") for r, c in zip(runs, counts)) + ".")
    differ = [row for row in checks if row["verdicts_differ"]]
    if differ:
        names = "; ".join(f"{row['notebook'][:2]} {row['check']} (" + RUN_SEP.join(
            f"{label} {'pass' if c.get('passed') else 'fail'}" for label, c in zip((r.label for r in runs), row["runs"])
            if "missing" not in c) + ")" for row in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        out.append(f"{len(differ)} check(s) with a different verdict across runs: {names}{more}.")
    elif checks:
        common = sum(row["in_every_run"] for row in checks)
        out.append(f"Every check in more than one run has the same verdict in each ({common} checks in all runs).")
    tp = sections["throughput"]
    if tp.points and len(tp.runs) > 1:
        parts = []
        for phase in ("prefill", "decode"):
            meds = [(label, _median(tp.series(label, f"{phase}_speedup"))) for label in tp.runs]
            if any(m is not None for _, m in meds):
                parts.append(f"{phase} " + RUN_SEP.join(f"{label} {m:.2f}x" for label, m in meds if m is not None))
        out.append(f"Serving speedup of the candidate, median over the {len(tp.points)} points measured in every run: "
                   + "; ".join(parts) + ".")
        apart = [f"{label}: {n_prefill} prefill and {n_decode} decode" for label, n_prefill, n_decode in
                 ((label, *(len(disjoint_points(tp, tp.runs[0], label, ph)) for ph in ("prefill", "decode"))) for label in tp.runs[1:])]
        out.append(f"Points whose speedup intervals (p10-p90) do not overlap {tp.runs[0]}'s: " + "; ".join(apart)
                   + f" of {len(tp.points)}.")
        noisy = [f"{label} {aa['pct']:.1f} %" for label, aa in aa_control(runs, tp.runs).items() if aa and not aa["passed"]]
        if noisy:
            out.append("The A/A control (the baseline against its own copy) failed in " + RUN_SEP.join(noisy)
                       + " (median |A/A - 1|, the larger phase): speedup differences between runs smaller than that are not resolved.")
    kn = sections["kernel"]
    side_by_side = kn.points if len(kn.runs) > 1 else []
    cand = [p for p in side_by_side if p["implementation"] != "sdpa" and all(p["runs"][lb]["over_sdpa"] for lb in kn.runs)]
    if cand:
        meds = RUN_SEP.join(f"{label} {_median([p['runs'][label]['over_sdpa'] for p in cand]):.2f}x" for label in kn.runs)
        first = kn.runs[0]
        across = RUN_SEP.join(f"{label} {_median([p['runs'][label]['tops'] / p['runs'][first]['tops'] for p in cand]):.2f}x"
                           for label in kn.runs[1:])
        out.append(f"Kernel throughput over sdpa (08, median over {len(cand)} shapes timed in every run): {meds}; "
                   f"the kernel's TOPS against {first}'s, median: {across}.")
    elif side_by_side:
        first = kn.runs[0]
        ratios = RUN_SEP.join(f"{label} {_median([p['runs'][label]['tops'] / p['runs'][first]['tops'] for p in kn.points]):.2f}x"
                           for label in kn.runs[1:])
        out.append(f"Kernel timings (08) of {len(kn.points)} shapes in every run; TOPS against {first}, median: {ratios}.")
    points = sum(len(c.left_out_points) for c in sections.values())
    nowhere = [name for name, c in sections.items() if not c.runs and all("not run" in x["why"] for x in c.left_out_runs)]
    whole = [f"{x['run']} from {name}" for name, c in sections.items() if name not in nowhere for x in c.left_out_runs]
    if points or whole:
        out.append("Left out, each listed with why: " + "; ".join(
            ([f"{points} point(s) not measured alike in every run"] if points else [])
            + ([RUN_SEP.join(whole)] if whole else [])) + ".")
    if nowhere:
        out.append("Not part of these runs (not measured in any run): " + ", ".join(nowhere) + ".")
    return out


def disjoint_points(cmp: Comparison, first: str, other: str, phase: str) -> list[dict[str, Any]]:
    """The matched points where ``other``'s p10-p90 interval of the ``phase`` speedup lies wholly above or below
    ``first``'s: a difference between the runs larger than either run's spread at that point."""
    out = []
    for p in cmp.points:
        a, b = p["runs"][first], p["runs"][other]
        lo_a, hi_a, lo_b, hi_b = (x.get(f"{phase}_speedup_{q}") for x in (a, b) for q in ("p10", "p90"))
        if None not in (lo_a, hi_a, lo_b, hi_b) and (lo_b > hi_a or hi_b < lo_a):
            out.append(p)
    return out


def aa_control(runs: list[Run], labels: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Per run, 04's A/A control as 04 judged it: the larger of its A/A figures (median over points of |A/A speedup
    - 1|, %), its limit, and whether every A/A check passed; None where the run had none (in-process engine, or
    aa_control off)."""
    out: dict[str, dict[str, Any] | None] = {}
    for run in runs:
        if run.label not in labels:
            continue
        tp = ThroughputResults.read(run.result("04"))
        worst = tp.aa_worst() if tp else None
        out[run.label] = None if worst is None else {"pct": worst.value, "limit": worst.threshold, "passed": not tp.aa_failed}
    return out


def comparison_data(runs: list[Run], sections: dict[str, Comparison] | None = None) -> dict[str, Any]:
    """Everything the compare report shows, as plain data (written as compare.json)."""
    sections = sections if sections is not None else compare_all(runs)
    checks = check_rows(runs)
    return {
        "runs": [{"label": r.label, "path": str(r.path), "counts": r.counts} for r in runs],
        "environment": environment_rows(runs),
        "param_differences": param_differences(runs),
        "notebooks": notebook_status_rows(runs),
        "checks": checks,
        "sections": {name: c.__dict__ for name, c in sections.items()},
        "headline": headline(runs, sections, checks),
    }
