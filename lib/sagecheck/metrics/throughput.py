"""Prefill and decode speed of two attention implementations on identical inputs, interleaved.

For each (input length, batch size) point, every repeat runs the baseline and the
candidate back to back, alternating which goes first, so that a drift of the machine
(clocks, temperature, other tenants) hits both alike. One repeat is:

* prefill: the prompts ``[batch, length]`` through the model with a fresh KV cache and
  the first token picked (time to first token, TTFT);
* decode: ``decode_tokens`` greedy steps through that cache, one token per sequence.

Times come from CUDA events on a GPU (a monotonic clock on the CPU) after ``warmup``
untimed repeats, with Python's garbage collector paused for the point. On a GPU, one
more profiled repeat can give the GPU's busy time (see :func:`sweep`). A point that
runs out of memory or that the implementation does not support is recorded as such and
the sweep goes on.
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
                  repeats: int, warmup: int, seed: int, kernel_time: bool = True) -> dict[str, Any]:
    """Timing samples of both implementations at one point, or a status.

    ``{"status": "ok", "samples": {impl: {"prefill": Samples, "decode": Samples}}}``; on a
    GPU (with ``kernel_time``) each implementation also gets ``prefill_gpu`` and
    ``decode_gpu``: the GPU's busy time in one more, profiled repeat (profiling slows the
    host, so it is kept apart from the timed repeats). ``kernel_time_error`` says why those
    are missing where they are.
    """
    device = engine.device
    prompts = random_prompts(engine.config.vocab_size, batch, length, seed, device)
    samples: dict[str, dict[str, list[float]]] = {impl: {"prefill": [], "decode": []} for impl in implementations}
    clock = Stopwatch(device).clock
    kernel_error = ""
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
            if kernel_time and device.type == "cuda":
                for impl in implementations:
                    try:
                        with engine.backend(impl) as backend:
                            pre, dec = _one_repeat(backend, prompts, decode_tokens, device, kernel_time=True)
                        samples[impl]["prefill_gpu"], samples[impl]["decode_gpu"] = [pre], [dec]
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as e:  # the busy time is an extra: without it the point keeps its elapsed times
                        kernel_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    except torch.cuda.OutOfMemoryError as e:
        _free(device)
        return {"status": "out of memory", "error": str(e).splitlines()[0][:200]}
    except (AttentionUnavailable, UnsupportedCall) as e:
        _free(device)
        return {"status": "unsupported", "error": str(e)[:200]}
    _free(device)
    out: dict[str, Any] = {
        "status": "ok",
        "samples": {impl: {k: Samples(np.asarray(v), "cuda-kernel-time" if k.endswith("_gpu") else clock)
                           for k, v in s.items()} for impl, s in samples.items()},
    }
    if kernel_error:
        out["kernel_time_error"] = kernel_error
    return out


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


HOST_BOUND_BELOW_PCT = 80.0


def repeat_agreement(first: dict[str, Any], again: dict[str, Any], implementations: tuple[str, str]) -> dict[str, Any]:
    """Relative differences (%) between two measurements of the same point (medians).

    ``max_diff_pct``: the largest elapsed-time difference. ``verdict_diff_pct``: the largest
    difference of the figure that measures the GPU work: the elapsed time where the GPU was
    busy at least ``HOST_BOUND_BELOW_PCT`` % of it, else (the host set the pace, so the
    elapsed time measures the host) the GPU's busy time; ``basis`` says which for each.
    """
    if first["status"] != "ok" or again["status"] != "ok":
        return {"max_diff_pct": float("nan"), "verdict_diff_pct": float("nan"), "basis": {}}

    def diff(impl: str, kind: str) -> float:
        a, b = first["samples"][impl][kind].median, again["samples"][impl][kind].median
        return 100.0 * abs(b - a) / a

    out: dict[str, Any] = {}
    basis: dict[str, str] = {}
    chosen = []
    for impl in implementations:
        have = first["samples"][impl]
        for kind in ("prefill", "decode"):
            key = f"{impl}:{kind}"
            out[key] = diff(impl, kind)
            chosen_value, basis[key] = out[key], "elapsed time"
            if f"{kind}_gpu" in have and f"{kind}_gpu" in again["samples"][impl]:
                out[f"{key}_gpu"] = diff(impl, f"{kind}_gpu")
                busy = 100.0 * have[f"{kind}_gpu"].median / have[kind].median
                if busy < HOST_BOUND_BELOW_PCT:
                    chosen_value, basis[key] = out[f"{key}_gpu"], f"GPU busy time (GPU busy {busy:.0f}% of the elapsed time)"
                else:
                    basis[key] = f"elapsed time (GPU busy {busy:.0f}%)"
            chosen.append(chosen_value)
    out["max_diff_pct"] = max(out[f"{impl}:{kind}"] for impl in implementations for kind in ("prefill", "decode"))
    out["verdict_diff_pct"] = max(chosen)
    out["basis"] = basis
    return out


def sweep(engine: Any, implementations: tuple[str, str], lengths: list[int], batches: list[int], decode_tokens: int,
          repeats: int, warmup: int, seed: int, repeat_point: bool = True, kernel_time: str = "repeated",
          progress_log: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (length, batch) point, then the largest point that ran measured once more.

    Returns the table rows (with each point's wall time, warm-up included) and the
    stability record of the repeated point ({} when not repeated). The largest point is
    the most GPU-bound and least launch-bound one. ``kernel_time`` ("all", "repeated", "off"):
    where the GPU busy time of prefill and decode is profiled; "repeated" profiles the
    largest point of the grid, both times (if it does not run, the repeat check falls back
    to elapsed times). Each finished point appends a line to ``progress_log`` so a long
    sweep can be watched, and what ran is known if it is cut off.
    """
    def log(line: str) -> None:
        if progress_log is not None:
            Path(progress_log).parent.mkdir(parents=True, exist_ok=True)
            with open(progress_log, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    if kernel_time not in ("all", "repeated", "off"):
        raise ValueError(f"kernel_time must be all, repeated or off; got {kernel_time!r}")
    largest = max(((b, n) for n in lengths for b in batches), key=lambda p: p[0] * p[1])

    def profiled(point: tuple[int, int]) -> bool:
        return kernel_time == "all" or (kernel_time == "repeated" and repeat_point and point == largest)

    rows: list[dict[str, Any]] = []
    points: dict[tuple[int, int], dict[str, Any]] = {}
    for length in lengths:
        for batch in batches:
            t0 = time.perf_counter()
            point = measure_point(engine, implementations, batch, length, decode_tokens, repeats, warmup, seed,
                                  kernel_time=profiled((batch, length)))
            wall = time.perf_counter() - t0
            points[(batch, length)] = point
            new = point_records(point, implementations, batch, length, decode_tokens)
            for r in new:
                r["point_wall_s"] = wall
            rows += new
            log(f"batch {batch} length {length}: {point['status']} in {wall:.1f} s {point.get('kernel_time_error', '')}")
    stability: dict[str, Any] = {}
    measured = {k: v for k, v in points.items() if v["status"] == "ok"}
    if repeat_point and measured:
        (b0, l0), first = max(measured.items(), key=lambda kv: kv[0][0] * kv[0][1])
        again = measure_point(engine, implementations, b0, l0, decode_tokens, repeats, warmup, seed,
                              kernel_time=profiled((b0, l0)))
        stability = {"batch": b0, "input_length": l0, **repeat_agreement(first, again, implementations)}
        log(f"batch {b0} length {l0} again: largest difference of medians {stability['max_diff_pct']:.2f}% elapsed, "
            f"{stability['verdict_diff_pct']:.2f}% by the verdict's basis")
    return rows, stability
