"""10_code_paths' proof on real SGLang servers: the right sage_attn and triton against itself pass every path, each wrong
variant (tests/faults/site) fails its own path.

    PYTHONPATH=tests/faults/site:lib:$PYTHONPATH python tests/faults/gpu_code_paths.py --params params/sglang-builtin-gpu.yaml \\
        --out DIR [--tp 2] [--variants sage_attn,triton,sage_attn_prefix_fault]

One baseline server and one server per variant start side by side (the preset's flags, --max-total-tokens capping each
KV cache); each variant is then measured against the baseline by :func:`sagecheck.metrics.code_paths.measure`.
Writes ``DIR/code_paths_tp<N>.json`` and prints a Markdown table per variant (path, result, figures, evidence).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sagecheck.engines.sglang import SGLangEngine
from sagecheck.engines.sglang.server import Server, ServerError, launch_spec
from sagecheck.engines.sglang.servers import BASELINE, CANDIDATE, ServerHandle, counters_when_ready, role_env
from sagecheck.metrics import code_paths as C
from sagecheck.params import NotebookParams
from sagecheck.sources import load

VARIANTS = {  # name: (--attention-backend, overrides, the path it must fail or None)
    "sage_attn": ("sage_attn", [], None),
    "triton": ("triton", [], None),
    "sage_attn_prefix_fault": ("sage_attn_prefix_fault", [], "prefix"),
    "sage_attn_stale_graph": ("sage_attn_stale_graph", [], "decode_graphs"),
    "sage_attn_padded_decode": ("sage_attn_padded_decode", ["sglang.disable_cuda_graph=true", "sglang.sage_attn_decode=sage"],
                                "decode_eager"),
    "sage_attn_head_split": ("sage_attn_head_split", [], "tp_ranks"),
    # with SageAttention 2 on the path (gpu_sa2.sh's sa2): the split of a prefix extend, each part smoothed by its own mean
    "sage_attn_split_own_means": ("sage_attn_split_own_means", [], "prefix"),
    # the dispatch rule from 200 keys: the batch path's 120-token requests on Triton (params/sglang-builtin-gpu.yaml),
    # judged as that route; the variant runs them on the kernel, counted as Triton's
    "sage_attn_routed": ("sage_attn", ["sglang.sage_attn_dispatch=200"], None),
    "sage_attn_route_miscount": ("sage_attn_route_miscount", ["sglang.sage_attn_dispatch=200"], "batch"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / f"logs-tp{args.tp}"
    names = [v for v in args.variants.split(",") if v]
    base_params = load(args.params, [f"sglang.tp={args.tp}"])
    launched = {}
    t0 = time.monotonic()
    for key in [BASELINE, *names]:  # all start now, from this thread (it outlives them)
        backend, overrides, _ = VARIANTS.get(key, (base_params.sglang_baseline_backend, [], None))
        params = load(args.params, [f"sglang.tp={args.tp}", f"sglang_attention_backend={backend}", *overrides])
        role = BASELINE if key == BASELINE else CANDIDATE
        env = role_env(params, role, log_dir / key)
        spec = launch_spec(params, params.sglang_baseline_backend if role == BASELINE else backend, log_dir)
        server = Server(spec, log_dir, params.sglang.startup_timeout_s, env=env, name=key)
        launched[key] = (params, server.launch(), env)
        time.sleep(1.0)
    handles, errors = {}, {}
    for key, (params, server, env) in launched.items():
        try:
            server.wait_ready()
            handles[key] = ServerHandle(BASELINE if key == BASELINE else CANDIDATE, params.sglang_attention_backend,
                                        url=server.url, pid=server.process.pid, stats_dir=env.get("SAGE_ATTN_STATS_DIR"),
                                        env=env, stats_at_start=counters_when_ready(env.get("SAGE_ATTN_STATS_DIR")))
            print(f"ready: {key} after {time.monotonic() - t0:.0f} s", flush=True)
        except ServerError as e:
            errors[key] = e.cause
            print(f"did not start: {key}: {e.cause}", flush=True)
    report = {"tp": args.tp, "errors": errors, "variants": {}}
    control = None  # the accepted-precision control of the cold prefill, in process on the same model (as 10 measures it)
    try:
        for key in names:
            if key not in handles or BASELINE not in handles:
                continue
            params = launched[key][0]
            engine = SGLangEngine(params, log_dir, servers={BASELINE: handles[BASELINE].to_dict(),
                                                             CANDIDATE: handles[key].to_dict()})
            t1 = time.monotonic()
            try:
                if control is None:
                    from sagecheck.engines.hf import HFEngine

                    control = HFEngine.from_params(params)
                plan, results = C.measure(engine, NotebookParams(params, "10_code_paths"), control)
            except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the others go on
                report["variants"][key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(f"## {key}: measurement failed: {type(e).__name__}: {e}", flush=True)
                continue
            expected = VARIANTS[key][2] if args.tp > 1 or key != "sage_attn_head_split" else None  # one rank: nothing to split
            if key == "sage_attn_split_own_means":  # only a server whose kernel returns the log-sum-exp splits (SA2)
                with engine.backend(engine.candidate) as cb:
                    split = str(((cb.plugin_stats() or {}).get("config") or {}).get("prefix_extend", "")).startswith("split")
                expected = expected if split else None
            rows = [{"path": r.path, "exercised": r.exercised, "passed": r.passed, "why_not": r.why_not, "evidence": r.evidence,
                     **{k: v for k, v in r.figures.items() if k != "passed"}} for r in results]
            failed = sorted(r.path for r in results if r.passed is False)
            report["variants"][key] = {"seconds": round(time.monotonic() - t1, 1), "expected_to_fail": expected,
                                       "failed": failed, "rows": rows}
            print(f"\n## {key} (tp {args.tp}): failed {failed or 'none'}; expected {expected or 'none'}; "
                  f"{time.monotonic() - t1:.0f} s")
            print("| path | result | ratio vs baseline (low) | ratio vs self (low) | |cand-base| | control | positions |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                res = "not exercised: " + r["why_not"] if not r["exercised"] else ("pass" if r["passed"] else "FAIL")
                print(f"| {r['path']} | {res} | {_pair(r, 'ratio_vs_baseline')} | {_pair(r, 'ratio_vs_self')} | "
                      f"{_num(r.get('vs_baseline_mean'))} | {_num(r.get('control_mean'))} | {r.get('positions', '')} |")
            for r in rows:
                if r["evidence"]:
                    print(f"- {r['path']}: {r['evidence'][:400]}")
            # the kernel as the candidate called it, per path, and its configurations replayed on the kernel that ran
            report["variants"][key].update(census=C.census_rows(results), replay=plan.replay)
            print("\n" + C.census_sentence(results))
            for row in C.census_rows(results):
                print("- census: " + json.dumps(row, default=str)[:700])
            for row in plan.replay:
                print("- replay: " + json.dumps(row, default=str)[:500])
            sys.stdout.flush()
    finally:
        for _, server, _ in launched.values():
            server.stop()
    (out / f"code_paths_tp{args.tp}.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


def _num(x) -> str:
    return "" if x is None else f"{x:.3g}"


def _pair(r: dict, key: str) -> str:
    return "" if key not in r else f"{r[key]:.2f} ({r[key + '_low']:.2f})"


if __name__ == "__main__":
    sys.exit(main())
