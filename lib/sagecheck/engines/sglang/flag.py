"""01_runtime_flag on SGLang servers: does ``--attention-backend sage_attn`` switch on by the flag alone, and fail
clearly without its parts? Each check is one row (``check``, what was ``expected``, what happened, ``passed``):

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

:meth:`SGLangEngine.flag_checks` runs them; the notebook only records the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sagecheck.backend_stats import head_split
from sagecheck.engines.sglang.client import ClientError, SGLangClient
from sagecheck.engines.sglang.server import ServerError, launch_spec

NAME = "sage_attn"  # sagecheck's own backend, whose servers write statistics of what they ran
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


def _role_word(engine: Any, label: str) -> str:
    return engine.role(label) or "another backend"


def _serving(engine: Any, label: str, prompt_ids: list[int], max_new_tokens: int) -> list[dict[str, Any]]:
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
                    counts = (stats or {}).get("counts", {})
                    if counts.get("extend_batches_kernel") or counts.get("extend_batches_triton"):
                        break
                    time.sleep(0.25)
            reported = b.info.get("attention_backend")
            counts = (stats or {}).get("counts", {})
            kernel, routed = counts.get("extend_batches_kernel"), counts.get("extend_batches_triton")
            # the prefill ran through the plugin: on the kernel, or on Triton where its dispatch rule sends a batch
            ran = reported == asked and len(out) > 0 and (asked != NAME or not b.handle.stats_dir or bool(kernel or routed))
            rows = [_row(f"serves.{_role_word(engine, label)}.{asked}", f"--attention-backend {asked} ({_role_word(engine, label)})",
                         "reports the backend and generates"
                         + ("; the plugin ran the prefill (on the kernel, or on Triton by its dispatch rule)"
                            if asked == NAME else ""), ran,
                         reported=reported, generated=engine.tokenizer.decode(out), generated_tokens=len(out),
                         kernel_prefill_batches=kernel, triton_prefill_batches=routed,
                         dispatch_rule=(stats or {}).get("config", {}).get("dispatch_rule"), decode=(stats or {}).get("config", {}).get("decode"),
                         sglang_version=b.info.get("version"), error="")]
            if asked == NAME and b.handle.stats_dir:
                rows.append(heads_per_rank(engine, stats))
            return rows
    except (ServerError, ClientError) as e:
        return [_row(f"serves.{_role_word(engine, label)}.{asked}", f"--attention-backend {asked} ({_role_word(engine, label)})",
                     "reports the backend and generates", False, error=getattr(e, "cause", str(e)))]


def heads_per_rank(engine: Any, stats: dict[str, Any] | None) -> dict[str, Any]:
    """The candidate's ranks against the model's head counts and ``sglang.tp``."""
    config = engine.model_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    got = head_split(stats, heads, kv_heads, engine.params.sglang.tp)
    return _row("heads_per_rank", f"{NAME}: heads per tensor-parallel rank", got["expected"], got["passed"], reported=got["reported"], error="")


def _refused_all(engine: Any, cases: list[tuple[str, str, str, str, dict[str, str], str]]) -> list[dict[str, Any]]:
    """Servers that must not start, all launched at once (each costs SGLang's whole start-up),
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


def server_checks(engine: Any, prompt_ids: list[int], max_new_tokens: int, serving: list[str] = (),
                  refused: list[str] = ()) -> list[dict[str, Any]]:
    """The checks on servers, one row each (module docstring)."""
    params, log_dir = engine.params, engine.log_dir
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


