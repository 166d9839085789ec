"""The report's opening paragraph: from this run's results, where the candidate is faster, what it costs in
accuracy and what the failing checks mean. Every figure in it is read from the results, by the verdicts' kinds and
ids (never their display names); the only fixed text is what a failing check of each notebook means."""

from __future__ import annotations

from typing import Any, Iterable

from sagecheck import results as R
from sagecheck.backend_stats import off_kernel
from sagecheck.report.facts import engine_facts
from sagecheck.thresholds import ACCEPTED_PRECISION_WORDS
from sagecheck.metrics.code_paths import CodePathResults
from sagecheck.metrics.throughput import ThroughputResults
from sagecheck.metrics.timing import NO_CONTROL
from sagecheck.params import labels


def _accuracy(results: Iterable[R.Results]) -> list[R.Verdict]:
    """The checks of the candidate's answers (controls of the measurement itself are kind "control", not these)."""
    return [v for r in results for v in r.of_kind("accuracy")]


# what a failing check of each notebook means for the pull request
FAILURE_MEANS = {
    "00_environment": "the run's environment could not be recorded",
    "01_runtime_flag": "the backend does not switch on and off as claimed, so the other figures may not measure it",
    "02_logits": "its next-token distributions differ from the baseline's by more than the thresholds allow",
    "03_perplexity": "language-model quality changed beyond the threshold",
    "04_throughput": "the speed figures are not conclusive",
    "05_memory": "it costs more GPU memory than allowed",
    "06_activation_drift": "precision error grows through the layers beyond the threshold",
    "07_context_length": "retrieval or loss degrades on long contexts",
    "08_kernel": "the kernel itself disagrees with what it should compute at some shapes",
    "09_tasks": "it changes downstream answers beyond the threshold",
    "10_code_paths": "a code path of the backend gives other answers than the cold prefill does",
}


