"""Where sage_attn's extra time to first token at short inputs comes from (issue 35: 0.75x triton's at 128 x 1 on the
H200, 0.76x on the H100, though those batches ran Triton's own extend kernel by the dispatch rule).

Servers that differ in one thing each start side by side with the preset's flags, and take turns (a Williams design,
as 04's) at streamed requests of each length after a cache flush:

* ``triton``: the baseline (the preset's ``sglang_baseline_backend``, triton in the 8B preset); ``triton_copy``: the same
  again (the A/A spread);
* ``sage_attn``: as 04 serves it (dispatch measured at start, statistics written);
* ``sage_attn_all_triton``: every extend batch on Triton by the rule (``SAGE_ATTN_DISPATCH`` = 10^9: no measurement at
  start, the backend's Triton route only);
* ``sage_attn_no_stats``: as served, but with no statistics folder (no counters written, no census wrapper);
* ``sage_attn_shadow`` (``benchmarks/probes``): as served, but where a batch goes to the kernel, Triton's extend kernel
  runs after the kernel path and its output is returned: the baseline's outputs and KV values, with whatever the kernel
  path leaves in the process (the probe of a decode that is slower after a kernel prefill);
* ``sage_attn_release`` (``benchmarks/probes``): as served, but after a batch on the kernel the caching allocator's
  unused memory is handed back before the next batch (whether the memory SageAttention 2's calls hold slows the decode);
* ``sage_attn_varlen``: every extend batch on the kernel path with ``SAGE_ATTN_PREFILL=varlen`` (``sageattn_varlen``:
  Triton kernels on SGLang's own stream, where SageAttention 2's ``sageattn`` runs its CUDA kernel on the default
  stream, :mod:`sagecheck.sglang_plugin.batched`): whether a decode slower after a kernel prefill follows the batched
  path on the default stream or any 8-bit prefill.

Per variant and length: the median time to first token and decode time with their 10-90% range, and the paired
ratio triton / variant (above 1: faster than triton); for the variants that write statistics, where their prefill
batches ran. If ``sage_attn_all_triton`` matches triton, the cost is the kernel route or the start-up measurement; if it
does not, it is the backend's class around Triton's kernel; ``sage_attn_no_stats`` tells the statistics' share.
On the H200 (2026-12-05, benchmarks/RESULTS.md) none of these: triton's own copy read 1.16x triton at 128 x 1, and
the profiles showed the same GPU work on every server with host times that differed between processes of the same code.

``--steps N``: after the timings, at each length, every server's decode is timed step by step (N steps of one request,
interleaved, as the client sees the tokens arrive): whether a variant's decode is slower right after its prefill or at
every step (04 read sage_attn's decode after a kernel prefill of 8192 tokens at 0.96-0.97x triton's on the H200).
``--step-prompts K``: the repeats take K prompts in turn, and each server's ms per step is given per prompt too: a
server whose prefill differs decodes other tokens from other KV values, so its gap is set against how far one server's
decode moves from one prompt to the next. ``--decode-after-s S``: the same again, but each timed request decodes a
prompt prefilled S seconds before (a radix-cache hit): whether the slower decode outlasts the moments after the
prefill. ``steps_by_clock.py`` sets each step against the GPU's SM clock logged meanwhile (``tools/gpu_sa2.sh gap``).

``--profile N``: after the timings, each server runs N more requests of the first length (``--profile-tokens`` output
tokens each, 1 by default) under
torch's profiler (SGLang's ``/start_profile``), and each variant's trace is set against the baseline's by
``trace_diff.py``: the events that make up the difference, per request (``profile`` in the output; the traces stay in
the log folder).

    PYTHONPATH=lib python3 benchmarks/ttft_gap.py --params params/sglang-llama8b-random.yaml --out gap.json \\
        [--lengths 128,512,128] [--batch 1] [--repeats 12] [-p sglang.extra_args=[...]]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = {  # name: (attention backend, SAGE_ATTN_DISPATCH or None for the baseline, statistics written)
    "triton": (None, None, False),
    "triton_copy": (None, None, False),
    "sage_attn": ("sage_attn", "measured", True),
    "sage_attn_all_triton": ("sage_attn", str(10**9), True),
    "sage_attn_no_stats": ("sage_attn", "measured", False),
    "sage_attn_shadow": ("sage_attn_shadow", "measured", True),  # benchmarks/probes: the kernel path run, Triton's output
    "sage_attn_release": ("sage_attn_release", "measured", True),  # benchmarks/probes: unused memory handed back after it
    "sage_attn_varlen": ("sage_attn", "kernel", True),  # every extend on sageattn_varlen (VARIANT_SETTINGS)
}
VARIANT_SETTINGS = {  # the backend's settings (environment) a variant changes beyond the dispatch rule
    "sage_attn_varlen": {"SAGE_ATTN_PREFILL": "varlen"},
}
PROBES_SITE = Path(__file__).resolve().parent / "probes"  # the probe variants' SGLang plugin (sagecheck_probes)


def variant_env(params: Any, name: str, log_dir: Path) -> dict[str, str]:
    from sagecheck.engines.sglang.servers import CANDIDATE, role_env

    backend, dispatch, stats = VARIANTS[name]
    if backend is None:
        return {}
    env = {**role_env(params, CANDIDATE, log_dir / name), "SAGE_ATTN_DISPATCH": dispatch, **VARIANT_SETTINGS.get(name, {})}
    if not stats:
        env.pop("SAGE_ATTN_STATS_DIR")
    if backend != "sage_attn":  # a probe variant: its plugin on the server's path
        import os

        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBES_SITE), os.environ.get("PYTHONPATH", "")) if p)
    return env


def summarize(samples: dict[str, dict[str, Any]], baseline: str = "triton") -> dict[str, dict[str, Any]]:
    """Per variant: medians and 10-90% ranges (ms) of both phases and the paired speedup over ``baseline``."""
    from sagecheck.metrics.timing import paired_ratio

    base = samples[baseline]
    out = {}
    for name, s in samples.items():
        row: dict[str, Any] = {}
        for phase in ("prefill", "decode"):
            x = s[phase]
            row[f"{phase}_ms"] = [x.median, x.p10, x.p90]
            if name != baseline:
                ratio = paired_ratio(base[phase], x)
                row[f"{phase}_speedup"] = [ratio.median, ratio.p10, ratio.p90]
        row["ttft_ms_by_repeat"] = [round(float(v), 3) for v in s["prefill"].values]
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from sagecheck import backend_stats, models
    from sagecheck.engines.sglang import SGLangBackend, servers_gpus
    from sagecheck.gpu_clocks import ClockLog
    from sagecheck.engines.sglang.client import SGLangClient
    from sagecheck.engines.sglang.server import Server, ServerError, launch_spec
    from sagecheck.engines.sglang.servers import (BASELINE, CANDIDATE, SIDE_BY_SIDE_FRACTION, ServerHandle,
                                                  counters_when_ready)
    from sagecheck.metrics.serving import measure_interleaved
    from sagecheck.metrics.timing import random_prompts
    from sagecheck.sources import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", type=int, default=0, help="requests profiled per server (0: none)")
    ap.add_argument("--profile-tokens", type=int, default=1, help="output tokens of each profiled request")
    ap.add_argument("--steps", type=int, default=0,
                    help="decode steps timed one by one per request at each length (0: none; batch 1, --step-prompts prompts)")
    ap.add_argument("--step-prompts", type=int, default=1,
                    help="--steps: prompts taken in turn, one per repeat (more than 1: whether a server's decode time "
                         "depends on what it decodes, the control for a gap between servers whose outputs differ)")
    ap.add_argument("--decode-after-s", default="",
                    help="--steps: also time the decode of a cached prompt this many seconds after its prefill (comma "
                         "list; each a table of its own): whether a slower decode outlasts the moments after the prefill")
    ap.add_argument("-p", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "triton" not in names:
        ap.error(f"variants: {unknown or ''} not among {sorted(VARIANTS)}; 'triton' (the baseline) must be one")
    out = Path(args.out)
    log_dir = out.parent / f"{out.stem}-logs"
    params = load(args.params, args.overrides)

    launched, ready, errors = {}, {}, {}
    # the variants that time kernels at start (the dispatch rule measured) start first, one at a time, each ready before
    # the next is launched: their timings are not taken while other servers load and capture graphs (as in 04's set)
    measuring = [n for n in names if VARIANTS[n][1] == "measured"]
    for name in measuring + [n for n in names if n not in measuring]:
        backend = VARIANTS[name][0] or params.sglang_baseline_backend
        env = variant_env(params, name, log_dir)
        spec = launch_spec(params, backend, log_dir, mem_fraction_static=params.sglang.mem_fraction_static or SIDE_BY_SIDE_FRACTION)
        server = Server(spec, log_dir, params.sglang.startup_timeout_s, env=env, name=name)
        launched[name] = (server.launch(), env)
        if name in measuring:
            try:
                server.wait_ready()
            except ServerError:
                pass  # said below, where every server is waited for
        time.sleep(1.0)
    launched = {n: launched[n] for n in names}
    try:
        for name, (server, env) in launched.items():
            try:
                server.wait_ready()
                stats = env.get("SAGE_ATTN_STATS_DIR")
                handle = ServerHandle(CANDIDATE if VARIANTS[name][0] else BASELINE, VARIANTS[name][0], url=server.url,
                                      pid=server.process.pid, stats_dir=stats, env=env,
                                      stats_at_start=counters_when_ready(stats))
                ready[name] = SGLangBackend(SGLangClient(server.url), name, handle, {})
            except ServerError as e:
                errors[name] = e.cause
                print(f"did not start: {name}: {e.cause}", flush=True)
        if "triton" not in ready:
            raise SystemExit(f"the baseline did not start: {errors.get('triton')}")
        running = [n for n in names if n in ready]
        vocab = len(models.load_tokenizer(models.resolve(params.model, params.revision)))
        report: dict[str, Any] = {"params": args.params, "overrides": args.overrides, "batch": args.batch,
                                  "repeats": args.repeats, "errors": errors, "lengths": {}}
        for length in (int(x) for x in args.lengths.split(",")):
            prompts = random_prompts(vocab, args.batch, length, params.seed, "cpu").tolist()
            # where each counting variant's prefill ran: its counters around the measurement (they are written at
            # intervals, so read once more after they settle)
            before = {n: counts for n, counts in ((n, b.counters()) for n, b in ready.items()) if counts is not None}
            samples = measure_interleaved(ready, running, prompts, args.decode_tokens, args.repeats, args.warmup)
            time.sleep(2 * backend_stats.settle_s())
            rows = summarize(samples)
            for n, counts in before.items():
                after = ready[n].counters() or {}
                rows[n]["prefill_batches"] = {k.removeprefix("extend_batches_"): after.get(k, 0) - counts.get(k, 0)
                                              for k in ("extend_batches_kernel", "extend_batches_triton")}
            # a length measured again later (--lengths 128,512,128) is kept apart: a gap that only the first point
            # shows comes from the time since start, not from the length
            key = str(length) if str(length) not in report["lengths"] else f"{length} (again)"
            report["lengths"][key] = rows
            print(table(length, args.batch, rows), flush=True)
        if args.steps:
            report["steps"] = {}
            # the GPU's clocks meanwhile, from this process as 04 logs them (steps_by_clock.py reads them, or an
            # nvidia-smi log beside this file)
            with ClockLog(*servers_gpus(params)) as clocks:
                for length in dict.fromkeys(int(x) for x in args.lengths.split(",")):
                    prompts = [random_prompts(vocab, 1, length, params.seed + i, "cpu").tolist()[0]
                               for i in range(args.step_prompts)]
                    for after in [None, *(float(x) for x in args.decode_after_s.split(",") if x)]:
                        key = str(length) if after is None else f"{length} after {after:g} s"
                        report["steps"][key] = timed_steps(ready, running, prompts, args.steps, args.repeats,
                                                           args.warmup, after)
                        print(steps_table(length, report["steps"][key]), flush=True)
            report["steps_clocks"] = {**clocks.facts(), "samples": [[round(x.t, 4), x.gpu, x.sm_mhz, x.power_w, x.reasons]
                                                                    for x in clocks.samples]}
        if args.profile:
            length = int(args.lengths.split(",")[0])
            prompts = random_prompts(vocab, args.batch, length, params.seed, "cpu").tolist()
            report["profile"] = profile_all(ready, running, prompts, args.profile, log_dir / "profiles", args.profile_tokens)
    finally:
        for server, _ in launched.values():
            server.stop()
    out.write_text(json.dumps(report, indent=1))
    return 0


def profile_all(ready: dict[str, Any], names: list[str], prompts: list[list[int]], requests: int,
                folder: Path, tokens: int = 1) -> dict[str, Any]:
    """Each server's trace of ``requests`` requests of ``prompts`` (``tokens`` output tokens each: 1 profiles the
    prefill, more its decode steps too; cache flushed before each), and every variant's difference from the baseline's
    (:mod:`trace_diff`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_diff", Path(__file__).with_name("trace_diff.py"))
    trace_diff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_diff)
    summaries = {}
    for name in names:
        client = ready[name].client
        client.start_profile(str(folder / name), name)
        try:
            for _ in range(requests):
                ready[name].reset_cache()
                client.streamed_timing(prompts, tokens)
        finally:
            client.stop_profile()
        traces = sorted((folder / name).glob(f"{name}-TP-0*.trace.json*"))
        if not traces:
            raise SystemExit(f"{name}: /stop_profile wrote no trace in {folder / name}")
        summaries[name] = trace_diff.summary(trace_diff.load(traces[0]), requests)
    out = {}
    for name in names:
        if name != "triton":
            rep = trace_diff.report(summaries["triton"], summaries[name], ("triton", name))
            print(f"\n### profile: {name} against triton\n" + trace_diff.markdown(rep), flush=True)
            out[name] = rep
    return out


