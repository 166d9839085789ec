"""01_runtime_flag: does the backend switch on and off by its parameter alone, and fail clearly where it cannot run?

In process (an engine without servers): each implementation is loaded by name, must prove that it ran (the attention
calls that reached it are counted) and generate; a model loaded without naming one must run the baseline; an
implementation that cannot run here must say why and what to use instead.

On servers (SGLang): does ``--attention-backend sage_attn`` switch on by the flag alone, and fail clearly without its
parts? Each check is one row (``check``, what was ``expected``, what happened, ``passed``):

* the baseline and the candidate servers report the backend they were asked for and generate;
  the candidate's plugin statistics show prefill batches on the kernel;
* ``sage_attn`` without the plugin loaded (``SGLANG_PLUGINS`` names another plugin) is
  refused by SGLang's argument parser;
* ``sage_attn`` where ``import sageattention`` fails (a package of that name that raises
  ImportError is put first on the server's path) stops the server at start with the
  plugin's message;
* the candidate's ranks each hold the heads they should: one statistics file per
  tensor-parallel rank, heads/tp query heads and max(1, kv_heads/tp) KV heads on each;
* SGLang's default backend, resolved by SGLang for the same command line without the flag,
  is the same with and without the plugin, and is not ``sage_attn``;
* further names start a server each: ``runtime_flag.sglang_backends`` must serve,
  ``runtime_flag.sglang_refused`` (a name SGLang does not know) must be refused with SGLang's own error.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagecheck import engines
from sagecheck.engines import SERVERS
from sagecheck.engines.sglang import PLUGIN as NAME
from sagecheck.engines.sglang import SGLangEngine, launch_spec
from sagecheck.engines.sglang.client import ClientError, SGLangClient
from sagecheck.engines.sglang.server import ServerError
from sagecheck.results import one_line

NO_PLUGINS = "__sagecheck_none__"  # an SGLANG_PLUGINS allow-list that admits no plugin


def hidden_sageattention(folder: Path) -> Path:
    """A folder whose ``sageattention`` package raises ImportError, to put first on a server's PYTHONPATH."""
    pkg = Path(folder) / "sageattention"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        'raise ImportError("No module named \'sageattention\' (hidden by sagecheck 01_runtime_flag to check that '
        'sage_attn refuses to start without it)")\n')
    return Path(folder)


