"""Serving speed through an engine of servers (:data:`~sagecheck.engines.SERVERS`): baseline, candidate and an A/A copy
of the baseline, interleaved request by request.

Per point (input length, batch size) and repeat, each server gets the same random prompts as
one streamed batch request after its prefix cache is flushed, timed at the client as
``sglang.bench_one_batch_server`` times it (:meth:`~sagecheck.engines.Backend.streamed_timing`): TTFT is
the time to the last request's first token, decode the rest, per token ``(end - TTFT) /
(decode_tokens - 1)``. The order of the servers changes from repeat to repeat by a Williams design
(:func:`balanced_orders`): over a cycle of its orders (2 for two servers, 6 for three) each server runs in each
position, and right after each other server, equally often, so that neither a drift of the machine nor what the
server before left behind (a warm GPU, a busy host) favours one server; with repeats a multiple of the cycle the
balance is exact, and the results say whether it was.

The A/A control: the baseline's copy is another server of the same backend, started with the
same flags. Its "speedup" over the baseline must be 1; its spread at a point is the smallest
difference the measurement can tell there. A candidate speedup counts as a difference only
where its 10-90% interval lies outside the A/A interval of the same point
(:func:`classify`).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagecheck import backend_stats
from sagecheck.engines import Engine, EngineError
from sagecheck.gpu_clocks import ClockLog
from sagecheck.metrics.counted import Counted
from sagecheck.metrics.timing import (NO_CONTROL, Samples, paired_ratio, progress_logger, random_prompts, speedup_fields,
                                      timing_row)

CLOCK = "client wall clock (streamed /generate)"


def classify(speedup: Samples, control: Samples | None) -> str:
    """``faster`` / ``slower`` where the speedup's 10-90% interval lies above / below the A/A interval, else ``no difference``."""
    if control is None:
        return NO_CONTROL
    if speedup.p10 > control.p90:
        return "faster"
    if speedup.p90 < control.p10:
        return "slower"
    return "no difference"


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams design for ``n`` servers: orders of ``0..n-1`` in which each server holds each position equally often
    and follows each other server equally often (``n`` orders for an even ``n``, ``2n`` for an odd one)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(x + i) % n for x in first] for i in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 and n > 1 else orders


def measure_interleaved(backends: dict[str, Any], labels: list[str], prompts: list[list[int]], decode_tokens: int,
                        repeats: int, warmup: int, windows: list[tuple[str, float, float, float]] | None = None,
                        ) -> dict[str, dict[str, Samples]]:
    """One point on every server: per repeat, each server in the order of :func:`balanced_orders` (the timed repeats
    from its first order on) gets the prompts as one streamed request after its prefix cache is flushed. Prefill = TTFT
    (ms), decode = the rest of the request (ms). ``windows``: each timed request's (label, start, first token, end) in
    unix seconds is appended to it (the GPU clock log's samples of each server, :mod:`sagecheck.gpu_clocks`)."""
    times: dict[str, dict[str, list[float]]] = {label: {"prefill": [], "decode": []} for label in labels}
    orders = balanced_orders(len(labels))
    for r in range(warmup + repeats):
        for label in (labels[i] for i in orders[(r - warmup) % len(orders)]):
            backends[label].reset_cache()
            start = time.time()
            ttft, total = backends[label].streamed_timing(prompts, decode_tokens)
            if r >= warmup:
                times[label]["prefill"].append(ttft)
                times[label]["decode"].append(max(total - ttft, 1e-6))
                if windows is not None:
                    windows.append((label, start, start + ttft / 1e3, start + total / 1e3))
    return {label: {k: Samples(np.asarray(v), CLOCK) for k, v in t.items()} for label, t in times.items()}