STEP_SEGMENTS = ((1, 4), (5, 16), (17, None))  # decode steps (1 = the first after the first token), ends inclusive


def timed_steps(ready: dict[str, Any], names: list[str], prompts: list[list[int]], tokens: int, repeats: int,
                warmup: int, after_s: float | None = None) -> dict[str, Any]:
    """Each decode step of one request, per server, interleaved as the timings are (a Williams design, cache flushed
    before each request): whether a server's decode is slower only right after its prefill (a transient: the GPU's
    clocks after a heavy prefill, work the prefill left behind) or at every step. Repeat ``r`` decodes
    ``prompts[r % len(prompts)]`` on every server. ``requests``: every timed request's prompt, wall-clock start (s, to
    align with a GPU clock log) and token times (ms); ``summary``: per server and segment of steps, the median ms per
    step [p10-p90] over the repeats and, against triton, the paired speedup; ``by_prompt``: per server, the median ms
    per step of every step after each prompt, so that a gap between servers can be set against how much one server's
    decode moves from one prompt to another (servers whose prefills differ decode different tokens).

    ``after_s``: the prompt is first prefilled by a request of one token, and the timed request, sent ``after_s``
    seconds later, finds it in the radix cache: its decode follows the same prefill's work in the process, but not the
    GPU's state right after it (a decode as slow after the pause is held back by what the prefill left in the process;
    one that is not, by the moments after a heavy prefill). Its own extend is the prompt's last token."""
    import numpy as np

    from sagecheck.metrics.serving import balanced_orders
    from sagecheck.metrics.timing import Samples, paired_ratio

    orders = balanced_orders(len(names))
    requests: list[dict[str, Any]] = []
    for r in range(warmup + repeats):
        which = (r - warmup) % len(prompts)
        for name in (names[i] for i in orders[(r - warmup) % len(orders)]):
            ready[name].reset_cache()
            if after_s is not None:
                ready[name].client.token_times(prompts[which], 1)
                time.sleep(after_s)
            start = time.time()
            times = ready[name].client.token_times(prompts[which], tokens + 1)
            if r >= warmup:
                requests.append({"server": name, "prompt": which, "started_unix_s": round(start, 4),
                                 "token_ms": [round(t, 3) for t in times]})
    summary: dict[str, Any] = {}
    per_step = {n: np.array([np.diff(q["token_ms"]) for q in requests if q["server"] == n]) for n in names}
    prompt_of = {n: np.array([q["prompt"] for q in requests if q["server"] == n]) for n in names}
    for name in names:
        row = {}
        for first, last in STEP_SEGMENTS:
            if first > tokens:
                continue
            cols = slice(first - 1, last)
            mean = Samples(per_step[name][:, cols].mean(axis=1), "client")  # each request's ms per step over the segment
            key = f"steps {first}-{last if last and last <= tokens else tokens}"
            row[key] = {"ms_per_step": [mean.median, mean.p10, mean.p90]}
            if name != "triton":  # paired by repeat: the same turn, the same prompt
                ratio = paired_ratio(Samples(per_step["triton"][:, cols].mean(axis=1), "client"), mean)
                row[key]["speedup"] = [ratio.median, ratio.p10, ratio.p90]
        summary[name] = row
    by_prompt = {n: [float(np.median(per_step[n][prompt_of[n] == i].mean(axis=1))) if (prompt_of[n] == i).any() else None
                     for i in range(len(prompts))] for n in names}
    return {"tokens": tokens, "prompts": len(prompts), "after_s": after_s, "requests": requests, "summary": summary,
            "by_prompt": by_prompt}


