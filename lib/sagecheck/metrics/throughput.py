"""Prefill and decode speed of two attention implementations on identical inputs, interleaved.

For each (input length, batch size) point, every repeat runs the baseline and the
candidate back to back, alternating which goes first, so that a drift of the machine
(clocks, temperature, other tenants) hits both alike. One repeat is:

* prefill: the prompts ``[batch, length]`` through the model with a fresh KV cache and
  the first token picked (time to first token, TTFT);
* decode: ``decode_tokens`` greedy steps through that cache, one token per sequence.

Times come from CUDA events on a GPU (a monotonic clock on the CPU) after ``warmup``
untimed repeats, with Python's garbage collector paused for the point. On a GPU, profiled
repeats can give the GPU's busy time too; they run after every timed repeat of the sweep
(see :func:`sweep`). A point that runs out of memory or that the implementation does not
support is recorded as such and the sweep goes on.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sagecheck import backend_stats
from sagecheck.attention import AttentionUnavailable, UnsupportedCall
from sagecheck.engines import SERVERS
from sagecheck.gpu_clocks import CLOCK_STEP_MHZ, ClockLog, limit_words, paired_clock_gaps, sign_test_p
from sagecheck.metrics.timing import (Samples, Stopwatch, gc_paused, gpu_busy_ms, progress_logger, random_prompts,
                                      speedup_fields, timing_row)


if TYPE_CHECKING:  # torch is imported where it is used: the report reads ThroughputResults without it
    import torch


def _wall_ms(fn: Any, device: torch.device) -> float:
    with Stopwatch(device) as sw:
        fn()
    return sw.ms


def _one_repeat(backend: Any, prompts: torch.Tensor, decode_tokens: int, device: torch.device,
                kernel_time: bool = False, stamps: list[float] | None = None) -> tuple[float, float]:
    """(prefill ms, decode ms) of one repeat: elapsed time, or with ``kernel_time`` the GPU's busy time. ``stamps``: the
    repeat's start, the prefill's end and the decode's end (unix seconds, each after the GPU finished) are put in it."""
    state: dict[str, Any] = {}

    def prefill() -> None:
        logits, state["cache"] = backend.prefill(prompts)
        state["tokens"] = logits.argmax(-1)

    def decode() -> None:
        for _ in range(decode_tokens):
            logits, state["cache"] = backend.decode_step(state["tokens"], state["cache"])
            state["tokens"] = logits.argmax(-1)

    measure = gpu_busy_ms if kernel_time else _wall_ms
    t0 = time.time()
    pre = measure(prefill, device)
    t1 = time.time()
    dec = measure(decode, device)
    if stamps is not None:
        stamps[:] = [t0, t1, time.time()]
    state.clear()
    return pre, dec


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_point(engine: Any, implementations: tuple[str, str], batch: int, length: int, decode_tokens: int,
                  repeats: int, warmup: int, seed: int,
                  windows: list[tuple[str, float, float, float]] | None = None) -> dict[str, Any]:
    """Elapsed-time samples of both implementations at one point, or a status.

    ``{"status": "ok", "samples": {impl: {"prefill": Samples, "decode": Samples}}}``, else
    ``{"status": "out of memory" | "unsupported", "error": ...}``. ``windows``: each timed repeat's (implementation,
    start, prefill's end, decode's end) is appended to it (:mod:`sagecheck.gpu_clocks`).
    """
    import torch

    device = engine.device
    prompts = random_prompts(engine.model_config().vocab_size, batch, length, seed, device)
    samples: dict[str, dict[str, list[float]]] = {impl: {"prefill": [], "decode": []} for impl in implementations}
    clock = Stopwatch(device).clock
    try:
        with gc_paused():  # once per point: a repeat leaves no cyclic garbage (tested)
            for r in range(warmup + repeats):
                order = implementations if r % 2 == 0 else implementations[::-1]
                for impl in order:
                    stamps: list[float] = []
                    with engine.backend(impl) as backend:
                        pre, dec = _one_repeat(backend, prompts, decode_tokens, device, stamps=stamps)
                    if r >= warmup:
                        samples[impl]["prefill"].append(pre)
                        samples[impl]["decode"].append(dec)
                        if windows is not None:
                            windows.append((impl, *stamps))
    except torch.cuda.OutOfMemoryError as e:
        _free(device)
        return {"status": "out of memory", "error": str(e).splitlines()[0][:200]}
    except (AttentionUnavailable, UnsupportedCall) as e:
        _free(device)
        return {"status": "unsupported", "error": str(e)[:200]}
    _free(device)
    return {"status": "ok",
            "samples": {impl: {k: Samples(np.asarray(v), clock) for k, v in s.items()} for impl, s in samples.items()}}


def profile_point(engine: Any, implementations: tuple[str, str], batch: int, length: int, decode_tokens: int,
                  seed: int) -> dict[str, Any]:
    """The GPU's busy time of prefill and decode, one profiled repeat per implementation (after a warm one).

    ``{"samples": {impl: {"prefill_gpu": Samples, "decode_gpu": Samples}}}``, or ``{"error": why}``:
    the busy time is an extra, a point keeps its elapsed times without it.
    """
    device = engine.device
    prompts = random_prompts(engine.model_config().vocab_size, batch, length, seed, device)
    out: dict[str, dict[str, Samples]] = {}
    try:
        with gc_paused():
            for impl in implementations:
                with engine.backend(impl) as backend:
                    _one_repeat(backend, prompts, decode_tokens, device)  # warm: the sweep's last point was another
                    pre, dec = _one_repeat(backend, prompts, decode_tokens, device, kernel_time=True)
                out[impl] = {"prefill_gpu": Samples(np.asarray([pre]), "cuda-kernel-time"),
                             "decode_gpu": Samples(np.asarray([dec]), "cuda-kernel-time")}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    finally:
        _free(device)
    return {"samples": out}


def _with_busy_time(point: dict[str, Any], profile: dict[str, Any]) -> None:
    """Merge :func:`profile_point`'s result into a timed point."""
    if profile.get("error"):
        point["kernel_time_error"] = profile["error"]
        return
    for impl, s in profile["samples"].items():
        point["samples"][impl].update(s)


