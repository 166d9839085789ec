"""Does profiling slow down what runs after it? Elapsed times before and after one profiled repeat.

At one throughput point, in one process: timed repeats A, timed repeats B (the control: no
profiler between A and B), one profiled repeat per implementation (what 04_throughput does
to get the GPU busy time), then timed repeats C. If the profiler's CUPTI subscription
outlives the profiler (pytorch/pytorch#144455), every kernel launch after it costs the host
more, and figures that the host paces show C > B while B ~ A.

    python benchmarks/profiler_aftereffect.py --params params/builtin-gpu.yaml --batch 32 --length 2048

Needs a CUDA device. Prints a table and, with ``--out``, writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sagecheck import engines
from sagecheck.metrics.throughput import measure_point, profile_point
from sagecheck.sources import load as load_params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="parameter file (default: the embedded default)")
    ap.add_argument("-p", "--set", action="append", default=[], help="override key=value")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profiler_aftereffect: needs a CUDA device (the profiler's GPU activity is what is tested)", file=sys.stderr)
        return 2
    P = load_params(args.params, args.set)
    T = P.throughput
    engine = engines.create(P)
    impls = engine.pair

    def timed() -> dict:
        point = measure_point(engine, impls, args.batch, args.length, T.decode_tokens, T.repeats, T.warmup, P.seed)
        if point["status"] != "ok":
            raise SystemExit(f"point did not run: {point}")
        return {f"{i}:{k}": point["samples"][i][k].median for i in impls for k in ("prefill", "decode")}

    a, b = timed(), timed()
    profiled = profile_point(engine, impls, args.batch, args.length, T.decode_tokens, P.seed)
    if profiled.get("error"):
        raise SystemExit(f"profiling failed: {profiled['error']}")
    c = timed()
    engine.close()
    rows = [{"figure": k, "A_ms": a[k], "B_ms": b[k], "C_ms": c[k],
             "control_B_vs_A_pct": 100 * (b[k] / a[k] - 1), "after_profiler_C_vs_B_pct": 100 * (c[k] / b[k] - 1)}
            for k in a]
    print(f"{torch.cuda.get_device_name()}, {P.model}, {P.dtype}, batch {args.batch}, length {args.length}, "
          f"{T.decode_tokens} decode tokens, median of {T.repeats} repeats; torch {torch.__version__}")
    print(f"{'figure':<22}{'A ms':>10}{'B ms':>10}{'C ms':>10}{'B/A-1 %':>10}{'C/B-1 %':>10}")
    for r in rows:
        print(f"{r['figure']:<22}{r['A_ms']:>10.2f}{r['B_ms']:>10.2f}{r['C_ms']:>10.2f}"
              f"{r['control_B_vs_A_pct']:>10.2f}{r['after_profiler_C_vs_B_pct']:>10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "model": P.model, "batch": args.batch,
                       "length": args.length, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