def steps_table(length: int, steps: dict[str, Any]) -> str:
    summary = steps["summary"]
    segments = list(next(iter(summary.values())))
    when = (f"of a cached prompt of {length}, {steps['after_s']:g} s after its prefill" if steps.get("after_s") is not None
            else f"after a prefill of {length}")
    lines = [f"\n### decode steps {when} (batch 1): ms per step, median [p10-p90]; speedup over triton",
             "| variant | " + " | ".join(segments) + " |", "|---" * (len(segments) + 1) + "|"]
    for name, row in summary.items():
        cells = []
        for seg in segments:
            ms, sp = row[seg]["ms_per_step"], row[seg].get("speedup")
            cells.append(f"{ms[0]:.3g} [{ms[1]:.3g}-{ms[2]:.3g}]" + (f"; {sp[0]:.3f} [{sp[1]:.3f}-{sp[2]:.3f}]" if sp else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if steps.get("prompts", 1) > 1:
        n = steps["prompts"]
        lines += [f"\nms per step (all {steps['tokens']} steps), median per prompt: how much a server's decode moves with "
                  "what it decodes", "| variant | " + " | ".join(f"prompt {i}" for i in range(n)) + " | max/min |",
                  "|---" * (n + 2) + "|"]
        for name, row in steps["by_prompt"].items():
            got = [v for v in row if v is not None]
            lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.4g}" for v in row) +
                         f" | {max(got) / min(got):.4f} |")
    return "\n".join(lines)


def table(length: int, batch: int, rows: dict[str, dict[str, Any]]) -> str:
    def rng(v: list[float] | None) -> str:
        return "" if v is None else f"{v[0]:.3g} [{v[1]:.3g}-{v[2]:.3g}]"

    lines = [f"\n### input {length}, batch {batch}", "| variant | TTFT ms | prefill speedup | decode ms | decode speedup | "
             "prefill batches |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {rng(r['prefill_ms'])} | {rng(r.get('prefill_speedup'))} | {rng(r['decode_ms'])} | "
                     f"{rng(r.get('decode_speedup'))} | {r.get('prefill_batches', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