def point_records(point: dict[str, Any], implementations: tuple[str, str], batch: int, length: int, decode_tokens: int) -> list[dict[str, Any]]:
    """Table rows of one point: per implementation tokens/s, TTFT, and the candidate's speedup with its spread."""
    base, cand = implementations
    if point["status"] != "ok":
        return [{"batch": batch, "input_length": length, "implementation": impl, "status": point["status"],
                 "error": point.get("error", "")} for impl in implementations]
    s = point["samples"]
    rows = [timing_row(batch, length, impl, s[impl]["prefill"], s[impl]["decode"], decode_tokens,
                       s[impl].get("prefill_gpu"), s[impl].get("decode_gpu")) for impl in implementations]
    rows[1].update(speedup_fields(s[base], s[cand]))
    if point.get("kernel_time_error"):
        for r in rows:
            r["kernel_time_error"] = point["kernel_time_error"]
    return rows


def summary(rows: list[dict[str, Any]], candidate: str) -> dict[str, Any]:
    """The sweep in a few figures: points run and not run, and medians over the points that ran.

    Speedups are the candidate's rows' (None where no point ran); the GPU-busy share is the
    median over both implementations' rows that were profiled (None where none was).
    """
    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    cand = [r for r in rows if r["implementation"] == candidate and r["status"] == "ok"]
    points = {(r["batch"], r["input_length"]) for r in rows}
    not_run = {(r["batch"], r["input_length"]) for r in rows if r["status"] != "ok"}
    return {
        "points": len(points),
        "points_not_run": len(not_run),
        "prefill_speedup_median_over_points": median([r["prefill_speedup"] for r in cand]),
        "decode_speedup_median_over_points": median([r["decode_speedup"] for r in cand]),
        "decode_kernel_speedup_median_over_points": median([r["decode_kernel_speedup"] for r in cand if "decode_kernel_speedup" in r]),
        "decode_gpu_busy_pct_median": median([r["decode_gpu_busy_pct"] for r in rows if "decode_gpu_busy_pct" in r]),
    }


def repeat_agreement(first: dict[str, Any], again: dict[str, Any], implementations: tuple[str, str],
                     tolerance_pct: float = 3.0) -> dict[str, Any]:
    """Relative differences (%) between two measurements of the same point (medians).

    ``max_diff_pct``: the largest elapsed-time difference. ``verdict_diff_pct``: the largest
    difference of the figures that measure the GPU's work. An elapsed time does where the
    GPU was idle for less than ``tolerance_pct`` % of it: the host's gaps cannot then move it
    by the tolerance. Where the GPU idled longer, the host set the pace (or came close), and
    the host's own speed would be judged: it can change by more than the tolerance between two consecutive
    measurements with nothing between them (``benchmarks/profiler_aftereffect.py``, its control; README, GPU runs);
    the GPU's busy time is taken instead. ``basis`` says which for each, ``judged`` names the
    figures taken, ``medians_ms`` gives the two medians (first, again) of every figure, in ms.
    """
    if first["status"] != "ok" or again["status"] != "ok":
        return {"max_diff_pct": float("nan"), "verdict_diff_pct": float("nan"), "basis": {}, "judged": [], "medians_ms": {}}

    medians: dict[str, list[float]] = {}

    def diff(impl: str, kind: str) -> float:
        a, b = first["samples"][impl][kind].median, again["samples"][impl][kind].median
        medians[f"{impl}:{kind}"] = [a, b]
        return 100.0 * abs(b - a) / a

    out: dict[str, Any] = {}
    basis: dict[str, str] = {}
    judged = []
    for impl in implementations:
        have = first["samples"][impl]
        for kind in ("prefill", "decode"):
            key = f"{impl}:{kind}"
            out[key] = diff(impl, kind)
            chosen_key, basis[key] = key, "elapsed time"
            if f"{kind}_gpu" in have and f"{kind}_gpu" in again["samples"][impl]:
                out[f"{key}_gpu"] = diff(impl, f"{kind}_gpu")
                busy = 100.0 * have[f"{kind}_gpu"].median / have[kind].median
                if 100.0 - busy >= tolerance_pct:
                    chosen_key, basis[key] = f"{key}_gpu", f"GPU busy time (GPU idle {100 - busy:.0f}% of the elapsed time)"
                else:
                    basis[key] = f"elapsed time (GPU idle {max(0.0, 100 - busy):.1f}%)"
            judged.append(chosen_key)
    out["max_diff_pct"] = max(out[f"{impl}:{kind}"] for impl in implementations for kind in ("prefill", "decode"))
    out["verdict_diff_pct"] = max(out[k] for k in judged)
    out["basis"], out["judged"] = basis, judged
    out["medians_ms"] = medians
    return out


def stability_rows(stability: dict[str, Any], on_gpu: bool = True) -> list[dict[str, Any]]:
    """The repeat check as table rows: each figure's two medians (ms), their difference, and whether the verdict took
    it (on the CPU there is no verdict, and the column says so)."""
    judged = set(stability.get("judged", []))

    def said(key: str) -> str:
        if not on_gpu:
            return "no: CPU timings, no verdict"
        return "yes" if key in judged else ""

    return [{"figure": key.removesuffix("_gpu") + (" GPU busy time" if key.endswith("_gpu") else " elapsed"),
             "first_ms": first, "again_ms": again, "diff_pct": stability[key], "judged": said(key)}
            for key, (first, again) in stability.get("medians_ms", {}).items()]


