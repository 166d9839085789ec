"""SGLang serving benchmarks behind 04_throughput's figures and the sage_attn decode default.

Two parts, each on its own servers (GPU machine, SGLang and sageattention installed):

``agreement``: does 04's client-side timing measure what SGLang's own benchmark measures? The
baseline and candidate servers of the preset start side by side; at each point (batch size x
input length, ``--output-len`` new tokens) both are timed with 04's method
(:meth:`SGLangClient.streamed_timing`, prefix cache flushed, interleaved, ``--repeats`` medians)
and with ``python -m sglang.benchmark.one_batch_server --base-url`` (``--dataset-name
random-ids``, each case ``--repeats`` times). Compared: TTFT (ms) and output throughput
(tokens/s = batch x output_len / (latency - TTFT), bench's formula). Agreement: every
relative difference within ``--tolerance-pct`` (10%).

``decode-modes``: which decode setting of sage_attn is faster? Three candidate servers side by
side: ``SAGE_ATTN_DECODE=triton`` with CUDA graphs (the default), the same without graphs, and
``SAGE_ATTN_DECODE=sage`` (the kernel over each request's cached keys; graphs cannot be used).
Per point: decode ms per token, medians over ``--repeats`` interleaved repeats.

    python benchmarks/sglang_serving.py --params params/sglang-llama8b-random.yaml --out DIR [--part agreement]

Writes ``DIR/<part>.json`` and prints a Markdown table per part. With the offline SGLang kit
(``../shared/sglang-kit``), which leaves out ``sglang/test``, ``sglang.benchmark.one_batch_server``
fails at import (it imports ``sglang.test.nightly_bench_utils`` and ``sglang.test.test_utils``):
copy ``sglang/test`` from the same SGLang release's wheel into the unpacked site first.

Measured on the H100 (2026-11-24, Llama-3.1-8B shape, random weights, bf16, SGLang 0.5.15):
agreement within 7.5% at every point (worst: sage_attn TTFT at batch 16 x 512); decode
ms/token, median over 6 points: triton decode with graphs 6.99, without graphs 24.7, kernel
decode 77.3, hence ``SAGE_ATTN_DECODE=triton`` as the default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagecheck.engines.sglang import launch_spec
from sagecheck.engines.sglang.client import SGLangClient
from sagecheck.engines.sglang.server import Server, ServerError
from sagecheck.engines.sglang.servers import BASELINE, CANDIDATE, SIDE_BY_SIDE_FRACTION, ServerSet
from sagecheck.metrics.serving import measure_interleaved
from sagecheck.metrics.timing import random_prompts
from sagecheck.sources import load as load_params

DECODE_MODES = {  # name: (environment of the sage_attn server, extra flags)
    "triton decode, CUDA graphs (default)": ({"SAGE_ATTN_DECODE": "triton"}, []),
    "triton decode, no graphs": ({"SAGE_ATTN_DECODE": "triton"}, ["--disable-cuda-graph"]),
    "kernel decode (SAGE_ATTN_DECODE=sage), no graphs": ({"SAGE_ATTN_DECODE": "sage"}, ["--disable-cuda-graph"]),
}


def sweep(params: Any, clients: dict[str, SGLangClient], batches: list[int], lengths: list[int], output_len: int,
          repeats: int):
    """(batch, input length, {server: medians}) at every point, the same seeded random prompts for every server,
    measured as 04 measures (:func:`sagecheck.metrics.serving.measure_interleaved`, one warm-up)."""
    from sagecheck import models

    vocab = len(models.load_tokenizer(models.resolve(params.model, params.revision)))
    for length in lengths:
        for batch in batches:
            prompts = random_prompts(vocab, batch, length, params.seed, torch.device("cpu")).tolist()
            samples = measure_interleaved(clients, list(clients), prompts, output_len, repeats, warmup=1)
            yield batch, length, {n: {"ttft_ms": s["prefill"].median, "decode_ms": s["decode"].median,
                                      "ttft_spread_pct": s["prefill"].spread_pct} for n, s in samples.items()}


def bench_one_batch_server(url: str, model_path: str, batches: list[int], lengths: list[int], output_len: int, repeats: int,
                           python: str, work: Path) -> list[dict[str, Any]]:
    """SGLang's own benchmark against a running server; its JSONL rows (each case ``repeats`` times). It builds
    ServerArgs from its command line, so it gets the served model's (local) folder, not a hub id."""
    result = work / f"bench-{url.rsplit(':', 1)[-1]}.jsonl"
    cmd = [python, "-m", "sglang.benchmark.one_batch_server", "--model-path", model_path, "--base-url", url,
           "--dataset-name", "random-ids", "--batch-size", *[str(b) for b in batches for _ in range(repeats)],
           "--input-len", *map(str, lengths), "--output-len", str(output_len), "--result-filename", str(result)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GITHUB_STEP_SUMMARY": ""}, timeout=900)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


def agreement(params: Any, log_dir: Path, batches: list[int], lengths: list[int], output_len: int, repeats: int,
              tolerance_pct: float) -> dict[str, Any]:
    with ServerSet(params, log_dir, [BASELINE, CANDIDATE], progress=True) as servers:
        handles = servers.handles
        failed = {r: h.error for r, h in handles.items() if h.error}
        if failed:
            raise RuntimeError(f"servers did not start: {failed}")
        clients = {r: SGLangClient(h.url, 900) for r, h in handles.items()}
        rows = []
        for batch, length, measured in sweep(params, clients, batches, lengths, output_len, repeats):
            for role, m in measured.items():
                rows.append({"role": role, "attention_backend": handles[role].attention_backend, "batch": batch,
                             "input_len": length, "ours_ttft_ms": m["ttft_ms"],
                             "ours_output_tok_s": batch * output_len / (m["decode_ms"] / 1e3),
                             "ours_ttft_spread_pct": m["ttft_spread_pct"]})
        python = params.sglang.python or sys.executable
        for role, h in handles.items():
            bench = bench_one_batch_server(h.url, launch_spec(params, None, log_dir).model_path, batches, lengths, output_len, repeats, python, log_dir)
            for row in rows:
                if row["role"] != role:
                    continue
                cases = [b for b in bench if b["batch_size"] == row["batch"] and b["input_len"] == row["input_len"]]
                row["bench_cases"] = len(cases)
                row["bench_ttft_ms"] = float(np.median([1e3 * b["last_ttft"] for b in cases])) if cases else None
                row["bench_output_tok_s"] = float(np.median([b["output_throughput"] for b in cases])) if cases else None
    worst = 0.0
    for row in rows:
        for what in ("ttft_ms", "output_tok_s"):
            b = row.get(f"bench_{what}")
            row[f"{what}_diff_pct"] = None if not b else 100 * (row[f"ours_{what}"] - b) / b
            if row[f"{what}_diff_pct"] is not None:
                worst = max(worst, abs(row[f"{what}_diff_pct"]))
    missing = [r for r in rows if not r.get("bench_cases")]
    return {"part": "agreement", "model": params.model, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "output_len": output_len, "repeats": repeats, "tolerance_pct": tolerance_pct, "rows": rows,
            "worst_abs_diff_pct": worst, "agree": not missing and worst <= tolerance_pct}


def decode_modes(params: Any, log_dir: Path, batches: list[int], lengths: list[int], output_len: int,
                 repeats: int) -> dict[str, Any]:
    fraction = params.sglang.mem_fraction_static or SIDE_BY_SIDE_FRACTION
    servers: dict[str, Server] = {}
    try:
        for name, (env, extra) in DECODE_MODES.items():
            spec = launch_spec(params, params.sglang_attention_backend, log_dir, mem_fraction_static=fraction)
            spec.extra_args = [*spec.extra_args, *extra]
            servers[name] = Server(spec, log_dir, params.sglang.startup_timeout_s, env=env).launch()
        for s in servers.values():
            s.wait_ready()
        clients = {n: SGLangClient(s.url, 900) for n, s in servers.items()}
        rows = []
        for batch, length, measured in sweep(params, clients, batches, lengths, output_len, repeats):
            for name, m in measured.items():
                rows.append({"mode": name, "batch": batch, "input_len": length, "ttft_ms": m["ttft_ms"],
                             "decode_ms_per_token": m["decode_ms"] / max(output_len - 1, 1)})
    finally:
        for s in servers.values():
            s.stop()
    by_mode = {n: float(np.median([r["decode_ms_per_token"] for r in rows if r["mode"] == n])) for n in DECODE_MODES}
    return {"part": "decode-modes", "model": params.model, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "output_len": output_len, "repeats": repeats, "rows": rows, "median_decode_ms_per_token": by_mode,
            "fastest": min(by_mode, key=by_mode.get)}


def markdown(result: dict[str, Any]) -> str:
    if result["part"] == "agreement":
        lines = ["| backend | batch | input | TTFT ms (ours / bench) | diff | output tok/s (ours / bench) | diff |", "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['attention_backend']} | {r['batch']} | {r['input_len']} | {r['ours_ttft_ms']:.1f} / "
                         f"{r['bench_ttft_ms'] or float('nan'):.1f} | {r['ttft_ms_diff_pct'] or float('nan'):+.1f}% | "
                         f"{r['ours_output_tok_s']:.0f} / {r['bench_output_tok_s'] or float('nan'):.0f} | "
                         f"{r['output_tok_s_diff_pct'] or float('nan'):+.1f}% |")
        lines.append(f"\nworst |difference| {result['worst_abs_diff_pct']:.1f}% (tolerance {result['tolerance_pct']:g}%): "
                     + ("agree" if result["agree"] else "DO NOT AGREE"))
        return "\n".join(lines)
    lines = ["| mode | batch | input | TTFT ms | decode ms/token |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['input_len']} | {r['ttft_ms']:.1f} | {r['decode_ms_per_token']:.2f} |")
    lines.append("\nmedian decode ms/token: " + ", ".join(f"{n}: {v:.2f}" for n, v in result["median_decode_ms_per_token"].items())
                 + f"; fastest: {result['fastest']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/sglang-llama8b-random.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", choices=["agreement", "decode-modes", "all"], default="all")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--input-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--decode-output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tolerance-pct", type=float, default=10.0)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="sglang-bench-", dir=out))
    failed = False
    parts = ["agreement", "decode-modes"] if args.part == "all" else [args.part]
    for part in parts:
        try:
            if part == "agreement":
                result = agreement(params, log_dir, args.batch_sizes, args.input_lens, args.output_len, args.repeats,
                                   args.tolerance_pct)
                failed |= not result["agree"]
            else:
                result = decode_modes(params, log_dir, args.batch_sizes, args.input_lens, args.decode_output_len, args.repeats)
        except (RuntimeError, ServerError) as e:
            print(f"{part}: {e}", file=sys.stderr)
            failed = True
            continue
        (out / f"{part}.json").write_text(json.dumps(result, indent=1))
        print(f"## {part} ({result['model']}, {result['gpu']})\n\n{markdown(result)}\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
