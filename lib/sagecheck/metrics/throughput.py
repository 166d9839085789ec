"""Prefill and decode speed of two attention implementations on identical inputs, interleaved.

For each (input length, batch size) point, every repeat runs the baseline and the
candidate back to back, alternating which goes first, so that a drift of the machine
(clocks, temperature, other tenants) hits both alike. One repeat is:

* prefill: the prompts ``[batch, length]`` through the model with a fresh KV cache and
  the first token picked (time to first token, TTFT);
* decode: ``decode_tokens`` greedy steps through that cache, one token per sequence.

Times come from CUDA events on a GPU (a monotonic clock on the CPU) after ``warmup``
untimed repeats, with Python's garbage collector paused inside each repeat. A point that runs out of memory or that the implementation does not
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
from sagecheck.metrics.timing import Samples, Stopwatch, gc_paused, paired_ratio


def random_prompts(vocab_size: int, batch: int, length: int, seed: int, device: torch.device, low: int = 16) -> torch.Tensor:
    """Seeded random token ids (never all zeros; special ids below ``low`` avoided)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + length)
    return torch.randint(low, vocab_size, (batch, length), generator=gen).to(device)


def _one_repeat(backend: Any, prompts: torch.Tensor, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    with Stopwatch(device) as pre:
        logits, cache = backend.prefill(prompts)
        tokens = logits.argmax(-1)
    with Stopwatch(device) as dec:
        for _ in range(decode_tokens):
            logits, cache = backend.decode_step(tokens, cache)
            tokens = logits.argmax(-1)
    del cache, logits
    return pre.ms, dec.ms


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_point(engine: Any, implementations: tuple[str, str], batch: int, length: int, decode_tokens: int,
                  repeats: int, warmup: int, seed: int) -> dict[str, Any]:
    """Timing samples of both implementations at one point: {impl: {"prefill": Samples, "decode": Samples}} or a status."""
    device = engine.device
    prompts = random_prompts(engine.config.vocab_size, batch, length, seed, device)
    samples: dict[str, dict[str, list[float]]] = {impl: {"prefill": [], "decode": []} for impl in implementations}
    clock = "cpu-monotonic"
    try:
        for r in range(warmup + repeats):
            order = implementations if r % 2 == 0 else implementations[::-1]
            for impl in order:
                with engine.backend(impl) as backend, gc_paused():
                    pre, dec = _one_repeat(backend, prompts, decode_tokens, device)
                clock = Stopwatch(device).clock
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
    return {
        "status": "ok",
        "samples": {impl: {k: Samples(np.asarray(v), clock) for k, v in s.items()} for impl, s in samples.items()},
    }


def timing_row(batch: int, length: int, implementation: str, prefill: Samples, decode: Samples, decode_steps: int) -> dict[str, Any]:
    """One table row: TTFT, prefill tokens/s, decode tokens/s per sequence and in total, with spreads."""
    return {
        "batch": batch, "input_length": length, "implementation": implementation, "status": "ok",
        "ttft_ms": prefill.median, "ttft_ms_p10": prefill.p10, "ttft_ms_p90": prefill.p90,
        "prefill_tok_s": batch * length / (prefill.median / 1e3),
        "decode_ms_per_token": decode.median / decode_steps,
        "decode_tok_s_per_seq": decode_steps / (decode.median / 1e3),
        "decode_tok_s_total": batch * decode_steps / (decode.median / 1e3),
        "prefill_spread_pct": prefill.spread_pct, "decode_spread_pct": decode.spread_pct,
        "repeats": int(prefill.values.size), "clock": prefill.clock,
    }


def speedup_fields(base: dict[str, Samples], cand: dict[str, Samples]) -> dict[str, float]:
    """Candidate speedup (baseline time / candidate time, per repeat): median and 10th-90th percentiles."""
    out = {}
    for kind in ("prefill", "decode"):
        ratio = paired_ratio(base[kind], cand[kind])
        out.update({f"{kind}_speedup": ratio.median, f"{kind}_speedup_p10": ratio.p10, f"{kind}_speedup_p90": ratio.p90})
    return out


def point_records(point: dict[str, Any], implementations: tuple[str, str], batch: int, length: int, decode_tokens: int) -> list[dict[str, Any]]:
    """Table rows of one point: per implementation tokens/s, TTFT, and the candidate's speedup with its spread."""
    base, cand = implementations
    if point["status"] != "ok":
        return [{"batch": batch, "input_length": length, "implementation": impl, "status": point["status"],
                 "error": point.get("error", "")} for impl in implementations]
    s = point["samples"]
    rows = [timing_row(batch, length, impl, s[impl]["prefill"], s[impl]["decode"], decode_tokens) for impl in implementations]
    rows[1].update(speedup_fields(s[base], s[cand]))
    return rows


def repeat_agreement(first: dict[str, Any], again: dict[str, Any], implementations: tuple[str, str]) -> dict[str, float]:
    """Largest relative difference (%) between two measurements of the same point (medians)."""
    if first["status"] != "ok" or again["status"] != "ok":
        return {"max_diff_pct": float("nan")}
    diffs = {}
    for impl in implementations:
        for kind in ("prefill", "decode"):
            a = first["samples"][impl][kind].median
            b = again["samples"][impl][kind].median
            diffs[f"{impl}:{kind}"] = 100.0 * abs(b - a) / a
    diffs["max_diff_pct"] = max(diffs.values())
    return diffs


def sweep(engine: Any, implementations: tuple[str, str], lengths: list[int], batches: list[int], decode_tokens: int,
          repeats: int, warmup: int, seed: int, repeat_point: bool = True,
          progress_log: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (length, batch) point, then the largest point that ran measured once more.

    Returns the table rows (with each point's wall time, warm-up included) and the
    stability record of the repeated point ({} when not repeated). The largest point is
    the most GPU-bound and least launch-bound one. Each finished point appends a line to
    ``progress_log`` so a long sweep can be watched, and what ran is known if it is cut off.
    """
    def log(line: str) -> None:
        if progress_log is not None:
            Path(progress_log).parent.mkdir(parents=True, exist_ok=True)
            with open(progress_log, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    rows: list[dict[str, Any]] = []
    points: dict[tuple[int, int], dict[str, Any]] = {}
    for length in lengths:
        for batch in batches:
            t0 = time.perf_counter()
            point = measure_point(engine, implementations, batch, length, decode_tokens, repeats, warmup, seed)
            wall = time.perf_counter() - t0
            points[(batch, length)] = point
            new = point_records(point, implementations, batch, length, decode_tokens)
            for r in new:
                r["point_wall_s"] = wall
            rows += new
            log(f"batch {batch} length {length}: {point['status']} in {wall:.1f} s")
    stability: dict[str, Any] = {}
    measured = {k: v for k, v in points.items() if v["status"] == "ok"}
    if repeat_point and measured:
        (b0, l0), first = max(measured.items(), key=lambda kv: kv[0][0] * kv[0][1])
        again = measure_point(engine, implementations, b0, l0, decode_tokens, repeats, warmup, seed)
        stability = {"batch": b0, "input_length": l0, **repeat_agreement(first, again, implementations)}
        log(f"batch {b0} length {l0} again: largest difference of medians {stability['max_diff_pct']:.2f}%")
    return rows, stability