def resolve_default(params: Any, log_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """SGLang's resolved backend for the run's command line without --attention-backend (no server started)."""
    spec = launch_spec(params, None, log_dir)
    argv = spec.command()[3:]  # drop "python -m sglang.launch_server"
    cmd = [spec.python, "-m", "sagecheck.sglang_plugin.default_backend", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(id: str, check: str, expected: str, passed: bool, **more: Any) -> dict[str, Any]:
    """One check; ``id`` is its stable name (the verdict's id), ``check`` what a reader sees."""
    return {"id": id, "check": check, "expected": expected, "passed": bool(passed), **more}


def _role_word(engine: SGLangEngine, label: str) -> str:
    return engine.role(label) or "another backend"


def _serving(engine: SGLangEngine, label: str, prompt_ids: list[int], max_new_tokens: int) -> list[dict[str, Any]]:
    """The server of ``label`` reports its backend and generates; for sagecheck's plugin started with its statistics
    folder, a second row: its ranks hold the heads they should."""
    asked = engine.backend_name(label)
    try:
        with engine.backend(label) as b:
            out = b.generate([prompt_ids], max_new_tokens)[0]
            stats = None
            if asked == NAME and b.handle.stats_dir:
                deadline = time.monotonic() + 5  # the plugin writes its counters twice a second
                while time.monotonic() < deadline:
                    stats = b.plugin_stats()
                    if stats and stats["counts"].get("extend_batches_kernel"):
                        break
                    time.sleep(0.25)
            reported = b.info.get("attention_backend")
            kernel = (stats or {}).get("counts", {}).get("extend_batches_kernel")
            ran = reported == asked and len(out) > 0 and (asked != NAME or not b.handle.stats_dir or bool(kernel))
            rows = [_row(f"serves.{_role_word(engine, label)}.{asked}", f"--attention-backend {asked} ({_role_word(engine, label)})",
                         "reports the backend and generates"
                         + ("; the plugin ran the kernel" if asked == NAME else ""), ran,
                         reported=reported, generated=engine.tokenizer.decode(out), generated_tokens=len(out),
                         kernel_prefill_batches=kernel, decode=(stats or {}).get("config", {}).get("decode"),
                         sglang_version=b.info.get("version"), error="")]
            if asked == NAME and b.handle.stats_dir:
                rows.append(heads_per_rank(engine, stats))
            return rows
    except (ServerError, ClientError) as e:
        return [_row(f"serves.{_role_word(engine, label)}.{asked}", f"--attention-backend {asked} ({_role_word(engine, label)})",
                     "reports the backend and generates", False, error=getattr(e, "cause", str(e)))]


def heads_per_rank(engine: SGLangEngine, stats: dict[str, Any] | None) -> dict[str, Any]:
    """The candidate's ranks against the model's head counts and ``sglang.tp``."""
    from sagecheck.sglang_plugin.stats import head_split

    config = engine.model_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    got = head_split(stats, heads, kv_heads, engine.params.sglang.tp)
    return _row("heads_per_rank", f"{NAME}: heads per tensor-parallel rank", got["expected"], got["passed"], reported=got["reported"], error="")


def _refused_all(engine: SGLangEngine, cases: list[tuple[str, str, str, str, dict[str, str], str]]) -> list[dict[str, Any]]:
    """Servers that must not start, all launched at once (each costs SGLang's start-up, about a minute on the H100),
    then judged in turn: a case passes when its server stopped with a cause that says ``must_say``."""
    launched = []
    for id, check, expected, backend, env, must_say in cases:
        server = engine.extra_server(backend, env)
        launched.append((server.launch(), id, check, expected, must_say))
    rows = []
    for server, id, check, expected, must_say in launched:
        try:
            server.wait_ready()
            info = SGLangClient(server.url, engine.params.sglang.request_timeout_s).server_info()
            rows.append(_row(id, check, expected, False, reported=info.get("attention_backend"), error="(the server started)"))
        except (ServerError, ClientError) as e:
            cause = getattr(e, "cause", None) or str(e)
            rows.append(_row(id, check, expected, must_say in cause, error=cause))
        finally:
            server.stop()
    return rows


def server_checks(params: Any, log_dir: Path, prompt_ids: list[int], max_new_tokens: int, serving: list[str] = (),
                  refused: list[str] = ()) -> list[dict[str, Any]]:
    """The checks on servers, one row each (module docstring)."""
    engine = SGLangEngine(params, log_dir, servers=params.servers)
    rows = []
    try:
        for label in engine.pair:
            rows += _serving(engine, label, prompt_ids, max_new_tokens)
        refusals = []
        if params.sglang_attention_backend == NAME:
            shadow = hidden_sageattention(log_dir / "no-sageattention")
            path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH", "")) if p)
            refusals += [
                ("refused.plugin_not_loaded", f"{NAME} with the plugin not loaded (SGLANG_PLUGINS={NO_PLUGINS})", "refused by SGLang's argument parser",
                 NAME, {"SGLANG_PLUGINS": NO_PLUGINS}, "invalid choice"),
                ("refused.no_sageattention", f"{NAME} where sageattention cannot be imported",
                 "the server stops at start, naming sageattention and what to use instead", NAME, {"PYTHONPATH": path},
                 "sageattention")]
        refusals += [(f"refused.{name}", f"--attention-backend {name}", "refused with SGLang's own error", name, {}, "invalid choice")
                     for name in refused]
        with ThreadPoolExecutor(2) as pool:  # SGLang resolves its default while the refused servers start
            defaults = [pool.submit(resolve_default, params, log_dir, env) for env in ({}, {"SGLANG_PLUGINS": NO_PLUGINS})]
            refused_rows = _refused_all(engine, refusals)
            with_plugin, without = (f.result() for f in defaults)
        rows += refused_rows
        same = "error" not in with_plugin and "error" not in without and \
            with_plugin["attention_backend"] == without["attention_backend"] != NAME
        rows.append(_row("default_backend", "default backend (no --attention-backend), resolved by SGLang",
                         f"the same with and without the plugin, not {NAME}", same,
                         reported=f"with plugin: {with_plugin.get('attention_backend')}, without: {without.get('attention_backend')}",
                         error=with_plugin.get("error") or without.get("error") or "",
                         sage_attn_is_a_choice=f"with plugin: {with_plugin.get('sage_attn_is_a_choice')}, "
                                               f"without: {without.get('sage_attn_is_a_choice')}"))
        for name in serving:
            rows += _serving(engine, name, prompt_ids, max_new_tokens)
    finally:
        engine.close()
    return rows


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
        rows.append({**row, "loaded": True, "error": "", "attn_implementation": engine.model.config._attn_implementation,
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
        from sagecheck import models

        tok = models.load_tokenizer(models.resolve(params.model, params.revision))
        rows = server_checks(params, log_dir, tok(params.prompt).input_ids, params.max_new_tokens, params.sglang_backends,
                             params.sglang_refused)
        return Flag(rows, "The flag on servers, check by check",
                    ["check", "expected", "passed", "reported", "kernel_prefill_batches", "decode", "generated", "error"])
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
