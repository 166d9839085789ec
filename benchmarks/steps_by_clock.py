"""Decode steps against the GPU's clock: whether a server decodes slower after its prefill because its GPU runs at a
lower SM clock then, or at the same clock too (issue 35's decode after a SageAttention 2 prefill).

Reads ``ttft_gap.py --steps``'s JSON (each request's start and the arrival time of each token, per server) and the
``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
--format=csv -lms 50`` log that ``tools/gpu_sa2.sh gap`` writes beside it, and gives:

* per server and phase (its prefill, decode steps 1-4, 5-16, 17 on): the SM clock's median and minimum, the median
  power, and the share of samples in which the driver reports the software power cap (reason bit 0x4);
* each decode step's time by the SM clock nearest its middle, binned (``--bin-mhz``): a slowdown the clock explains
  reads the same at the same clock; one it does not stays in every bin;
* per server, its median step over the baseline's in the bin where both have the most steps.

The servers take turns on one GPU, so a sample belongs to the server whose request ran then. nvidia-smi writes local
time; the GPU machine's clock is UTC (``--utc-offset-h`` otherwise).

    python3 benchmarks/steps_by_clock.py gap.json gpu-clocks.csv [--length 8192] [--json out.json]

Every set of decode steps in the file is read (``--steps`` per length, and ``--decode-after-s``'s), each in its tables.
Without ``gpu-clocks.csv`` it reads the samples ttft_gap.py logged itself through NVML (``sagecheck.gpu_clocks``, as 04
logs them; stamped with that process's clock, so no time zone enters): the two logs of one run should give the same
tables.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from sagecheck.gpu_clocks import Sample, clock_stats, samples_within  # as 04's clock log has them



def _step_segments() -> tuple[tuple[int, int | None], ...]:
    """ttft_gap.py's segments of decode steps, so that both scripts' tables cut the steps alike."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ttft_gap", Path(__file__).with_name("ttft_gap.py"))
    ttft_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttft_gap)
    return ttft_gap.STEP_SEGMENTS


# (name, first token index, last token index): the prefill ends at token 0, decode step i runs from token i-1 to i
PHASES = (("prefill", None, 0), *((f"steps {a}-{b}" if b else f"steps {a}+", a - 1, b) for a, b in _step_segments()))


def read_clocks(path: str | Path, utc_offset_h: float = 0.0) -> list[Sample]:
    """The samples of an nvidia-smi CSV log (header skipped, rows it could not read, such as a last one cut off by the
    logger's end, left out), in time order."""
    out = []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows, None)
        for row in rows:
            try:
                when = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
                t = when.replace(tzinfo=dt.timezone.utc).timestamp() - utc_offset_h * 3600
                out.append(Sample(t, 0, float(row[1].split()[0]), float(row[3].split()[0]), int(row[5].strip(), 16)))
            except (ValueError, IndexError):
                continue
    return sorted(out, key=lambda s: s.t)


def own_clocks(gap: dict[str, Any]) -> list[Sample]:
    """The samples ttft_gap.py logged in its own process (``steps_clocks``: unix time, GPU, SM MHz, W, reasons)."""
    return sorted((Sample(t, gpu, sm, power, reasons) for t, gpu, sm, power, reasons in
                   (gap.get("steps_clocks") or {}).get("samples", [])), key=lambda s: s.t)


def requests(gap: dict[str, Any], length: str) -> list[dict[str, Any]]:
    steps = gap.get("steps", {}).get(length)
    if not steps:
        raise SystemExit(f"no decode steps at length {length} in this file (ttft_gap.py --steps); lengths: "
                         f"{sorted(gap.get('steps', {}))}")
    return steps["requests"]


def phase_clocks(reqs: list[dict[str, Any]], clocks: list[Sample]) -> dict[str, dict[str, dict[str, float]]]:
    """Per server and phase: the SM clock's median and minimum (MHz), median power (W), the share of samples under the
    software power cap, and how many samples."""
    got: dict[str, dict[str, list[tuple[float, float]]]] = {}  # per server and phase: its windows
    for r in reqs:
        t0, token_s = r["started_unix_s"], [ms / 1e3 for ms in r["token_ms"]]
        last = len(token_s) - 1
        for name, lo, hi in PHASES:
            if lo is not None and lo >= last:
                continue  # a request of fewer steps
            a = t0 if lo is None else t0 + token_s[lo]
            b = t0 + token_s[last if hi is None else min(hi, last)]
            got.setdefault(r["server"], {}).setdefault(name, []).append((a, b))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for server, phases in got.items():
        for name, windows in phases.items():
            if st := clock_stats(samples_within(clocks, windows)):
                out.setdefault(server, {})[name] = {
                    "sm_median_mhz": st["sm_median_mhz"], "sm_min_mhz": st["sm_min_mhz"],
                    "power_median_w": st["power_median_w"], "power_capped": st["power_capped_pct"] / 100,
                    "samples": st["samples"]}
    return out


