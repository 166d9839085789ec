"""08's TOPS against a direct ``triton.testing.do_bench`` probe of the same calls (GPU only).

08 times each speed shape with CUDA events around ``repeats`` calls after a warm-up (sagecheck.metrics.timing) and
reports the median. This probe times the same calls another way, Triton's own benchmark helper (which flushes the L2
cache between calls; the median of as many calls as fit in 500 ms), on fresh inputs of the same
shape, and prints both figures per shape with their ratio. Agreement within ``--tolerance`` (5%) says 08's clock is
not the story. It also times the raw ``sageattn`` call next to sagecheck's wrapper, so any wrapper overhead shows.

    PYTHONPATH=lib python benchmarks/kernel_do_bench.py RUN_DIR [--lengths 4096,16384] [--out probe.json]

Exit status 1 where the kernel's ('sage') TOPS of 08 and the probe's disagree by more than the tolerance at a shape; sdpa's
are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with results/08_kernel.json measured on this GPU")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import triton.testing

    from sagecheck import attention
    from sagecheck.attention import sage_kernel
    from sagecheck.attention.baseline import flops
    from sagecheck.metrics.kernel import Shape, make_inputs

    doc = json.loads((args.run / "results" / "08_kernel.json").read_text())
    p = doc["params"]
    sage_kernel.select(p.get("sage_kernel", "auto"))
    lengths = {int(n) for n in args.lengths.split(",")}
    rows, worst = [], 0.0
    for r in doc["tables"]["speed"]:
        if r.get("status") != "ok" or r["seq_len"] not in lengths or r["implementation"] not in ("sage", "sdpa"):
            continue
        shape = Shape(r["batch"], r["heads"], r["heads"], r["seq_len"], r["seq_len"], r["head_dim"], r["causal"], r["dtype"])
        q, k, v = make_inputs(shape, torch.device("cuda"), 1234)
        fn = attention.get(r["implementation"])
        ms = triton.testing.do_bench(lambda: fn(q, k, v, causal=r["causal"]), warmup=100, rep=500, return_mode="median")
        f = flops(r["batch"], r["heads"], r["seq_len"], r["seq_len"], r["head_dim"], r["causal"])
        row = {"implementation": r["implementation"], "head_dim": r["head_dim"], "causal": r["causal"], "seq_len": r["seq_len"],
               "tops_08": round(r["tops"], 1), "tops_do_bench": round(f / ms / 1e9, 1)}
        if r["implementation"] == "sage":
            raw = sage_kernel.raw_sageattn()
            raw_ms = triton.testing.do_bench(lambda: raw(q, k, v, tensor_layout="HND", is_causal=r["causal"]), warmup=100, rep=500, return_mode="median")
            row["tops_raw_sageattn"] = round(f / raw_ms / 1e9, 1)
        row["ratio_08_over_do_bench"] = round(row["tops_08"] / row["tops_do_bench"], 3)
        if r["implementation"] == "sage":  # the bar is the kernel's figure; sdpa's is shown beside it
            worst = max(worst, abs(row["ratio_08_over_do_bench"] - 1))
        rows.append(row)
        q = k = v = None  # noqa: F841 - free the shape's inputs before the next
        torch.cuda.empty_cache()
    if not rows:
        print(f"no ok speed shape of 08 at lengths {sorted(lengths)} in {args.run}", file=sys.stderr)
        return 2
    cols = ["implementation", "head_dim", "causal", "seq_len", "tops_08", "tops_do_bench", "tops_raw_sageattn",
            "ratio_08_over_do_bench"]
    print(f"08 of {args.run} vs triton.testing.do_bench (median), sageattention {sage_kernel.kernel_info().get('version')}, "
          f"{torch.cuda.get_device_name()}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    verdict = worst <= args.tolerance
    print(f"sage: largest difference {worst:.1%}: {'within' if verdict else 'OUTSIDE'} {args.tolerance:.0%}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "largest_difference": worst, "tolerance": args.tolerance}, indent=1))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
