"""sage_attn's attention per layer against the kernel's own time, and its host work, before and after (issue 35).

On a GPU with sageattention (SageAttention 2 for the split; SGLang for Triton's extend kernel), for one layer of a model
shape (query / KV heads, head dim, bf16) and a few batches, times with CUDA events (median of 20 after 3 warm-ups):

* ``before``: the extend as sage_attn ran it until now: the whole sequence (the prefix's rows computed), K's smoothing
  index copied from the host in every layer;
* ``after``: the extend as it runs now (:mod:`sagecheck.sglang_plugin.split` where the kernel returns the log-sum-exp,
  everything per batch built once);
* ``kernel``: the bare ``sageattn`` call(s) the path makes on inputs prepared beforehand (K smoothed, padded), the
  kernel's own time at the same shapes;
* ``triton``: SGLang's Triton extend kernel on the same batch (the baseline's attention);
* ``*_gpu_ms``: ``before``, ``after`` and ``kernel`` again on the GPU alone, the host ahead
  (:func:`sagecheck.sglang_plugin.dispatch.device_ms`): what each costs a forward pass whose host runs ahead of its GPU.

and counts, with torch's profiler, the CUDA runtime calls of one layer of each path (copies, synchronizations,
allocations by cudaMalloc, kernel launches), and where each path's time goes: its top kernels and ops by device time
and by host time (what the path spends beyond the bare kernel, part by part). Writes a JSON file and prints a table.

    PYTHONPATH=lib python3 benchmarks/backend_overhead.py --out overhead.json [--shape llama8b|builtin]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from pathlib import Path

import torch

SHAPES = {"llama8b": (32, 8, 128), "builtin": (8, 2, 64)}
# (cached prefix, new tokens) per request
BATCHES = {
    "128 x 1": ([0], [128]), "512 x 1": ([0], [512]), "2048 x 1": ([0], [2048]), "4096 x 1": ([0], [4096]),
    "8192 x 1": ([0], [8192]),
    "512 x 16": ([0] * 16, [512] * 16), "chunk 4096 after 4096": ([4096], [4096]),
    "64 after 2000 (radix hit) x 8": ([2000] * 8, [64] * 8),
}


def profiled(fn, top: int = 8) -> dict[str, object]:
    """One call of ``fn`` (after a warm-up) under torch's profiler: its CUDA runtime calls by name, and where its time
    goes: the ``top`` entries by device time (kernels and the ops that launched them) and by host time, in ms."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        sync()
    events = [ev for ev in prof.key_averages() if ev.key != "cudaDeviceSynchronize"]
    counts: dict[str, int] = {}
    for ev in events:
        if ev.key.startswith("cuda"):
            counts[ev.key] = counts.get(ev.key, 0) + ev.count

    def ranked(attr: str) -> list[dict[str, object]]:
        best = sorted(events, key=lambda ev: getattr(ev, attr), reverse=True)[:top]
        return [{"name": ev.key[:120], "count": ev.count, "ms": round(getattr(ev, attr) / 1e3, 4)} for ev in best
                if getattr(ev, attr) > 0]

    return {"runtime_calls": counts, "by_device_time": ranked("self_device_time_total"),
            "by_host_time": ranked("self_cpu_time_total")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    a = ap.parse_args(argv)
    from sageattention import sageattn

    from sagecheck.sglang_plugin import batched as B
    from sagecheck.sglang_plugin import split as S
    from sagecheck.sglang_plugin.dispatch import cuda_ms, device_ms, median_or_none
    from sagecheck.sglang_plugin import varlen as V

    heads, kv_heads, d = SHAPES[a.shape]
    scale, dev, dtype = d ** -0.5, torch.device("cuda"), torch.bfloat16
    kernel = B.on_default_stream(sageattn)
    bare = inspect.unwrap(sageattn)
    lse = S.takes_lse(sageattn)
    from sagecheck.environment import sageattention_smooths_out_of_place

    kernel_smooths = sageattention_smooths_out_of_place()  # as the backend decides (split.extend_split)
    try:
        from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd
    except ImportError:
        extend_attention_fwd = None
    rows = []
    for name, (prefix, extend) in BATCHES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
        n_new, n_pre = sum(extend), sum(prefix)
        q, k, v = rnd(n_new, heads, d), rnd(n_new, kv_heads, d) + 1, rnd(n_new, kv_heads, d)
        kp, vp = (rnd(n_pre, kv_heads, d) + 1, rnd(n_pre, kv_heads, d)) if n_pre else (None, None)
        seq_lens = [p + e for p, e in zip(prefix, extend)]
        layout = V.ExtendLayout.build(prefix, extend, dev)

        # before: the whole sequence, its smoothing index copied from the host in every layer
        old_layout = V.ExtendLayout(layout.prefix_lens, layout.extend_lens, layout.cu_seqlens, layout.new_pos,
                                    layout.prefix_pos, None)
        groups = B.plan(seq_lens, dev)

        def before():
            return V.extend_with(lambda qa, ka, va: B.causal_attention(kernel, qa, ka, va, seq_lens, groups, scale), q, k, v,
                                 kp, vp, old_layout)

        plan = S.plan_split(layout, dev) if (lse or not layout.has_prefix) else None

        def after():
            if plan is None:
                return V.extend_with(lambda qa, ka, va: B.causal_attention(kernel, qa, ka, va, seq_lens, groups, scale,
                                                                           layout.seq_index), q, k, v, kp, vp, layout)
            return S.extend_split(kernel, q, k, v, kp, vp, layout, plan, scale, kernel_smooths=kernel_smooths)

        # the kernel alone: the same calls on inputs made beforehand
        calls = []
        if plan is not None:
            k_s, kp_s = S.smooth_request_keys(k, kp, plan.smoothing)
            for grp in plan.new_groups:
                calls.append((B._padded(q, grp).contiguous(), B._padded(k_s, grp).contiguous(), B._padded(v, grp).contiguous(),
                              True))
            for grp in plan.prefix_groups:
                qg = q.new_zeros((grp.count * grp.length, heads, d))
                qg[grp.slots] = q[grp.rows]
                calls.append((qg.view(grp.count, grp.length, heads, d), kp_s[grp.key_rows].view(grp.count, grp.prefix, kv_heads, d),
                              vp[grp.key_rows].view(grp.count, grp.prefix, kv_heads, d), False))
        extra = {"return_lse": True} if (plan is not None and layout.has_prefix) else {}

        def alone():
            for qq, kk, vv, causal in calls:
                bare(qq, kk, vv, tensor_layout="NHD", is_causal=causal, sm_scale=scale, smooth_k=False, **extra)

        row = {"batch": name, "pairs_before": S.pairs(prefix, extend, True), "pairs_after": S.pairs(prefix, extend, plan is None)}
        for label, fn in (("before", before), ("after", after), ("kernel", alone if calls else None)):
            if fn is None:
                continue
            t = cuda_ms(fn, warmup=3, repeats=20)
            row[f"{label}_ms"] = statistics.median(t)
            row[f"{label}_p10_p90"] = [sorted(t)[2], sorted(t)[-3]]
            row[f"{label}_gpu_ms"] = median_or_none(device_ms(fn, warmup=3, repeats=20))  # the GPU alone, host ahead
            prof = profiled(fn)
            row[f"{label}_runtime_calls"] = prof["runtime_calls"]
            row[f"{label}_by_device_time"], row[f"{label}_by_host_time"] = prof["by_device_time"], prof["by_host_time"]
        if extend_attention_fwd is not None:
            kbuf = torch.cat([kp, k]) if kp is not None else k
            vbuf = torch.cat([vp, v]) if vp is not None else v
            qo = torch.tensor([0] + list(torch.tensor(extend).cumsum(0)), dtype=torch.int32, device=dev)
            kv_indptr = torch.tensor([0] + list(torch.tensor(prefix).cumsum(0)), dtype=torch.int32, device=dev)
            kv_indices = torch.arange(n_pre, dtype=torch.int64, device=dev)
            o = torch.empty_like(q)

            def triton():
                extend_attention_fwd(q, k, v, o, kbuf, vbuf, qo, kv_indptr, kv_indices, None, True, None, max(extend), 1.0,
                                     1.0, scale, logit_cap=0.0, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
                                     xai_temperature_len=-1, page_size=1)
            row["triton_ms"] = statistics.median(cuda_ms(triton, warmup=3, repeats=20))
        rows.append(row)
        print(f"{name:>30}: before {row['before_ms']:.3f} ms, after {row['after_ms']:.3f} ms, kernel "
              f"{row.get('kernel_ms', float('nan')):.3f} ms, triton {row.get('triton_ms', float('nan')):.3f} ms; "
              f"runtime calls before {row['before_runtime_calls']}, after {row['after_runtime_calls']}", flush=True)
        gpu = ", ".join(f"{label} {row[f'{label}_gpu_ms']:.3f}" if row.get(f"{label}_gpu_ms") is not None else
                        f"{label} not timed (waits for the GPU)" for label in ("before", "after", "kernel")
                        if f"{label}_gpu_ms" in row)
        print(f"{'':>32}GPU alone (host ahead), ms: {gpu}", flush=True)
        for part in row["after_by_device_time"][:5]:
            print(f"{'':>32}after, device: {part['ms']:.3f} ms in {part['count']} x {part['name']}", flush=True)
        for part in row["after_by_host_time"][:3]:
            print(f"{'':>32}after, host:   {part['ms']:.3f} ms in {part['count']} x {part['name']}", flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "shape": {"name": a.shape, "q_heads": heads, "kv_heads": kv_heads, "head_dim": d},
           "sageattn_returns_lse": lse, "rows": rows}
    a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
