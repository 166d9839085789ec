"""How many aten calls the split's log-sum-exp merge makes (``sagecheck.sglang_plugin.split.merge_by_lse``): every
layer of an extend over a cached prefix runs it on ``[new tokens, heads, head dim]``, and on a GPU each call that
computes is a kernel launch. Counted by torch's profiler on the CPU, top-level calls and all calls (nested ones
included); run it at two commits to compare two forms of the merge.

    PYTHONPATH=lib python3 benchmarks/merge_calls.py [--tokens 4096 --heads 32 --dim 128]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def count(tokens: int, heads: int, dim: int, with_lse: bool = False) -> dict[str, int]:
    """Aten calls of one merge as the split makes it (``with_lse=False``: the union's log-sum-exp is not asked for)."""
    from torch.profiler import ProfilerActivity, profile

    from sagecheck.sglang_plugin.split import merge_by_lse

    g = torch.Generator().manual_seed(0)
    o_a, o_b = (torch.randn(tokens, heads, dim, generator=g).bfloat16() for _ in range(2))
    lse_a, lse_b = (torch.randn(tokens, heads, generator=g) * 3 for _ in range(2))
    merge_by_lse(o_a, lse_a, o_b, lse_b, with_lse=with_lse)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        merge_by_lse(o_a, lse_a, o_b, lse_b, with_lse=with_lse)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"top_level_calls": len(top), "all_calls": len(events)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)
    print(json.dumps({"as_the_split_calls_it": count(args.tokens, args.heads, args.dim),
                      "with_the_unions_lse": count(args.tokens, args.heads, args.dim, with_lse=True)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
