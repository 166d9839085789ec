"""What the census of kernel calls (:mod:`sagecheck.census`) costs each call of a wrapped sageattention function.

A server that sagecheck starts as the candidate records every call into sageattention (10's census); the call pays for
it on the host, inside what 04 times. This times a wrapped no-op kernel against the bare no-op, per call shape: a padded
call (``sageattn``, NHD: counts from shapes, on the host) and a packed call (``sageattn_varlen``: per-sequence counts
from ``cu_seqlens`` tensors on the calls' device), recorded and with the census paused. Best of 5 runs of N calls each;
microseconds per call. With ``--device cuda`` the tensors live on the GPU (a launch costs more there than on the CPU).

    PYTHONPATH=lib python3 benchmarks/census_overhead.py [--device cpu|cuda] [--calls 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sagecheck import census


def _no_op(q, k, v, *args, **kwargs):
    return q


def per_call_us(fn, calls: int, runs: int = 5) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    padded, packed = census.wrapped("sageattn", _no_op), census.wrapped("sageattn_varlen", _no_op)
    q = torch.zeros(1, 128, 32, 128, dtype=torch.bfloat16, device=dev)
    k = torch.zeros(1, 128, 8, 128, dtype=torch.bfloat16, device=dev)
    qv, kv = q[0], k[0]
    cu = torch.tensor([0, 100, 128], dtype=torch.int32, device=dev)
    shapes = {
        "bare no-op": lambda: _no_op(q, k, k, tensor_layout="NHD", is_causal=True, sm_scale=0.1),
        "padded call (sageattn, NHD)": lambda: padded(q, k, k, tensor_layout="NHD", is_causal=True, sm_scale=0.1),
        "packed call (sageattn_varlen)": lambda: packed(qv, kv, kv, cu, cu, 100, 100, is_causal=True, sm_scale=0.1),
    }
    out = {"device": str(dev), "calls": a.calls, "us_per_call": {}}
    for name, fn in shapes.items():
        out["us_per_call"][name] = per_call_us(fn, a.calls)
        census.snapshot()  # what the calls left unread is classified here, as a server's writer does
    with census.CENSUS.paused():
        out["us_per_call"]["packed call, census paused"] = per_call_us(shapes["packed call (sageattn_varlen)"], a.calls)
    for name, us in out["us_per_call"].items():
        print(f"{name:>32}: {us:7.1f} us per call")
    start = time.perf_counter()
    for _ in range(1000):
        shapes["packed call (sageattn_varlen)"]()
    census.snapshot()
    out["snapshot_after_1000_packed_calls_ms"] = (time.perf_counter() - start) * 1e3
    print(f"1000 packed calls and the snapshot that classifies them: {out['snapshot_after_1000_packed_calls_ms']:.1f} ms")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
