"""01_runtime_flag: does the backend switch on and off by its parameter alone, and fail clearly where it cannot run?

In process (an engine without servers): each implementation is loaded by name, must prove that it ran (the attention
calls that reached it are counted) and generate; a model loaded without naming one must run the baseline; an
implementation that cannot run here must say why and what to use instead.

On servers: the engine's own checks (:meth:`~sagecheck.engines.Engine.flag_checks`; for SGLang, that
``--attention-backend sage_attn`` switches on by the flag alone and fails clearly without its parts), one row each.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagecheck import engines
from sagecheck.engines import SERVERS
from sagecheck.results import one_line

# --------------------------------------------------------------------------- in process


def in_process_checks(params: Any, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each implementation loaded by its name alone: does it run (calls counted), generate, or say why it cannot?
    And a model loaded without naming one: which implementation ran?"""
    import torch

    from sagecheck import attention
    from sagecheck.attention.hf import STATS

    rows = []
    for name in dict.fromkeys(names):
        row = {"implementation": name, **attention.info(name)}
        try:
            engine = engines.create(params, implementation=name)
        except attention.AttentionUnavailable as e:
            rows.append({**row, "loaded": False, "error": str(e), "calls": 0, "generated": ""})
            continue
        with engine.backend(name) as b:
            ids = engine.tokenizer(params.prompt).input_ids
            out = b.generate([ids], params.max_new_tokens)[0]
            calls = b.calls()
        rows.append({**row, "loaded": True, "error": "", "attn_implementation": engine.current_implementation(),
                     "calls": calls["calls"].get(name, 0), "fallbacks": calls["fallbacks"].get(name, 0),
                     "generated": engine.tokenizer.decode(out)})
        engine.close()
        del engine
        gc.collect()
    default = engines.create(params)  # no implementation named
    STATS.reset()
    ids = default.tokenizer(params.prompt).input_ids
    with torch.inference_mode():
        default.model(input_ids=torch.tensor([ids], device=default.device))
    found = {"implementation at load": default.current_implementation(), "attention calls": STATS.snapshot()["calls"]}
    default.close()
    return rows, found


@dataclass
class Flag:
    rows: list[dict[str, Any]]
    caption: str
    columns: list[str]
    default: dict[str, Any] = field(default_factory=dict)  # in process: what ran without naming an implementation


def run(params: Any, log_dir: Path) -> Flag:
    """01's checks on the run's engine: on servers where the engine has them, else in process."""
    if not engines.missing(params.engine, SERVERS):
        engine = engines.create(params, log_dir=log_dir)
        rows = engine.flag_checks(engine.tokenizer(params.prompt).input_ids, params.max_new_tokens, params.sglang_backends,
                                  params.sglang_refused)
        return Flag(rows, "The flag on servers, check by check",
                    ["check", "expected", "passed", "reported", "kernel_prefill_batches", "triton_prefill_batches",
                     "decode", "generated", "error"])
    rows, default = in_process_checks(params, params.implementations)
    return Flag(rows, "Each implementation, selected by the parameter alone",
                ["implementation", "variant", "loaded", "calls", "fallbacks", "generated", "error"], default)


def record(results: Any, flag: Flag, params: Any) -> None:
    """01's verdicts: one per server check; in process, one per implementation and one for the default."""
    if not flag.default:
        for row in flag.rows:
            results.verdict(f"runtime_flag.{row['id']}", "runtime_flag", row["check"], int(row["passed"]), "==", 1,
                            detail=one_line(row.get("error") or row.get("reported") or ""))
        results.table("sglang_checks", flag.rows)
        return
    for row in flag.rows:
        name = row["implementation"]
        if row["loaded"]:
            results.verdict(f"runtime_flag.{name}.runs", "runtime_flag", f"{name}: attention calls reached it", row["calls"], ">=",
                            1, unit="calls", detail=f"generated {params.max_new_tokens} tokens; fallbacks to the baseline: "
                                                    f"{row['fallbacks']}")
        else:
            clear = bool(row["error"]) and (name != "sage" or "sage-emulated" in row["error"])
            results.verdict(f"runtime_flag.{name}.refused", "runtime_flag", f"{name}: unavailable here, and the error says why "
                            "and what to use instead", int(clear), "==", 1, detail=one_line(row["error"]))
    impl, calls = flag.default["implementation at load"], flag.default["attention calls"]
    others = sum(n for k, n in calls.items() if k != params.baseline)
    results.verdict("runtime_flag.default", "runtime_flag", "default (no implementation named) runs only the baseline",
                    int(impl == params.baseline and calls.get(params.baseline, 0) > 0 and others == 0), "==", 1,
                    detail=f"implementation {impl}, calls {calls}")
    results.table("implementations", flag.rows)
    results.metric("default_calls", calls)