def point_rows(samples: dict[str, dict[str, Samples]], baseline: str, candidate: str, copy: str, batch: int, length: int,
               decode_steps: int, backends: dict[str, str], route: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Table rows of one point: each server's figures; the candidate's speedup, the A/A speedup and the verdict of each
    phase, and where its prefill batches ran (``route``: :func:`sagecheck.backend_stats.prefill_route`)."""
    rows = []
    base = samples[baseline]
    control = samples.get(copy)
    for label, s in samples.items():
        row = timing_row(batch, length, label, s["prefill"], s["decode"], decode_steps)
        row["attention_backend"] = backends.get(label)
        # each timed repeat in the order run (ms): a drift over the repeats, or one slow server position, shows here
        row["ttft_ms_by_repeat"] = [round(float(x), 3) for x in s["prefill"].values]
        row["decode_ms_by_repeat"] = [round(float(x), 3) for x in s["decode"].values]
        if label != baseline:
            row.update(speedup_fields(base, s))
        if label == candidate:
            if route is not None:
                row.update({"prefill_on": route["on"], "prefill_batches_kernel": route["kernel"],
                            "prefill_batches_triton": route["triton"]})
            for kind in ("prefill", "decode"):
                speed = paired_ratio(base[kind], s[kind])
                aa = paired_ratio(base[kind], control[kind]) if control else None
                row[f"{kind}_vs_aa"] = classify(speed, aa)
                if aa is not None:
                    row.update({f"aa_{kind}_speedup": aa.median, f"aa_{kind}_speedup_p10": aa.p10,
                                f"aa_{kind}_speedup_p90": aa.p90})
        rows.append(row)
    return rows


def sweep(engine: Engine, lengths: list[int], batches: list[int], decode_tokens: int, repeats: int, warmup: int,
          seed: int, aa_control: bool = True, max_batch_tokens: int | None = None,
          progress_log: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every point on every server; rows as :func:`point_rows`, and what ran on which server.

    A point is not run (and recorded so) where ``batch * (length + decode_tokens)`` exceeds
    ``max_batch_tokens`` or a server answers with an error; a server that could not start
    leaves its points not run.
    """
    with ExitStack() as stack:
        return _sweep(engine, stack, lengths, batches, decode_tokens, repeats, warmup, seed, aa_control, max_batch_tokens,
                      progress_log)


def _sweep(engine: Engine, stack: ExitStack, lengths: list[int], batches: list[int], decode_tokens: int, repeats: int,
           warmup: int, seed: int, aa_control: bool, max_batch_tokens: int | None,
           progress_log: str | Path | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    baseline, candidate, copy = engine.baseline, engine.candidate, engine.copy
    labels = [baseline, candidate] + ([copy] if aa_control and copy else [])
    clients, backends, servers = {}, {}, {}  # clients: the backends of the servers that answered
    for label in labels:
        try:
            b = stack.enter_context(engine.backend(label))
            facts = b.describe()
            clients[label] = b
            backends[label] = facts.get("attention_backend")
            servers[label] = {k: v for k, v in facts.items() if k != "version"}
        except EngineError as e:
            servers[label] = {"role": engine.role(label), "error": e.cause[:300]}
    if baseline not in clients:  # nothing can be compared: the notebook fails with the cause, in one line
        raise EngineError(f"the baseline server cannot be reached, no point can be measured: {servers[baseline]['error']}",
                          cause=servers[baseline]["error"])
    running = [label for label in labels if label in clients]
    clocks = stack.enter_context(ClockLog(*engine.timed_gpus()))  # each server's GPU clocks while its requests ran
    # where the candidate's prefill batches ran at each point: its own counters, read around the point
    counted = Counted(clients[candidate], backend_stats.settle_s()) if candidate in clients else None
    dispatch = clients[candidate].dispatch() if candidate in clients else None
    vocab = len(engine.tokenizer)
    decode_steps = max(1, decode_tokens - 1)

    log = progress_logger(progress_log)

    rows: list[dict[str, Any]] = []
    for length in lengths:
        for batch in batches:
            not_run = [{"batch": batch, "input_length": length, "implementation": label, "status": status, "error": error}
                       for label, status, error in ((lb, "server error", servers[lb].get("error", "")) for lb in labels)
                       if label not in clients]
            if baseline not in clients or candidate not in clients:
                rows += [{"batch": batch, "input_length": length, "implementation": label, "status": "server error",
                          "error": servers[label].get("error", "")} for label in labels]
                continue
            if max_batch_tokens and batch * (length + decode_tokens) > max_batch_tokens:
                rows += [{"batch": batch, "input_length": length, "implementation": label, "status": "over the token budget",
                          "error": f"{batch} x ({length} + {decode_tokens}) tokens > throughput.max_batch_tokens = {max_batch_tokens}"}
                         for label in labels]
                continue
            prompts = random_prompts(vocab, batch, length, seed, torch.device("cpu")).tolist()
            t0 = time.perf_counter()
            windows: list[tuple[str, float, float, float]] = []
            try:
                samples, delta, _ = counted(lambda: measure_interleaved(clients, running, prompts, decode_tokens, repeats,
                                                                        warmup, windows))
            except EngineError as e:
                why = e.cause.splitlines()[0][:300]
                rows += [{"batch": batch, "input_length": length, "implementation": label, "status": "error", "error": why}
                         for label in labels]
                log(f"batch {batch} length {length}: error {why}")
                continue
            new = point_rows(samples, baseline, candidate, copy, batch, length, decode_steps, backends,
                             backend_stats.prefill_route(delta))
            wall = time.perf_counter() - t0
            for r in new:
                r["point_wall_s"] = wall
                r.update(clocks.phase_fields(windows, r["implementation"]))
            rows += new + not_run
            log(f"batch {batch} length {length}: ok in {wall:.1f} s")
    cycle = len(balanced_orders(len(running)))
    order = (f"per repeat, one of the {cycle} orders of a Williams design over {', '.join(running)} (each server in each "
             f"position and after each other server equally often); {repeats} repeats: "
             + ("balanced" if repeats % cycle == 0 else f"not a multiple of {cycle}, so not exactly balanced"))
    return rows, {"servers": servers, "order": order, "orders_balanced": repeats % cycle == 0, "clock": CLOCK,
                  "decode_steps_per_request": decode_steps, "dispatch": dispatch, "gpu_clocks": clocks.facts()}


def summary(rows: list[dict[str, Any]], candidate: str) -> dict[str, Any]:
    """Medians over the points of the candidate's and the A/A speedups, and how many points each verdict got."""
    cand = [r for r in rows if r["implementation"] == candidate and r.get("status") == "ok"]

    def median(key: str) -> float | None:
        values = [r[key] for r in cand if r.get(key) is not None]
        return float(np.median(values)) if values else None

    out: dict[str, Any] = {}
    for kind in ("prefill", "decode"):
        out[f"{kind}_speedup_median_over_points"] = median(f"{kind}_speedup")
        out[f"aa_{kind}_speedup_median_over_points"] = median(f"aa_{kind}_speedup")
        aa = [abs(r[f"aa_{kind}_speedup"] - 1) * 100 for r in cand if r.get(f"aa_{kind}_speedup") is not None]
        out[f"aa_{kind}_abs_diff_pct_median"] = float(np.median(aa)) if aa else None
        out[f"aa_{kind}_abs_diff_pct_max"] = float(np.max(aa)) if aa else None
        for verdict in ("faster", "slower", "no difference"):
            out[f"{kind}_points_{verdict.replace(' ', '_')}"] = sum(r.get(f"{kind}_vs_aa") == verdict for r in cand)
    # where the candidate's prefill ran, by its own counters (sagecheck's plugin; absent for a backend that counts nothing)
    routed, elsewhere = backend_stats.off_kernel(cand)
    out["prefill_points_routed"] = len(routed)
    out["prefill_points_on_kernel"] = len(routed) - len(elsewhere)
    out["prefill_points_on_triton"] = sum(r["prefill_on"] == "Triton (dispatch rule)" for r in routed)
    points = {(r["batch"], r["input_length"]) for r in rows}
    out["points"] = len(points)
    out["points_not_run"] = len(points - {(r["batch"], r["input_length"]) for r in cand})
    return out