def sweep(engine: Any, implementations: tuple[str, str], lengths: list[int], batches: list[int], decode_tokens: int,
          repeats: int, warmup: int, seed: int, repeat_point: bool = True, kernel_time: str = "repeated",
          tolerance_pct: float = 3.0, progress_log: str | Path | None = None,
          clocks: ClockLog | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (length, batch) point, then the largest point that ran measured once more.

    Returns the table rows (with each point's wall time, warm-up included) and the
    stability record of the repeated point ({} when not repeated). The largest point is
    the most GPU-bound and least launch-bound one; ``tolerance_pct`` is the repeat check's
    (see :func:`repeat_agreement`).

    ``kernel_time`` ("all", "repeated", "off"): where the GPU busy time of prefill and
    decode is profiled on a GPU: every point, the repeated point (both times), or none.
    Profiling comes last, after every timed repeat: after one profiled repeat, a host-paced decode runs slower for
    the rest of the process (README, GPU runs; ``benchmarks/profiler_aftereffect.py``; pytorch/pytorch#144455 reports CUPTI staying
    attached as the cause). The repeated point's two profiled repeats therefore run back to
    back at the end. Each finished step appends a line to
    ``progress_log`` so a long sweep can be watched, and what ran is known if it is cut off. ``clocks``: an open GPU
    clock log, whose samples of each implementation's timed prefills and decodes go in its rows.
    """
    log = progress_logger(progress_log)
    if kernel_time not in ("all", "repeated", "off"):
        raise ValueError(f"kernel_time must be all, repeated or off; got {kernel_time!r}")

    points: dict[tuple[int, int], dict[str, Any]] = {}
    walls: dict[tuple[int, int], float] = {}
    windows: dict[tuple[int, int], list[tuple[str, float, float, float]]] = {}
    for length in lengths:
        for batch in batches:
            t0 = time.perf_counter()
            windows[(batch, length)] = []
            point = measure_point(engine, implementations, batch, length, decode_tokens, repeats, warmup, seed,
                                  windows[(batch, length)])
            walls[(batch, length)] = time.perf_counter() - t0
            points[(batch, length)] = point
            log(f"batch {batch} length {length}: {point['status']} in {walls[(batch, length)]:.1f} s")

    measured = [k for k, v in points.items() if v["status"] == "ok"]
    repeated = max(measured, key=lambda p: p[0] * p[1]) if repeat_point and measured else None
    again = None
    if repeated is not None:
        again = measure_point(engine, implementations, *repeated, decode_tokens, repeats, warmup, seed)
        log(f"batch {repeated[0]} length {repeated[1]} again: {again['status']}")

    if engine.device.type == "cuda" and kernel_time != "off":
        targets = measured if kernel_time == "all" else ([repeated] if repeated is not None else [])
        for b, n in targets:
            t0 = time.perf_counter()
            _with_busy_time(points[(b, n)], profile_point(engine, implementations, b, n, decode_tokens, seed))
            if (b, n) == repeated and again["status"] == "ok":
                _with_busy_time(again, profile_point(engine, implementations, b, n, decode_tokens, seed))
            log(f"batch {b} length {n}: GPU busy time profiled in {time.perf_counter() - t0:.1f} s "
                f"{points[(b, n)].get('kernel_time_error', '')}")

    rows: list[dict[str, Any]] = []
    for (batch, length), point in points.items():
        new = point_records(point, implementations, batch, length, decode_tokens)
        for r in new:
            r["point_wall_s"] = walls[(batch, length)]
            if clocks is not None and r["status"] == "ok":
                r.update(clocks.phase_fields(windows[(batch, length)], r["implementation"]))
        rows += new
    stability: dict[str, Any] = {}
    if repeated is not None:
        stability = {"batch": repeated[0], "input_length": repeated[1],
                     **repeat_agreement(points[repeated], again, implementations, tolerance_pct)}
        log(f"batch {repeated[0]} length {repeated[1]}: largest difference of medians {stability['max_diff_pct']:.2f}% "
            f"elapsed, {stability['verdict_diff_pct']:.2f}% by the verdict's basis")
    return rows, stability


# --------------------------------------------------------------------------- 04_throughput: either engine


@dataclass
class Sweep:
    """04's measurement, whichever engine ran it."""

    rows: list[dict[str, Any]]
    baseline: str
    candidate: str
    lengths: list[int]
    batches: list[int]
    context: str  # what ran where, for every caption
    where: str = ""  # where alone (device, dtype): the figures' second title line (their first names what is compared)
    served: dict[str, Any] = field(default_factory=dict)  # servers: the servers measured, their order and clock
    stability: dict[str, Any] = field(default_factory=dict)  # in process: the repeated point
    copy: str | None = None  # servers: the baseline's copy (A/A control)
    on_gpu: bool = True  # False: CPU timings, which get no verdict
    gpu_clocks: dict[str, Any] = field(default_factory=dict)  # what the GPU clock log logged (ClockLog.facts)

    @property
    def candidate_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["implementation"] == self.candidate and r["status"] == "ok"]


def compared_words(engine: Any, p: Any) -> str:
    if SERVERS in engine.capabilities:
        return f"{engine.candidate} vs {engine.baseline} ({engine.name} servers)"
    return f"candidate {engine.candidate} in phases: {', '.join(p.candidate_phases)}"


def run(engine: Any, p: Any, where: str, on_gpu: bool, progress_log: str | Path | None = None) -> Sweep:
    """Every point of the sweep on ``engine``: interleaved servers with an A/A copy where the engine serves, else the
    in-process pair with CUDA events (and the repeated point)."""
    lengths = p.input_lengths if on_gpu else p.cpu_input_lengths
    batches = p.batch_sizes if on_gpu else p.cpu_batch_sizes
    context = f"{where}, {compared_words(engine, p)}"
    if SERVERS in engine.capabilities:
        from sagecheck.metrics import serving

        rows, served = serving.sweep(engine, lengths, batches, p.decode_tokens, p.repeats, p.warmup, p.seed,
                                     aa_control=p.aa_control, max_batch_tokens=p.max_batch_tokens, progress_log=progress_log)
        return Sweep(rows, engine.baseline, engine.candidate, lengths, batches, context, where, served=served,
                     copy=engine.copy if p.aa_control else None, on_gpu=on_gpu, gpu_clocks=served.pop("gpu_clocks", {}))
    with ClockLog(*engine.timed_gpus()) as clocks:
        rows, stability = sweep(engine, engine.pair, lengths, batches, p.decode_tokens, p.repeats, p.warmup, p.seed,
                                repeat_point=p.repeat_point, kernel_time=p.kernel_time, tolerance_pct=p.stability_max_pct,
                                progress_log=progress_log, clocks=clocks)
    return Sweep(rows, engine.baseline, engine.candidate, lengths, batches, context, where, stability=stability,
                 on_gpu=on_gpu, gpu_clocks=clocks.facts())


def tables(s: Sweep) -> list[tuple[list[dict[str, Any]], str, list[str]]]:
    """(rows, caption, columns) of every table 04 shows, in order."""
    out = []
    if s.served:
        out.append(([{"server": k, **v} for k, v in s.served["servers"].items()],
                    f"The servers measured ({s.served['order']}; {s.served['clock']})", []))
    cols = ["input_length", "batch", "ttft_ms", "prefill_tok_s", "prefill_speedup", "prefill_speedup_p10", "prefill_speedup_p90"]
    cand = s.candidate_rows
    if s.copy:  # each phase with its A/A control: one table each, so that neither runs off a 1400-px page
        cols += ["aa_prefill_speedup", "prefill_vs_aa"]
        if any(r.get("prefill_on") for r in cand):  # where its prefill ran, by its server's counters
            cols[2:2] = ["prefill_on"]
        out.append((cand, f"Candidate {s.candidate} vs {s.baseline}, prefill — {s.context}", cols))
        out.append((cand, f"Candidate {s.candidate} vs {s.baseline}, decode — {s.context}",
                    ["input_length", "batch", "decode_ms_per_token", "decode_tok_s_total", "decode_speedup", "decode_speedup_p10",
                     "decode_speedup_p90", "aa_decode_speedup", "decode_vs_aa"]))
    else:
        cols += ["decode_tok_s_per_seq", "decode_tok_s_total", "decode_speedup", "decode_speedup_p10", "decode_speedup_p90"]
        out.append((cand, f"Candidate {s.candidate} vs {s.baseline} — {s.context}", cols))
    busy = [c for c in ("prefill_gpu_busy_pct", "prefill_kernel_speedup", "decode_gpu_ms_per_token", "decode_gpu_busy_pct",
                        "decode_kernel_speedup") if any(c in r for r in cand)]
    if busy:
        out.append((cand, f"GPU busy time (one profiled repeat per point): {s.candidate} vs {s.baseline} — {s.context}",
                    ["input_length", "batch", *busy]))
    others = [r for r in s.rows if r["implementation"] != s.candidate and r["status"] == "ok"]
    out.append((others, f"Baseline{' and its A/A copy' if s.copy else ''} — {s.context}",
                ["input_length", "batch", "implementation", *(["attention_backend"] if s.served else []), "ttft_ms",
                 "prefill_tok_s", "decode_tok_s_per_seq", "decode_tok_s_total", "prefill_spread_pct", "decode_spread_pct",
                 *[c for c in ("decode_gpu_ms_per_token", "decode_gpu_busy_pct") if any(c in r for r in others)]]))
    clocked = [r for r in s.rows if r["status"] == "ok" and "decode_clock_samples" in r]
    if clocked:
        out.append((clocked, f"GPU clocks while each ran (SM clock sampled every {s.gpu_clocks.get('interval_ms')} ms: "
                             f"median MHz and samples; limited: the share of samples the driver held the clock down for "
                             f"power or heat) — {s.context}", CLOCK_COLUMNS))
    failed = [r for r in s.rows if r["status"] != "ok"]
    if failed:
        out.append((failed, "Points that did not run", ["input_length", "batch", "implementation", "status", "error"]))
    if s.stability:
        out.append((stability_rows(s.stability, s.on_gpu), f"The same point measured twice: batch {s.stability['batch']}, length "
                    f"{s.stability['input_length']} (medians) — {s.context}", ["figure", "first_ms", "again_ms", "diff_pct", "judged"]))
    return out


CLOCK_COLUMNS = ["input_length", "batch", "implementation", "prefill_sm_mhz", "prefill_clock_limited_pct",
                 "prefill_clock_samples", "decode_sm_mhz", "decode_sm_min_mhz", "decode_clock_limited_pct",
                 "decode_clock_samples"]


# a clock lower in no more repeats than chance gives at this level (a one-sided sign test) is not named
CLOCK_LOWER_P = 0.05


def lower_decode_clocks(s: Sweep) -> list[dict[str, Any]]:
    """The points where the candidate decoded at a lower SM clock than the baseline in the same repeats: by two clock
    steps or more (median of the paired per-repeat differences), in more repeats than chance gives (one-sided sign test,
    p < :data:`CLOCK_LOWER_P`), and by more than the A/A copy's own median difference from the baseline there.

    Under a power cap the clock swings from repeat to repeat on every server alike (on an H100 at 128 x 32 the three
    servers' medians lay 90 MHz apart with the same prefill kernel on all three, 2026-12-05): a gap of medians alone
    names such points. A row without per-repeat clocks (``decode_sm_mhz_by_repeat``) is not judged."""
    by = {(r["batch"], r["input_length"], r["implementation"]): r for r in s.rows
          if r["status"] == "ok" and r.get("decode_sm_mhz") is not None}
    out = []
    for (b, n, impl), cand in by.items():
        base = by.get((b, n, s.baseline))
        if impl != s.candidate or base is None:
            continue
        gaps = paired_clock_gaps(base.get("decode_sm_mhz_by_repeat"), cand.get("decode_sm_mhz_by_repeat"))
        if not gaps:
            continue
        copy = by.get((b, n, s.copy)) if s.copy else None
        aa_gaps = (paired_clock_gaps(base.get("decode_sm_mhz_by_repeat"), copy.get("decode_sm_mhz_by_repeat"))
                   if copy else None)
        gap, aa_gap = float(np.median(gaps)), abs(float(np.median(aa_gaps))) if aa_gaps else 0.0
        lower, higher = sum(g > 0 for g in gaps), sum(g < 0 for g in gaps)
        p = sign_test_p(lower, higher)
        if gap >= 2 * CLOCK_STEP_MHZ and p < CLOCK_LOWER_P and gap > aa_gap:
            out.append({"batch": b, "input_length": n, "candidate_mhz": cand["decode_sm_mhz"],
                        "baseline_mhz": base["decode_sm_mhz"], "copy_mhz": copy["decode_sm_mhz"] if copy else None,
                        "median_gap_mhz": gap, "copy_gap_mhz": aa_gap if aa_gaps else None,
                        "lower_in_repeats": lower, "paired_repeats": len(gaps), "sign_test_p": p,
                        "candidate_limited_pct": cand.get("decode_clock_limited_pct"),
                        "baseline_limited_pct": base.get("decode_clock_limited_pct"),
                        "decode_speedup": cand.get("decode_speedup")})
    return sorted(out, key=lambda r: (r["input_length"], r["batch"]))


def clock_words(s: Sweep) -> str | None:
    """What the GPU clock log logged, or why nothing; and where the candidate decoded at a lower clock than the
    baseline (its decode speedup there includes the clock). None where the sweep has no record of the log."""
    from sagecheck.results import format_number

    c = s.gpu_clocks
    if not c:
        return None
    if not c.get("logged"):
        return f"GPU clocks: not logged ({c.get('why_not') or 'no reason given'})."
    gpus = ", ".join(f"{g['index']} ({', '.join(x for x in (g['name'], limit_words(g)) if x)})" for g in c.get("gpus", []))
    turns = "the servers take turns on it" if s.served else "the implementations take turns"
    words = (f"GPU clocks: SM clock, power and the driver's reasons for holding the clock down sampled every "
             f"{c['interval_ms']} ms through {c.get('source', 'NVML')} on GPU {gpus}, {c['samples']} samples; each row's "
             f"are those taken while its own timed requests ran ({turns}).")
    if c.get("why_not"):
        words += f" The log ended early: {c['why_not']}."
    words += (f" The candidate's decode clock counts as lower than the baseline's at a point where, over the same "
              f"repeats, it was lower by {2 * CLOCK_STEP_MHZ} MHz or more (median of the per-repeat differences), in "
              f"more repeats than chance gives (sign test, p < {CLOCK_LOWER_P}) and by more than the A/A copy's "
              f"difference.")
    lower = lower_decode_clocks(s)
    if lower:
        points = "; ".join(
            f"{r['input_length']} x {r['batch']}: {r['candidate_mhz']:.0f} against {r['baseline_mhz']:.0f} MHz"
            + (f" (A/A copy {r['copy_mhz']:.0f})" if r["copy_mhz"] is not None else "")
            + f", lower in {r['lower_in_repeats']} of {r['paired_repeats']} repeats"
            + f", held down in {format_number(r['candidate_limited_pct'])}% and {format_number(r['baseline_limited_pct'])}% "
              f"of the samples, decode speedup {format_number(r['decode_speedup'])}" for r in lower)
        words += (f" **The candidate decoded at a lower SM clock than the baseline** at {points}. Its decode speedup "
                  f"there includes that clock: a prefill that draws more power just before a decode lowers the clock "
                  f"the decode runs at (a power cap), whether or not the decode's own work differs.")
    else:
        words += " It was lower at no point."
    return words


def speedup_maps(s: Sweep) -> list[tuple[str, str]]:
    """(field, title) of each speedup heat map 04 draws: the candidate's, and the A/A control's where there is one."""
    speedup, aa = f"{s.candidate} / {s.baseline}", f"{s.copy} / {s.baseline}"
    maps = [("prefill_speedup", f"prefill speedup ({speedup})"), ("decode_speedup", f"decode speedup, elapsed ({speedup})"),
            ("decode_kernel_speedup", f"decode speedup in GPU busy time ({speedup})"),
            ("aa_prefill_speedup", f"A/A control: prefill ({aa}, must be 1)"), ("aa_decode_speedup", f"A/A control: decode ({aa}, must be 1)")]
    return [(key, f"{label}\n{s.where}" if s.where else label) for key, label in maps
            if any(key in r for r in s.candidate_rows)]


def map_notes(s: Sweep, key: str) -> np.ndarray | None:
    """Under each cell of the prefill speedup map (``key`` of :func:`speedup_maps`), where the candidate's prefill did not
    run on its kernel (its server's counters, :func:`sagecheck.backend_stats.prefill_route`): a speedup there measures
    the integration, not the kernel. None for the other maps, where the candidate counts nothing or where it ran every
    point on its kernel."""
    _, elsewhere = backend_stats.off_kernel(s.candidate_rows)
    if key != "prefill_speedup" or not elsewhere:
        return None
    notes = np.full((len(s.batches), len(s.lengths)), "", dtype=object)  # laid out as plots.grid lays out the values
    for r in elsewhere:
        if r["batch"] in s.batches and r["input_length"] in s.lengths:
            notes[s.batches.index(r["batch"]), s.lengths.index(r["input_length"])] = f"on {r['prefill_on'].split(' (')[0]}"
    return notes


# --------------------------------------------------------------------------- the candidate's dispatch rule (servers)

INTEGRATION_SOURCE = ("target set for sagecheck's sage_attn (throughput.integration_max_pct): its attention per layer "
                      "close to the bare kernel's own time at the same shape, where the kernel beats Triton's; on the GPU's "
                      "own time where the server measured it (the host runs ahead of a prefill long enough for the kernel "
                      "to pay)")


def dispatch_rows(s: Sweep) -> list[dict[str, Any]]:
    """The candidate server's measurement at start (its dispatch rule's, :meth:`~sagecheck.engines.Backend.dispatch`):
    per request length, ms per layer of its kernel path (what serving runs: smoothing, padding, the calls), of the bare
    kernel on inputs prepared beforehand and of Triton's extend kernel; the path's time over the bare kernel's; whether
    the bare kernel beats Triton there; and where the rule sends one request of that length; where the server measured
    them, both paths for a request of as many keys whose first half is a cached prefix, and its route. Empty where the
    candidate has no rule or measured nothing (a crossover set by hand)."""
    measured = ((s.served or {}).get("dispatch") or {}).get("measured") or {}
    lengths = measured.get("lengths") or []
    path, bare, triton = (measured.get(k) or [None] * len(lengths) for k in ("kernel_ms", "kernel_alone_ms", "triton_ms"))
    keys, mode = measured.get("keys"), measured.get("mode")
    # the rule's own answer per length (the plugin's ``routes``); a server of before it wrote them: the one crossover
    routes = measured.get("routes") or ["kernel" if mode == "kernel" or (keys is not None and n >= keys) else "Triton"
                                        for n in lengths]
    prefix_routes = measured.get("prefix_routes")
    prefix_path, prefix_triton = (measured.get(k) or [None] * len(lengths) for k in ("prefix_kernel_ms", "prefix_triton_ms"))
    # the same two on the GPU alone, the host ahead (a server of before them did not measure them)
    path_dev, bare_dev = (measured.get(k) or [None] * len(lengths) for k in ("kernel_device_ms", "kernel_alone_device_ms"))
    rows = []
    for i, (n, p_ms, b_ms, t_ms) in enumerate(zip(lengths, path, bare, triton)):
        row = {"keys_per_request": n, "kernel_path_ms": p_ms, "bare_kernel_ms": b_ms, "triton_ms": t_ms,
               "path_over_bare_pct": (p_ms / b_ms - 1) * 100 if p_ms and b_ms else None,
               "bare_kernel_beats_triton": bool(b_ms is not None and t_ms is not None and b_ms <= t_ms),
               "sent_to": routes[i]}
        if measured.get("device_timing"):
            pd, bd = path_dev[i], bare_dev[i]
            row.update({"kernel_path_gpu_ms": pd, "bare_kernel_gpu_ms": bd,
                        "path_over_bare_gpu_pct": (pd / bd - 1) * 100 if pd and bd else None})
        if prefix_routes:  # the same keys, the first half a cached prefix (the split's path)
            row.update({"prefix_kernel_path_ms": prefix_path[i], "prefix_triton_ms": prefix_triton[i],
                        "prefix_sent_to": prefix_routes[i]})
        rows.append(row)
    return rows


def dispatch_words(s: Sweep, limit_pct: float) -> str | None:
    """Where the candidate's prefill ran in this sweep and by which rule, in a few sentences; None where it has no rule."""
    dispatch = (s.served or {}).get("dispatch")
    if not dispatch:
        return None
    routed, elsewhere = backend_stats.off_kernel(s.candidate_rows)
    text = f"**Where {s.candidate} ran its prefill.** Its dispatch rule: {dispatch.get('rule')}."
    if routed:
        text += (f" By its server's counters, the kernel ran every prefill batch at {len(routed) - len(elsewhere)} of "
                 f"{len(routed)} points ({sum(r.get('prefill_batches_kernel', 0) for r in routed)} batches on the kernel, "
                 f"{sum(r.get('prefill_batches_triton', 0) for r in routed)} on Triton's extend kernel).")
        if elsewhere:
            text += (" Where the speedup map reads \"on Triton\", the candidate's prefill ran the baseline's own kernel "
                     "inside the candidate's backend: that speedup measures the integration, not the kernel.")
    check = integration_check(dispatch_rows(s))
    if check is not None:
        text += (f" Its kernel path takes {check['value']:.0f}% longer than the bare kernel at {check['at']} keys"
                 f"{' on the GPU' if check['basis'] == 'gpu' else ''} (the worst where the bare kernel beats Triton's; "
                 f"target: at most {limit_pct:g}%).")
        if check["basis"] == "gpu":
            wall = check["host_and_gpu"]
            text += (f" Timed with the host's time in it (one layer's attention alone, back to back, so that its Python "
                     f"and launches count where they outlast the GPU's work), {wall['value']:.0f}% at {wall['at']} keys.")
        elif why := untimed_words(check):
            text += f" That figure is {why}."
    return text


def dispatch_caption(s: Sweep) -> str:
    dispatch = (s.served or {}).get("dispatch") or {}
    measured = dispatch.get("measured") or {}
    alone = "; taken before the other servers were launched, the device to itself" if dispatch.get("measured_alone_s") else ""
    return (f"The {s.candidate} server's measurement for its dispatch rule ({measured.get('source', '?')}; "
            f"{measured.get('timing') or 'ms per layer'}{alone}): its kernel path (smoothing, padding, the calls), the bare kernel "
            f"on inputs prepared beforehand, Triton's extend kernel"
            + ("; prefix_*: both paths for a request of as many keys whose first half is a cached prefix, and where the "
               "rule sends it" if measured.get("prefix_routes") else "")
            + (f"; *_gpu_*: the kernel path and the bare kernel on the GPU alone ({measured['device_timing']}), what the "
               "integration is judged on" if measured.get("device_timing") else ""))


def dispatch_curves(s: Sweep) -> tuple[dict[str, list[int]], dict[str, list[float]], dict[str, float]]:
    """The measurement of :func:`dispatch_rows` as three curves against the request length, and the crossover's mark."""
    rows = dispatch_rows(s)
    series = {f"{s.candidate}'s kernel path": "kernel_path_ms", "the bare kernel": "bare_kernel_ms",
              "Triton's extend kernel": "triton_ms",
              f"{s.candidate}'s kernel path, first half cached": "prefix_kernel_path_ms",
              "Triton's extend kernel, first half cached": "prefix_triton_ms"}
    xs = {label: [r["keys_per_request"] for r in rows if r.get(key) is not None] for label, key in series.items()}
    ys = {label: [r[key] for r in rows if r.get(key) is not None] for label, key in series.items()}
    measured = ((s.served or {}).get("dispatch") or {}).get("measured") or {}
    keys, prefix_keys = measured.get("keys"), measured.get("prefix_keys")
    marks = {f"crossover: the kernel from {keys} keys": keys} if keys else {}
    if prefix_keys and measured.get("prefix_measured"):
        marks[f"over a cached prefix: from {prefix_keys} keys"] = prefix_keys
    return {k: v for k, v in xs.items() if v}, {k: v for k, v in ys.items() if v}, marks


def integration_check(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kernel path's worst time over the bare kernel's (%), at the lengths where the bare kernel beats Triton's (where
    the kernel pays, so its integration's cost decides whether serving gains); None where there is no such length.

    Judged on the GPU's own time (``basis`` "gpu") where the server measured it at every judged length: in a prefill
    long enough for the kernel to pay, the host launches a layer's attention while the GPU still runs the GEMMs before
    it, so what the integration costs the server is its GPU work. Else on the timings with the host's time in them
    (``basis`` "host and GPU"), the stricter reading; ``host_and_gpu`` keeps that reading's worst either way.
    ``untimed_on_gpu``: where the server tried the GPU alone and could not, the judged lengths and which calls
    (:func:`sagecheck.sglang_plugin.dispatch.device_ms` times no call that synchronizes, nor one whose host work
    outlasts its hold of the GPU)."""
    judged = [r for r in rows if r["bare_kernel_beats_triton"] and r["path_over_bare_pct"] is not None]
    if not judged:
        return None
    wall = max(judged, key=lambda r: r["path_over_bare_pct"])
    on_gpu = all(r.get("path_over_bare_gpu_pct") is not None for r in judged)
    key = "path_over_bare_gpu_pct" if on_gpu else "path_over_bare_pct"
    worst = max(judged, key=lambda r: r[key])
    untimed = [{"keys": r["keys_per_request"], "calls": [name for name, k in (("the kernel path", "kernel_path_gpu_ms"),
                                                                               ("the bare kernel", "bare_kernel_gpu_ms"))
                                                          if r.get(k) is None]}
               for r in judged if "path_over_bare_gpu_pct" in r and r["path_over_bare_gpu_pct"] is None]
    return {"value": worst[key], "at": worst["keys_per_request"], "lengths": [r["keys_per_request"] for r in judged],
            "basis": "gpu" if on_gpu else "host and GPU", "untimed_on_gpu": untimed,
            "host_and_gpu": {"value": wall["path_over_bare_pct"], "at": wall["keys_per_request"]}}


def untimed_words(check: dict[str, Any]) -> str:
    """Why the integration is judged with the host's time in it, where the server tried the GPU alone ('' if not)."""
    untimed = check.get("untimed_on_gpu") or []
    if check["basis"] == "gpu" or not untimed:
        return ""
    calls = sorted({w for u in untimed for w in u["calls"]}, reverse=True)
    return (f"not on the GPU's own time: {' and '.join(calls)} could not be timed on the GPU alone at "
            f"{', '.join(str(u['keys']) for u in untimed)} keys (a call that waits for the GPU within itself, or whose "
            f"host work outlasts the GPU's hold, cannot be), so with the host's time in it")


def prefill_curves(s: Sweep, max_batches: int = 3) -> tuple[dict[str, list[int]], dict[str, list[float]], dict[str, str]]:
    """Prefill tokens/s against input length, per backend and (the first few) batch sizes: (xs, ys, the role of each
    series: baseline or candidate, for the report's colours; the batch sizes differ by line style)."""
    shown = [b for b in s.batches if any(r["batch"] == b for r in s.candidate_rows)][:max_batches]
    xs, ys, roles = {}, {}, {}
    for role, label in (("baseline", s.baseline), ("candidate", s.candidate)):
        for b in shown:
            pts = sorted((r["input_length"], r["prefill_tok_s"]) for r in s.rows
                         if r["implementation"] == label and r["batch"] == b and r["status"] == "ok")
            xs[f"{label}, batch {b}"] = [x for x, _ in pts]
            ys[f"{label}, batch {b}"] = [y for _, y in pts]
            roles[f"{label}, batch {b}"] = role
    return xs, ys, roles


def record(results: Any, s: Sweep, p: Any, on_gpu: bool) -> dict[str, Any]:
    """04's results and verdicts; returns its summary figures."""
    from sagecheck.metrics import serving
    from sagecheck.results import format_number

    results.metric("context", {"description": s.context, "on_gpu": on_gpu, "candidate_phases": p.candidate_phases, "model": p.model})
    results.metric("labels", {"baseline": s.baseline, "candidate": s.candidate, "copy": s.copy})
    m = serving.summary(s.rows, s.candidate) if s.served else summary(s.rows, s.candidate)
    for key, value in m.items():
        results.metric(key, value)
    results.metric("stability", s.stability)
    results.metric("servers", s.served)
    results.metric("gpu_clocks", {**s.gpu_clocks, "lower_decode_clocks": lower_decode_clocks(s)})
    results.table("throughput", s.rows)
    st = s.stability
    if st and on_gpu:
        basis = "; ".join(f"{k}: {v}" for k, v in st.get("basis", {}).items())
        results.verdict("throughput.repeat", "control", "same point measured twice: medians agree", st.get("verdict_diff_pct"),
                        "<=", p.stability_max_pct, unit="%",
                        detail=f"batch {st.get('batch')}, length {st.get('input_length')}; largest elapsed-time difference "
                               f"{st.get('max_diff_pct', float('nan')):.2f}%; judged on {basis}; {s.context}")
    elif st:
        results.note(f"CPU timings: the repeated point differed by {st.get('max_diff_pct', float('nan')):.1f}% (no verdict on CPU)")
    if s.copy:
        copy_error = server_error(s.served, s.copy)
        for kind in ("prefill", "decode"):
            value = m[f"aa_{kind}_abs_diff_pct_median"]
            detail = (f"median over points of |A/A speedup - 1|; worst point {format_number(m[f'aa_{kind}_abs_diff_pct_max'])}%; "
                      f"candidate faster at {m[f'{kind}_points_faster']}, slower at {m[f'{kind}_points_slower']}, "
                      f"no difference at {m[f'{kind}_points_no_difference']} points; {s.context}")
            if value is None and copy_error:
                detail = f"not measured: the copy server {s.copy!r} did not start ({copy_error}); {s.context}"
            if on_gpu:
                results.verdict(f"throughput.aa.{kind}", "control", f"A/A control ({kind}): the baseline's copy measures as "
                                "the baseline", value, "<=", p.aa_max_pct, unit="%", detail=detail)
            else:
                results.note(f"CPU timings, A/A control ({kind}): {format_number(value)}% (no verdict on CPU); {detail}")
    if s.served and s.served.get("orders_balanced") is False:
        results.note(f"The servers' order: {s.served['order']} (throughput.repeats a multiple of the design's cycle balances it)")
    dispatch = (s.served or {}).get("dispatch")
    if dispatch:
        rows = dispatch_rows(s)
        results.metric("dispatch", {**dispatch, "rows": rows})
        if rows:
            results.table("dispatch", rows)
        check = integration_check(rows)
        measured = dispatch.get("measured") or {}
        timing = measured.get("timing") or "ms per layer"
        if check is not None and check["basis"] == "gpu":
            wall = check["host_and_gpu"]
            timing = (f"{measured.get('device_timing')}; with the host's time in it ({timing}): "
                      f"{format_number(wall['value'])}% at {wall['at']} keys")
        if check is not None and (why := untimed_words(check)):
            timing += f"; {why}"
        where = f"the {s.candidate} server's measurement at start: one layer, one request of L keys, {timing}"
        if check is None:
            results.note(f"{s.candidate}'s kernel path against the bare kernel: not judged, "
                         + ("the bare kernel beat Triton's at no measured length" if rows else
                            f"its server measured nothing ({dispatch.get('rule')})"))
        elif not on_gpu:
            results.note(f"CPU timings, {s.candidate}'s kernel path over the bare kernel: {format_number(check['value'])}% "
                         f"(no verdict on CPU); {where}")
        else:
            results.verdict("throughput.integration", "speed", f"{s.candidate}'s kernel path over the bare kernel, where the "
                            "kernel beats Triton's", check["value"], "<=", p.integration_max_pct, unit="%",
                            detail=f"worst at {check['at']} keys of {', '.join(map(str, check['lengths']))}; {where}; "
                                   f"{dispatch.get('rule')}", source=INTEGRATION_SOURCE)
    results.verdict("throughput.points", "coverage", "points measured (not out of memory, over budget or unsupported)",
                    100.0 * (m["points"] - m["points_not_run"]) / max(1, m["points"]), ">=", 50.0, unit="%",
                    detail=f"{m['points_not_run']} of {m['points']} points did not run")
    return m


def headline(m: dict[str, Any], context: str) -> str | None:
    """The sweep in one sentence (None where no point ran)."""
    if m["prefill_speedup_median_over_points"] is None:
        return None
    aa = (f"; the A/A control: prefill {m['aa_prefill_speedup_median_over_points']:.3f}, decode "
          f"{m['aa_decode_speedup_median_over_points']:.3f}" if m.get("aa_prefill_speedup_median_over_points") is not None else "")
    kernel = (f", decode in GPU busy time **{m['decode_kernel_speedup_median_over_points']:.3f}** (the GPU was busy "
              f"{m['decode_gpu_busy_pct_median']:.0f}% of the decode's elapsed time, median over points)"
              if m.get("decode_kernel_speedup_median_over_points") is not None else "")
    return (f"Median speedup over the points: prefill **{m['prefill_speedup_median_over_points']:.3f}**, "
            f"decode **{m['decode_speedup_median_over_points']:.3f}**{kernel}{aa} ({context}).")


# --------------------------------------------------------------------------- reading 04's results back


def server_error(served: dict[str, Any] | None, label: str | None) -> str | None:
    """Why the server of ``label`` did not serve the sweep (it did not start), from the sweep's ``served`` facts; None
    where it served or was not asked for."""
    return (((served or {}).get("servers") or {}).get(label) or {}).get("error") or None if label else None


@dataclass
class ThroughputResults:
    """04's results as the recommendation and ``compare`` read them."""

    status: str
    labels: dict[str, Any]
    rows: list[dict[str, Any]]
    aa_checks: list[Any]  # the A/A control's verdicts
    copy_error: str | None = None  # why the A/A control's copy server did not serve (it did not start), where it did not
    # the points where the candidate decoded at a lower SM clock than the baseline (:func:`lower_decode_clocks`)
    lower_decode_clocks: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, res: Any) -> "ThroughputResults | None":
        if res is None:
            return None
        labels = res.metrics.get("labels") or {}
        return cls(res.status, labels, res.tables.get("throughput", []) if res.status == "ok" else [],
                   [v for v in res.verdicts if v.id.startswith("throughput.aa.")],
                   server_error(res.metrics.get("servers"), labels.get("copy")),
                   (res.metrics.get("gpu_clocks") or {}).get("lower_decode_clocks") or [])

    def points(self, role: str = "candidate") -> list[dict[str, Any]]:
        """The rows of the baseline, the candidate or the copy."""
        label = self.labels.get(role)
        return [r for r in self.rows if label is not None and r.get("implementation") == label]

    @property
    def aa_failed(self) -> list[Any]:
        return [v for v in self.aa_checks if not v.passed]

    def aa_worst(self) -> Any | None:
        """The larger of the A/A figures (median over points of |A/A speedup - 1|, %), None without an A/A control."""
        judged = [v for v in self.aa_checks if v.value is not None]
        return max(judged, key=lambda v: v.value, default=None)

    def matched_points(self) -> list[dict[str, Any]]:
        """The candidate's points with its speedups, and the baseline's tokens/s beside them (``status`` ok only where
        both ran)."""
        base = {(r["batch"], r["input_length"]): r for r in self.points("baseline")}
        out = []
        for r in self.points("candidate"):
            b = base.get((r["batch"], r["input_length"]), {})
            ok = r.get("status") == "ok" and b.get("status") == "ok"
            status = "ok" if ok else (r.get("status") if r.get("status") != "ok" else b.get("status", "no baseline"))
            out.append({**r, "status": status, "baseline_prefill_tok_s": b.get("prefill_tok_s"),
                        "baseline_decode_tok_s_total": b.get("decode_tok_s_total")})
        return out