def _phase_points(rows: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """The candidate's measured points of one phase, each classified: faster / slower / no difference.
    SGLang rows carry the class against the A/A control; in-process rows are classed by whether the speedup's
    10-90% interval lies above or below 1."""
    points = []
    for r in rows:
        speedup = r.get(f"{phase}_speedup")
        if r.get("status") != "ok" or speedup is None:
            continue
        verdict = r.get(f"{phase}_vs_aa")
        if verdict in ("faster", "slower") and (speedup > 1) != (verdict == "faster"):
            verdict = "no difference"  # beyond a noisy A/A interval, yet on the other side of 1: not a difference to report
        if verdict == NO_CONTROL:  # the copy server did not serve: judged as in-process rows are (the sentence says so)
            verdict = None
        if verdict is None:
            lo, hi = r.get(f"{phase}_speedup_p10"), r.get(f"{phase}_speedup_p90")
            verdict = "faster" if lo is not None and lo > 1 else "slower" if hi is not None and hi < 1 else "no difference"
        points.append({"batch": r["batch"], "input_length": r["input_length"], "speedup": speedup, "verdict": verdict})
    return points


def crossover(points: list[dict[str, Any]]) -> dict[int, int]:
    """Per batch size, the smallest input length from which the candidate is faster at every longer measured
    length (the batch is left out where its longest length is not faster)."""
    out = {}
    for batch in sorted({p["batch"] for p in points}):
        by_len = sorted((p for p in points if p["batch"] == batch), key=lambda p: p["input_length"])
        start = None
        for p in reversed(by_len):
            if p["verdict"] != "faster":
                break
            start = p["input_length"]
        if start is not None:
            out[batch] = start
    return out


def _point(p: dict[str, Any]) -> str:
    return f"{p['speedup']:.3g}x at input {p['input_length']}, batch {p['batch']}"


def speed_sentence(res: R.Results | None, candidate: str, baseline: str, cpu_emulation: bool) -> str:
    """``candidate``, ``baseline``: the names to print."""
    if res is None:
        return "Speed was not measured in this run (04_throughput did not run)."
    if res.status != "ok":
        return f"Speed was not measured: 04_throughput {res.status} ({(res.reason or '').strip()[:160]})."
    tp = ThroughputResults.read(res)
    rows = tp.points("candidate")
    parts = []
    for phase in ("prefill", "decode"):
        points = _phase_points(rows, phase)
        if not points:
            continue
        faster = [p for p in points if p["verdict"] == "faster"]
        slower = [p for p in points if p["verdict"] == "slower"]
        same = [p for p in points if p["verdict"] not in ("faster", "slower")]
        text = f"{phase}: faster at {len(faster)} of {len(points)} points, slower at {len(slower)}"
        if same:  # every point accounted for: the others are within their spread (or the A/A control's)
            named = " and ".join(f"input {p['input_length']}, batch {p['batch']}" for p in same)
            text += f", no measurable difference at {len(same) if len(same) > 2 else named}"
        if faster:
            cross = crossover(points)
            best = max(faster, key=lambda p: p["speedup"])
            text += f" (best {_point(best)}"
            if cross:
                starts: dict[int, list[int]] = {}
                for b, n in cross.items():
                    starts.setdefault(n, []).append(b)
                text += "; faster from input " + "; from input ".join(
                    f"{n} on at batch {' and '.join(map(str, bs))}" for n, bs in sorted(starts.items()))
            text += ")"
        else:
            text += (f" (not faster anywhere up to input {max(p['input_length'] for p in points)}, "
                     f"batch {max(p['batch'] for p in points)})")
        if slower:
            text += f", worst {_point(min(slower, key=lambda p: p['speedup']))}"
        parts.append(text)
    if not parts:
        return "Speed: no point of 04_throughput ran."
    sentence = f"Speed of {candidate} against {baseline}: " + "; ".join(parts) + "."
    routed, elsewhere = off_kernel(rows)
    if elsewhere:  # the candidate's own counters: at these points no kernel ran, the speedup is the integration's
        named = ", ".join(f"input {r['input_length']} batch {r['batch']}" for r in elsewhere[:4])
        sentence += (f" Its kernel ran the prefill at {len(routed) - len(elsewhere)} of {len(routed)} points; at the others "
                     f"({named}{', ...' if len(elsewhere) > 4 else ''}) its prefill ran wholly or partly on the baseline's "
                     "kernel (its dispatch rule or a fallback), so those speedups measure the backend's overhead, not the kernel.")
    lower = tp.lower_decode_clocks
    if lower:  # 04's GPU clock log: the candidate's decode ran at a lower SM clock than the baseline's and its copy's
        named = "; ".join(f"input {r['input_length']} batch {r['batch']}: {r['candidate_mhz']:.0f} against "
                          f"{r['baseline_mhz']:.0f} MHz"
                          + (f", in {r['lower_in_repeats']} of {r['paired_repeats']} repeats"
                             if "paired_repeats" in r else "")
                          for r in lower[:3])
        sentence += (f" At {len(lower)} point{'s' if len(lower) > 1 else ''} its GPU decoded at a lower SM clock than the "
                     f"baseline's ({named}{', ...' if len(lower) > 3 else ''}; 04's GPU clock log): a decode speedup there "
                     "includes the GPU's power state after the prefill.")
    aa = tp.aa_failed
    measured = [v for v in aa if v.value is not None]
    if measured:
        worst = max(measured, key=lambda v: v.value)
        unit = f" {worst.unit}" if worst.unit else ""
        sentence += (f" The A/A control failed (the baseline against its own copy differs by {R.format_number(worst.value)}{unit}, "
                     f"limit {R.format_number(worst.threshold)}{unit}), so smaller differences are not resolved.")
    elif aa or any(r.get(f"{ph}_vs_aa") == NO_CONTROL for r in rows for ph in ("prefill", "decode")):
        why = f": its copy server did not start ({R.one_line(tp.copy_error, 160)})" if tp.copy_error else ""
        sentence += (f" The A/A control did not run{why}; so each point is judged by its own 10-90% interval against 1, "
                     "and nothing in this run shows that this setup tells equal from different.")
    if cpu_emulation:
        sentence += " These are CPU timings of the plain-torch emulation: they say nothing about the kernel's speed on a GPU."
    elif res.metrics.get("context", {}).get("on_gpu") is False:  # servers (the stand-in's) timed in a run on the CPU
        sentence += (" These are CPU timings (this run's device is the CPU; 04 gives them no verdict): faster and slower "
                     "say how the points compare with the A/A spread here, nothing about speed on a GPU.")
    return sentence


def _figure(v: R.Verdict) -> str:
    unit = f" {v.unit}" if v.unit else ""
    origin = (", the accepted-precision control's" if ACCEPTED_PRECISION_WORDS in v.source
              else ", a published target" if v.source.startswith("published target") else "")
    return f"{v.name} {R.format_number(v.value)}{unit} (limit {v.comparison} {R.format_number(v.threshold)}{unit}{origin})"


def accuracy_sentence(results: list[R.Results]) -> str:
    checks = _accuracy(results)
    if not checks:
        return "Accuracy was not measured in this run."
    failing = [v for v in checks if not v.passed]
    if failing:
        shown = failing
        head = f"In accuracy, {len(failing)} of {len(checks)} checks fail: "
    else:  # the first accuracy check of each notebook: its headline figure
        shown = [r.of_kind("accuracy")[0] for r in results if r.of_kind("accuracy")]
        head = f"In accuracy, all {len(checks)} checks pass; headline figures: "
    return head + "; ".join(_figure(v) for v in shown[:5]) + (f"; and {len(shown) - 5} more" if len(shown) > 5 else "") + "."


def failures_sentence(results: list[R.Results]) -> str:
    failed_nb = [r.notebook for r in results if r.status == "failed"]
    failing = {r.notebook: [v for v in r.verdicts if not v.passed] for r in results}
    failing = {nb: vs for nb, vs in failing.items() if vs}
    total = sum(len(r.verdicts) for r in results)
    if not failing and not failed_nb:
        return f"All {total} checks pass."
    parts = []
    for nb, vs in failing.items():
        means = FAILURE_MEANS.get(nb, "see the notebook")
        if all(v.kind == "coverage" for v in vs):
            means = "too few points of the sweep ran" if nb == "04_throughput" else "part of what it measures could not run"
        elif all(v.kind == "speed" for v in vs):
            means = "the backend's kernel path spends more time around the kernel than its target allows"
        elif all(v.id.startswith("tasks.") and v.kind == "control" for v in vs):
            means = "a task the baseline cannot answer above its reference level, so its delta says nothing either way"
        parts.append(f"{nb} ({len(vs)}: {means})")
    text = ""
    if parts:
        text = f"{sum(len(v) for v in failing.values())} of {total} checks fail, meaning for the candidate: " + "; ".join(parts) + "."
    if failed_nb:
        text += (" " if text else "") + (f"{len(failed_nb)} notebook(s) failed ({', '.join(failed_nb)}): their checks are "
                                          "missing, so this reading is incomplete.")
    return text


def _path_figure(row: dict[str, Any]) -> str:
    if row.get("route_kernel_calls"):
        return f"{row['route_kernel_calls']} kernel call(s) where its counters say {row['route']}"
    kernel = row.get("kernel") or {}
    if kernel.get("violations"):
        return "kernel calls outside the kernel's contract: " + "; ".join(kernel["violations"])
    if kernel and not kernel.get("step_calls"):
        return "no kernel call: another kernel served it"
    flagged = (row.get("replay") or {}).get("flagged")
    if flagged:
        return "the kernel disagrees with its emulation at " + "; ".join(flagged)
    integration = row.get("integration") or {}
    if integration and integration.get("passed") is False and row.get("output_passed") is not False:
        return f"{integration['ratio_low']:.2f}× a correct integration's error ({integration['emulation']}) at least"
    if row.get("excess") is not None:
        return f"{row['excess']:.2f}× its control at least"
    if row.get("vs_baseline_mean") is not None:
        return f"mean |candidate - baseline| {row['vs_baseline_mean']:.3g} nats"
    return "failed"


def code_path_sentence(results: list[R.Results]) -> str:
    """Which code paths fail (with their figure) and which were not exercised (with why)."""
    res = next((r for r in results if r.notebook == "10_code_paths"), None)
    if res is None:
        return "Code paths were not judged one by one in this run (10_code_paths did not run)."
    if res.status != "ok":
        return f"Code paths were not judged: 10_code_paths {res.status} ({(res.reason or '').strip()[:160]})."
    cp = CodePathResults.read(res)
    failing, idle = cp.failing(), cp.not_exercised()
    ran = [r for r in cp.rows if r["exercised"]]
    text = (f"Code paths: {len(ran) - len(failing)} of {len(ran)} exercised pass"
            + ("; failing: " + "; ".join(f"{r['title']} ({_path_figure(r)})" for r in failing) if failing else ""))
    if idle:
        text += "; not exercised: " + "; ".join(f"{r['title']} ({r['why_not']})" for r in idle)
    routed = [r["title"] for r in ran if r.get("route")]
    if routed:
        text += (f"; judged on the dispatch rule's Triton route, not on the kernel: {', '.join(routed)}")
    return text + "."


def accurate(results: list[R.Results]) -> bool:
    """Whether the run shows the candidate accurate: accuracy checks ran and all pass, and no code path fails (what
    the reading calls "accurate by these checks"; the PR summary marks only such a run with a pass)."""
    paths = CodePathResults.read(next((r for r in results if r.notebook == "10_code_paths"), None))
    acc = _accuracy(results)
    return bool(acc) and all(v.passed for v in acc) and not (paths and paths.failing())


def overall_sentence(results: list[R.Results], res: R.Results | None) -> str:
    paths = CodePathResults.read(next((r for r in results if r.notebook == "10_code_paths"), None))
    if paths and paths.failing():
        worst = paths.failing()[0]
        return (f"Reading: not a drop-in replacement, whatever the other checks say: the {worst['title']} path fails "
                f"({_path_figure(worst)}).")
    acc_fail = [v for v in _accuracy(results) if not v.passed]
    acc_ran = bool(_accuracy(results))
    tp = ThroughputResults.read(res)
    rows = tp.points("candidate") if tp else []
    faster = [p for phase in ("prefill", "decode") for p in _phase_points(rows, phase) if p["verdict"] == "faster"]
    aa_failed = bool(tp and tp.aa_failed)
    if acc_fail:
        return f"Reading: not a drop-in replacement here; {len(acc_fail)} accuracy check(s) fail."
    if not acc_ran:
        return "Reading: no accuracy check ran, so nothing here says the candidate is safe to enable."
    if not rows:
        return "Reading: accurate by these checks; its speed was not measured here."
    if aa_failed:
        return "Reading: accurate by these checks; whether it is faster, this setup's timing cannot tell."
    if not faster:
        return "Reading: accurate by these checks, but not faster at any measured point, so no speed reason to enable it here."
    return "Reading: accurate by these checks, and worth enabling where it is faster (above)."


def parts(results: Iterable[R.Results], params: dict[str, Any]) -> dict[str, str]:
    """The opening's sentences by what they say (speed, accuracy, paths, failures, overall), from this run's results
    (the summary notebook's own results left out)."""
    res = [r for r in results if r.notebook != R.SUMMARY_NOTEBOOK]
    tp = next((r for r in res if r.notebook == "04_throughput"), None)
    baseline, candidate = labels(params)
    env = next((r.metrics for r in res if r.notebook == "00_environment"), {})
    device = env.get("device") or params.get("device")
    # in process on a CPU the candidate is an emulation; a server engine's timings are the servers', whatever ran here
    cpu_emulation = not engine_facts(res, params)["serves"] and str(device).startswith("cpu")
    return {
        "speed": speed_sentence(tp, candidate, baseline, cpu_emulation),
        "accuracy": accuracy_sentence(res),
        "paths": code_path_sentence(res),
        "failures": failures_sentence(res),
        "overall": overall_sentence(res, tp),
    }


def sentences(results: Iterable[R.Results], params: dict[str, Any]) -> list[str]:
    """Three to six sentences (:func:`parts` in order)."""
    return [s for s in parts(results, params).values() if s]
