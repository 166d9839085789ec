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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagecheck.attention import AttentionUnavailable, UnsupportedCall
from sagecheck.metrics.timing import Samples, Stopwatch, gc_paused, gpu_busy_ms, paired_ratio


def random_prompts(vocab_size: int, batch: int, length: int, seed: int, device: torch.device, low: int = 16) -> torch.Tensor:
    """Seeded random token ids (never all zeros; special ids below ``low`` avoided)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + length)
    return torch.randint(low, vocab_size, (batch, length), generator=gen).to(device)


def _wall_ms(fn: Any, device: torch.device) -> float:
    with Stopwatch(device) as sw:
        fn()
    return sw.ms


def _one_repeat(backend: Any, prompts: torch.Tensor, decode_tokens: int, device: torch.device,
                kernel_time: bool = False) -> tuple[float, float]:
    """(prefill ms, decode ms) of one repeat: elapsed time, or with ``kernel_time`` the GPU's busy time."""
    state: dict[str, Any] = {}

    def prefill() -> None:
        logits, state["cache"] = backend.prefill(prompts)
        state["tokens"] = logits.argmax(-1)

    def decode() -> None:
        for _ in range(decode_tokens):
            logits, state["cache"] = backend.decode_step(state["tokens"], state["cache"])
            state["tokens"] = logits.argmax(-1)

    measure = gpu_busy_ms if kernel_time else _wall_ms
    pre, dec = measure(prefill, device), measure(decode, device)
    state.clear()
    return pre, dec


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_point(engine: Any, implementations: tuple[str, str], batch: int, length: int, decode_tokens: int,
                  repeats: int, warmup: int, seed: int) -> dict[str, Any]:
    """Elapsed-time samples of both implementations at one point, or a status.

    ``{"status": "ok", "samples": {impl: {"prefill": Samples, "decode": Samples}}}``, else
    ``{"status": "out of memory" | "unsupported", "error": ...}``.
    """
    device = engine.device
    prompts = random_prompts(engine.config.vocab_size, batch, length, seed, device)
    samples: dict[str, dict[str, list[float]]] = {impl: {"prefill": [], "decode": []} for impl in implementations}
    clock = Stopwatch(device).clock
    try:
        with gc_paused():  # once per point: a repeat leaves no cyclic garbage (tested)
            for r in range(warmup + repeats):
                order = implementations if r % 2 == 0 else implementations[::-1]
                for impl in order:
                    with engine.backend(impl) as backend:
                        pre, dec = _one_repeat(backend, prompts, decode_tokens, device)
                    if r >= warmup:
                        samples[impl]["prefill"].append(pre)
                        samples[impl]["decode"].append(dec)
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
    prompts = random_prompts(engine.config.vocab_size, batch, length, seed, device)
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


def timing_row(batch: int, length: int, implementation: str, prefill: Samples, decode: Samples, decode_steps: int,
               prefill_gpu: Samples | None = None, decode_gpu: Samples | None = None) -> dict[str, Any]:
    """One table row: TTFT, prefill tokens/s, decode tokens/s per sequence and in total, with spreads.

    With the GPU's busy times: the decode step's kernel time and the share of the decode's
    elapsed time that the GPU was busy (low: the host's launches set the pace).
    """
    row = {
        "batch": batch, "input_length": length, "implementation": implementation, "status": "ok",
        "ttft_ms": prefill.median, "ttft_ms_p10": prefill.p10, "ttft_ms_p90": prefill.p90,
        "prefill_tok_s": batch * length / (prefill.median / 1e3),
        "decode_ms_per_token": decode.median / decode_steps,
        "decode_tok_s_per_seq": decode_steps / (decode.median / 1e3),
        "decode_tok_s_total": batch * decode_steps / (decode.median / 1e3),
        "prefill_spread_pct": prefill.spread_pct, "decode_spread_pct": decode.spread_pct,
        "repeats": int(prefill.values.size), "clock": prefill.clock,
    }
    if prefill_gpu is not None:
        row.update({"prefill_gpu_ms": prefill_gpu.median, "prefill_gpu_busy_pct": 100.0 * prefill_gpu.median / prefill.median})
    if decode_gpu is not None:
        row.update({"decode_gpu_ms_per_token": decode_gpu.median / decode_steps,
                    "decode_gpu_busy_pct": 100.0 * decode_gpu.median / decode.median})
    return row