def step_clocks(reqs: list[dict[str, Any]], clocks: list[Sample], max_gap_s: float = 0.03) -> list[dict[str, Any]]:
    """Every decode step (from one token to the next): its server, index (1: the step after the prefill's token), time
    (ms) and the SM clock of the sample nearest its middle; a step with no sample within ``max_gap_s`` is left out."""
    times = [s.t for s in clocks]
    out = []
    for r in reqs:
        t0, ms = r["started_unix_s"], r["token_ms"]
        for i in range(1, len(ms)):
            mid = t0 + (ms[i - 1] + ms[i]) / 2e3
            j = bisect.bisect_left(times, mid)
            near = min((k for k in (j - 1, j) if 0 <= k < len(times)), key=lambda k: abs(times[k] - mid), default=None)
            if near is None or abs(times[near] - mid) > max_gap_s:
                continue
            out.append({"server": r["server"], "step": i, "ms": ms[i] - ms[i - 1], "sm_mhz": clocks[near].sm_mhz})
    return out


def by_clock(steps: list[dict[str, Any]], bin_mhz: int = 60) -> dict[int, dict[str, dict[str, float]]]:
    """Median step time and count per SM clock bin (its lower edge, MHz) and server."""
    bins: dict[int, dict[str, list[float]]] = {}
    for s in steps:
        lo = int(s["sm_mhz"] // bin_mhz * bin_mhz)
        bins.setdefault(lo, {}).setdefault(s["server"], []).append(s["ms"])
    return {lo: {server: {"median_ms": statistics.median(v), "steps": len(v)} for server, v in sorted(row.items())}
            for lo, row in sorted(bins.items())}


def at_equal_clock(bins: dict[int, dict[str, dict[str, float]]], baseline: str = "triton") -> dict[str, dict[str, Any]]:
    """Per server: its median step over the baseline's in the bin where the two have the most steps together (the
    fewer of the two counts is what is maximized): above 1, slower at the same clock."""
    out = {}
    servers = {s for row in bins.values() for s in row} - {baseline}
    for server in sorted(servers):
        shared = [(min(row[server]["steps"], row[baseline]["steps"]), lo) for lo, row in bins.items()
                  if server in row and baseline in row]
        if not shared:
            continue
        n, lo = max(shared)
        out[server] = {"bin_mhz": lo, "steps": n,
                       "ratio": bins[lo][server]["median_ms"] / bins[lo][baseline]["median_ms"]}
    return out


def tables(phases: dict, bins: dict, equal: dict, bin_mhz: int, baseline: str) -> str:
    servers = sorted({s for row in bins.values() for s in row} | set(phases))
    lines = ["SM clock by phase: median / min MHz, median W, share of samples under the software power cap",
             "| server | " + " | ".join(n for n, _, _ in PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for s in servers:
        cells = []
        for name, _, _ in PHASES:
            p = phases.get(s, {}).get(name)
            if not p:
                cells.append("")
                continue
            power = "?" if p["power_median_w"] is None else f"{p['power_median_w']:.0f}"  # NVML may not say
            cells.append(f"{p['sm_median_mhz']:.0f} / {p['sm_min_mhz']:.0f}, {power} W, {p['power_capped']:.0%} "
                         f"(n{p['samples']})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "ms per decode step by the SM clock at its middle: median (steps)",
              "| SM MHz | " + " | ".join(servers) + " |", "|---|" + "---|" * len(servers)]
    for lo, row in bins.items():
        lines.append(f"| {lo}-{lo + bin_mhz - 1} | " + " | ".join(
            f"{row[s]['median_ms']:.2f} ({row[s]['steps']})" if s in row else "" for s in servers) + " |")
    lines += ["", f"at the same clock, over {baseline} (the bin where both have most steps):"]
    for s, e in equal.items():
        lines.append(f"  {s}: {e['ratio']:.4f} at {e['bin_mhz']}-{e['bin_mhz'] + bin_mhz - 1} MHz ({e['steps']} steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gap_json")
    ap.add_argument("clocks_csv", nargs="?", default=None,
                    help="nvidia-smi's log (default: the samples ttft_gap.py logged itself through NVML, in the JSON)")
    ap.add_argument("--length", default=None,
                    help="which decode steps to read: a key of the file's steps, such as 8192 or '8192 after 2 s' "
                         "(default: every one)")
    ap.add_argument("--baseline", default="triton")
    ap.add_argument("--bin-mhz", type=int, default=60)
    ap.add_argument("--utc-offset-h", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gap = json.loads(Path(args.gap_json).read_text())
    keys = [args.length] if args.length else list(gap.get("steps", {}))
    runs = {key: requests(gap, key) for key in keys or [""]}
    clocks = read_clocks(args.clocks_csv, args.utc_offset_h) if args.clocks_csv else own_clocks(gap)
    if not clocks:
        raise SystemExit(f"no clock samples in {args.clocks_csv or args.gap_json}"
                         + ("" if args.clocks_csv else f" ({(gap.get('steps_clocks') or {}).get('why_not')})"))
    out = {}
    for key, reqs in runs.items():
        phases = phase_clocks(reqs, clocks)
        bins = by_clock(step_clocks(reqs, clocks), args.bin_mhz)
        equal = at_equal_clock(bins, args.baseline)
        print(f"\n## decode steps: {key}\n" + tables(phases, bins, equal, args.bin_mhz, args.baseline))
        out[key] = {"phases": phases, "by_clock": {str(k): v for k, v in bins.items()}, "at_equal_clock": equal}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
