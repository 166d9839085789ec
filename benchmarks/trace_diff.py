"""What one server's steps spend that another's do not: two torch-profiler traces (Chrome's trace format, as SGLang's
``/stop_profile`` writes them) of the same requests, summed per event name and category, per profiled request.

Used by ``ttft_gap.py --profile`` on the triton baseline and on sage_attn at 128 tokens x 1 (issue 35's gap): the rows at
the top are where sage_attn's extra time to first token is spent, on the host (``cpu_op``, ``cuda_runtime``) or on the
GPU (``kernel``, ``gpu_memcpy``). ``gpu_busy_us`` is the union of the GPU's kernel and copy intervals (overlaps counted
once), so a longer host path with the same GPU work shows as more ``cpu_op`` time and the same ``gpu_busy_us``.
``steps``: per kind of scheduler step (prefill, decode) the GPU's time on one and the time from one to the next
(``ttft_gap.py --profile N --profile-tokens T`` profiles requests of T output tokens: decode steps back to back).

    python3 benchmarks/trace_diff.py BASE.trace.json.gz OTHER.trace.json.gz --requests 8 [--top 25]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from statistics import median
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str | Path) -> list[dict[str, Any]]:
    """The complete events (``ph`` X, with a duration) of a trace file, gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, duration)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(intervals):
        stop = start + dur
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def step_timing(events: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per kind of scheduler step (SGLang's GPU annotations ``step[DECODE bs=1]``, ``step[EXTEND ...]``): how many, the
    median GPU window of one (the GPU's time on it) and the median time from one step's start on the GPU to the next
    one's, where two steps of the kind follow each other. A period longer than the window is the GPU idle between
    steps (waiting for the host); a longer window is slower GPU work."""
    steps = sorted((float(e["ts"]), float(e["dur"]), e["name"][5:].split()[0].rstrip("]"))
                   for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name", "").startswith("step["))
    out: dict[str, dict[str, float | int]] = {}
    for kind in sorted({k for _, _, k in steps}):
        windows = [d for _, d, k in steps if k == kind]
        periods = [b[0] - a[0] for a, b in zip(steps, steps[1:]) if a[2] == b[2] == kind]
        out[kind] = {"steps": len(windows), "gpu_window_us": median(windows),
                     "period_us": median(periods) if periods else None}
    return out


def summary(events: list[dict[str, Any]], requests: int) -> dict[str, Any]:
    """Per profiled request: calls and microseconds per category and per (category, name), and the GPU's busy time;
    and per kind of scheduler step its GPU window and period (:func:`step_timing`)."""
    if requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    cats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    names: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    gpu = []
    for e in events:
        cat, dur = e.get("cat", ""), float(e["dur"])
        for key, table in ((cat, cats), ((cat, e.get("name", "")), names)):
            table[key][0] += 1
            table[key][1] += dur
        if cat in GPU_CATEGORIES:
            gpu.append((float(e["ts"]), dur))
    return {"requests": requests, "gpu_busy_us": busy_us(gpu) / requests, "steps": step_timing(events),
            "categories": {c: {"calls": n / requests, "us": us / requests} for c, (n, us) in sorted(cats.items())},
            "names": {k: {"calls": n / requests, "us": us / requests} for k, (n, us) in names.items()}}


def compare(base: dict[str, Any], other: dict[str, Any], top: int = 25) -> list[dict[str, Any]]:
    """The (category, name) rows whose time per request differs most between the two, largest extra first."""
    rows = []
    for key in set(base["names"]) | set(other["names"]):
        b = base["names"].get(key, {"calls": 0.0, "us": 0.0})
        o = other["names"].get(key, {"calls": 0.0, "us": 0.0})
        rows.append({"category": key[0], "name": key[1], "base_calls": b["calls"], "other_calls": o["calls"],
                     "base_us": b["us"], "other_us": o["us"], "extra_us": o["us"] - b["us"]})
    rows.sort(key=lambda r: (-abs(r["extra_us"]), r["category"], r["name"]))
    return rows[:top]


def report(base: dict[str, Any], other: dict[str, Any], labels: tuple[str, str], top: int = 25) -> dict[str, Any]:
    """Both summaries' totals per category and the rows of :func:`compare`, JSON-ready."""
    return {"labels": list(labels), "requests": [base["requests"], other["requests"]],
            "gpu_busy_us": [base["gpu_busy_us"], other["gpu_busy_us"]],
            "steps": {k: [base.get("steps", {}).get(k), other.get("steps", {}).get(k)]
                      for k in sorted(set(base.get("steps", {})) | set(other.get("steps", {})))},
            "categories": {c: [base["categories"].get(c), other["categories"].get(c)]
                           for c in sorted(set(base["categories"]) | set(other["categories"]))},
            "top": compare(base, other, top)}


def markdown(rep: dict[str, Any]) -> str:
    a, b = rep["labels"]
    lines = [f"per request ({rep['requests'][0]} / {rep['requests'][1]} profiled): GPU busy {rep['gpu_busy_us'][0]:.0f} us "
             f"({a}) / {rep['gpu_busy_us'][1]:.0f} us ({b})", "", f"| category | {a} calls | {b} calls | {a} us | {b} us |",
             "|---|---|---|---|---|"]
    for cat, (x, y) in rep["categories"].items():
        x, y = x or {"calls": 0, "us": 0}, y or {"calls": 0, "us": 0}
        lines.append(f"| {cat} | {x['calls']:.1f} | {y['calls']:.1f} | {x['us']:.0f} | {y['us']:.0f} |")
    if rep.get("steps"):
        lines += ["", f"| step | {a} steps | {b} steps | {a} GPU window us | {b} GPU window us | {a} period us | {b} period us |",
                  "|---|---|---|---|---|---|---|"]
        def us(v: Any) -> str:
            return "" if v is None else f"{v:.0f}"

        for kind, (x, y) in rep["steps"].items():
            x, y = x or {}, y or {}
            lines.append(f"| {kind} | {x.get('steps', 0)} | {y.get('steps', 0)} | {us(x.get('gpu_window_us'))} | "
                         f"{us(y.get('gpu_window_us'))} | {us(x.get('period_us'))} | {us(y.get('period_us'))} |")
    lines += ["", f"| category | name | {a} calls | {b} calls | {a} us | {b} us | extra us |", "|---|---|---|---|---|---|---|"]
    for r in rep["top"]:
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        lines.append(f"| {r['category']} | {name} | {r['base_calls']:.1f} | {r['other_calls']:.1f} | {r['base_us']:.0f} | "
                     f"{r['other_us']:.0f} | {r['extra_us']:+.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--requests", type=int, required=True, help="how many requests each trace profiled")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rep = report(summary(load(args.base), args.requests), summary(load(args.other), args.requests),
                 (Path(args.base).name.split("-TP")[0], Path(args.other).name.split("-TP")[0]), args.top)
    print(markdown(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