def speedup_fields(base: dict[str, Samples], cand: dict[str, Samples]) -> dict[str, float]:
    """Candidate speedup (baseline time / candidate time, per repeat): median and 10th-90th percentiles.

    Also the speedup in GPU busy time (``*_kernel_speedup``) where both have it.
    """
    out = {}
    for kind in ("prefill", "decode"):
        ratio = paired_ratio(base[kind], cand[kind])
        out.update({f"{kind}_speedup": ratio.median, f"{kind}_speedup_p10": ratio.p10, f"{kind}_speedup_p90": ratio.p90})
        if f"{kind}_gpu" in base and f"{kind}_gpu" in cand:
            out[f"{kind}_kernel_speedup"] = base[f"{kind}_gpu"].median / cand[f"{kind}_gpu"].median
    return out


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
    the host's own speed would be judged: it changed by up to 22% between two consecutive
    measurements with nothing between them on the H100 machine (``benchmarks/profiler_aftereffect.py``,
    its control); the GPU's busy time is taken instead. ``basis`` says which for each, ``judged`` names the
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


def stability_rows(stability: dict[str, Any]) -> list[dict[str, Any]]:
    """The repeat check as table rows: each figure's two medians (ms), their difference, and whether the verdict took it."""
    judged = set(stability.get("judged", []))
    return [{"figure": key.removesuffix("_gpu") + (" GPU busy time" if key.endswith("_gpu") else " elapsed"),
             "first_ms": first, "again_ms": again, "diff_pct": stability[key], "judged": "yes" if key in judged else ""}
            for key, (first, again) in stability.get("medians_ms", {}).items()]


def sweep(engine: Any, implementations: tuple[str, str], lengths: list[int], batches: list[int], decode_tokens: int,
          repeats: int, warmup: int, seed: int, repeat_point: bool = True, kernel_time: str = "repeated",
          tolerance_pct: float = 3.0, progress_log: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (length, batch) point, then the largest point that ran measured once more.

    Returns the table rows (with each point's wall time, warm-up included) and the
    stability record of the repeated point ({} when not repeated). The largest point is
    the most GPU-bound and least launch-bound one; ``tolerance_pct`` is the repeat check's
    (see :func:`repeat_agreement`).

    ``kernel_time`` ("all", "repeated", "off"): where the GPU busy time of prefill and
    decode is profiled on a GPU: every point, the repeated point (both times), or none.
    Profiling comes last, after every timed repeat: after one profiled repeat, the built-in
    model's host-paced decode ran 27-51% slower for the rest of the process on an H100
    (``benchmarks/profiler_aftereffect.py``; pytorch/pytorch#144455 reports CUPTI staying
    attached as the cause). The repeated point's two profiled repeats therefore run back to
    back at the end. Each finished step appends a line to
    ``progress_log`` so a long sweep can be watched, and what ran is known if it is cut off.
    """
    def log(line: str) -> None:
        if progress_log is not None:
            Path(progress_log).parent.mkdir(parents=True, exist_ok=True)
            with open(progress_log, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    if kernel_time not in ("all", "repeated", "off"):
        raise ValueError(f"kernel_time must be all, repeated or off; got {kernel_time!r}")

    points: dict[tuple[int, int], dict[str, Any]] = {}
    walls: dict[tuple[int, int], float] = {}
    for length in lengths:
        for batch in batches:
            t0 = time.perf_counter()
            point = measure_point(engine, implementations, batch, length, decode_tokens, repeats, warmup, seed)
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
        rows += new
    stability: dict[str, Any] = {}
    if repeated is not None:
        stability = {"batch": repeated[0], "input_length": repeated[1],
                     **repeat_agreement(points[repeated], again, implementations, tolerance_pct)}
        log(f"batch {repeated[0]} length {repeated[1]}: largest difference of medians {stability['max_diff_pct']:.2f}% "
            f"elapsed, {stability['verdict_diff_pct']:.2f}% by the verdict's basis")
    return rows, stability
