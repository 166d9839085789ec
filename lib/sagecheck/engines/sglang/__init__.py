"""The SGLang engine: real ``sglang.launch_server`` processes, driven over HTTP.

Names: the notebooks ask for ``params.baseline`` and ``params.candidate``; here they are the
*roles* whose servers run SGLang's ``params.sglang_baseline_backend`` (``triton``) and
``params.sglang_attention_backend`` (``sage_attn``); :data:`BASELINE_COPY` is a second
baseline server (the A/A control of 04). Any other name is started as that
``--attention-backend`` on its own server.

Where the servers come from, first match wins:

1. the run's server set (:mod:`.servers`: ``python -m sagecheck run`` starts baseline,
   candidate and, for 04, the copy once, side by side, and hands their URLs to every notebook);
2. ``sglang.url`` / ``sglang.baseline_url``: servers started by hand;
3. otherwise (a notebook run by hand) the engine starts the roles it is asked for, side by
   side with the same stepped memory fractions, and stops them at :meth:`SGLangEngine.close`.

What SGLang cannot give: full-vocabulary distributions (top-k logprobs only), per-layer
activations, the torch allocator's peaks. The backend's ``capabilities`` say so.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sagecheck.engines import Backend, Engine, TopK
from sagecheck.engines.sglang.client import ClientError, SGLangClient
from sagecheck.engines.sglang.server import LaunchSpec, Server, ServerError, random_model_folder
from sagecheck.engines.sglang.servers import (BASELINE, BASELINE_COPY, CANDIDATE, SIDE_BY_SIDE_FRACTION, ServerHandle, ServerSet,
                                             backend_for, stepped_fraction)

__all__ = ["SGLangEngine", "SGLangBackend", "ServerError", "ClientError", "launch_spec", "BASELINE_COPY", "plugin_stats",
           "candidate_ran"]


def launch_spec(params: Any, backend: str | None, log_dir: Path, mem_fraction_static: float | None = None) -> LaunchSpec:
    """The command line for ``params`` and one attention backend (None: SGLang's default)."""
    from sagecheck import models

    source = models.resolve(params.model, params.revision)
    s = params.sglang
    load_format = None
    model_path = source.location
    if source.kind == "random":
        model_path = str(random_model_folder(Path(source.location), Path(source.tokenizer_location), log_dir / "random-model"))
        load_format = "dummy"  # SGLang initialises the weights at random itself
    extra = list(s.extra_args)
    if source.kind == "pretrained" and source.revision:
        extra += ["--revision", source.revision]
    return LaunchSpec(
        model_path=model_path, attention_backend=backend, dtype=params.dtype, tp=s.tp,
        mem_fraction_static=mem_fraction_static if mem_fraction_static is not None else s.mem_fraction_static,
        disable_cuda_graph=s.disable_cuda_graph, context_length=s.context_length, seed=params.seed,
        load_format=load_format, max_total_tokens=s.max_total_tokens, extra_args=extra, python=s.python or sys.executable,
    )


def plugin_stats(handle: ServerHandle | None) -> dict[str, Any] | None:
    """What the sage_attn plugin of this server wrote it ran since it was ready (None: nothing written).

    The counters SGLang's own start-up put there (warm-up requests, CUDA-graph capture) are subtracted.
    """
    from sagecheck.sglang_plugin import stats

    got = stats.read(handle.stats_dir) if handle is not None and handle.stats_dir else None
    if got:
        got["counts"] = {k: v - handle.stats_at_start.get(k, 0) for k, v in got["counts"].items()}
    return got


def candidate_ran(engine: "SGLangEngine") -> str:
    """One sentence on what the candidate server ran (the sage_attn plugin's statistics), for every SGLang notebook."""
    from sagecheck.sglang_plugin.stats import describe

    handle = engine.handles.get(CANDIDATE)
    if handle is None:
        return "the candidate server was not used"
    if handle.error:
        return f"the candidate server did not start: {handle.error.splitlines()[0]}"
    backend = engine.params.sglang_attention_backend
    if backend != "sage_attn":  # e.g. an A/A run, triton on both sides: no plugin statistics to expect
        return f"--attention-backend {backend}, not sagecheck's sage_attn (no plugin statistics)"
    return describe(plugin_stats(handle))


class SGLangBackend(Backend):
    capabilities = frozenset()

    def __init__(self, client: SGLangClient, implementation: str, handle: ServerHandle, info: dict[str, Any]) -> None:
        self.client = client
        self.implementation = implementation
        self.handle = handle
        self.info = info

    def plugin_stats(self) -> dict[str, Any] | None:
        return plugin_stats(self.handle)

    def describe(self) -> dict[str, Any]:
        return {"name": self.implementation, "attention_backend": self.info.get("attention_backend"),
                "sglang_version": self.info.get("version"), "role": self.handle.role, "url": self.handle.url}

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        return self.client.input_logprobs(batch)

    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> TopK:
        values, indices = self.client.top_logprobs(ids, top_k or 20)
        return TopK(values, indices)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.client.greedy(prompts, max_new_tokens)


class SGLangEngine(Engine):
    name = "sglang"

    def __init__(self, params: Any, log_dir: Path, env: dict[str, str] | None = None,
                 servers: dict[str, dict[str, Any]] | None = None) -> None:
        from sagecheck import models

        self.params = params
        self.log_dir = Path(log_dir)
        self.env = env
        self.handles = {role: ServerHandle.from_dict(h) for role, h in (servers or {}).items()}
        self._own: ServerSet | None = None
        self.tokenizer = models.load_tokenizer(models.resolve(params.model, params.revision))
        self.max_context = None

    @classmethod
    def from_params(cls, params: Any, log_dir: str | Path | None = None, **_: Any) -> "SGLangEngine":
        return cls(params, Path(log_dir) if log_dir else Path.cwd() / "sglang-logs", servers=getattr(params, "servers", None))

    def role(self, implementation: str) -> str | None:
        if implementation == BASELINE_COPY:
            return BASELINE_COPY
        if implementation == self.params.candidate:
            return CANDIDATE
        if implementation == self.params.baseline:
            return BASELINE
        return None

    def backend_name(self, implementation: str) -> str:
        role = self.role(implementation)
        return backend_for(self.params, role) if role else implementation

    def handle(self, role: str) -> ServerHandle:
        """The server of a role: the run's, one given by URL, or one this engine starts (and keeps until close)."""
        if role in self.handles:
            return self.handles[role]
        s = self.params.sglang
        if s.url or s.baseline_url:
            url = s.url if role == CANDIDATE else s.baseline_url
            if not url or role == BASELINE_COPY:
                what = {CANDIDATE: "the candidate", BASELINE: "the baseline", BASELINE_COPY: "a second baseline (A/A control)"}[role]
                raise ServerError(f"attached mode needs a running server for {what} too: set sglang.url and sglang.baseline_url"
                                  + (" (or throughput.aa_control=false)" if role == BASELINE_COPY else ""))
            handle = ServerHandle(role, backend_for(self.params, role), url=url)
        else:
            if self._own is None:
                self._own = ServerSet(self.params, self.log_dir, [], env=self.env)
            handle = self._own.start_role(role)
        self.handles[role] = handle
        return handle

    def client(self, handle: ServerHandle) -> SGLangClient:
        if handle.error:
            raise ServerError(handle.error, cause=handle.error.splitlines()[0])
        server = self._own.servers.get(handle.role) if self._own else None
        return SGLangClient(handle.url, self.params.sglang.request_timeout_s,
                            on_failure=server.check_alive if server else None)

    @contextmanager
    def backend(self, implementation: str) -> Iterator[SGLangBackend]:
        """The server of ``implementation``'s role (kept running), or a server of its own for another backend name."""
        role = self.role(implementation)
        if role is None:
            with self.own_server(implementation) as (server, client, info):
                yield SGLangBackend(client, implementation, ServerHandle("other", implementation, url=server.url), info)
            return
        handle = self.handle(role)
        client = self.client(handle)
        info = client.server_info()
        self.max_context = info.get("context_length") or info.get("max_req_input_len")
        yield SGLangBackend(client, implementation, handle, info)

    def extra_fraction(self) -> float | None:
        """``--mem-fraction-static`` for a server of its own beside the run's: the side-by-side fraction where the KV
        cache is capped, else the next stepped one after the servers now running."""
        if self.params.sglang.max_total_tokens:
            return self.params.sglang.mem_fraction_static or SIDE_BY_SIDE_FRACTION
        running = sum(1 for h in self.handles.values() if h.url and not h.error)
        return stepped_fraction(running + 1, self.params.sglang.mem_fraction_static)

    def extra_server(self, backend: str | None, env: dict[str, str] | None = None) -> Server:
        """A server of its own for ``backend`` (None: no --attention-backend), not started yet."""
        spec = launch_spec(self.params, backend, self.log_dir, mem_fraction_static=self.extra_fraction())
        return Server(spec, self.log_dir, self.params.sglang.startup_timeout_s, env={**(self.env or {}), **(env or {})})

    @contextmanager
    def own_server(self, backend: str | None, env: dict[str, str] | None = None) -> Iterator[tuple[Server, SGLangClient, dict]]:
        """A server of its own for ``backend`` (None: no --attention-backend), stopped at the end of the block."""
        server = self.extra_server(backend, env)
        try:
            server.start()
            client = SGLangClient(server.url, self.params.sglang.request_timeout_s, on_failure=server.check_alive)
            yield server, client, client.server_info()
        finally:
            server.stop()

    def close(self) -> None:
        if self._own is not None:
            self._own.stop()
            self._own = None


def memory_report(params: Any, log_dir: Path) -> list[dict[str, Any]]:
    """Per role: the KV-cache capacity and the memory split SGLang reports, and the GPU memory its processes hold (NVML)."""
    from sagecheck.metrics.memory import process_tree_gpu_bytes

    engine = SGLangEngine(params, log_dir, servers=params.servers)
    rows = []
    try:
        for impl in (params.baseline, params.candidate):
            try:
                with engine.backend(impl) as b:
                    info = b.info
                    states = info.get("internal_states") or [{}]
                    usage = (states[0] or {}).get("memory_usage") or {}
                    rows.append({
                        "implementation": impl, "role": b.handle.role, "status": "ok",
                        "attention_backend": info.get("attention_backend"),
                        "max_total_num_tokens": info.get("max_total_num_tokens"),
                        "mem_fraction_static": info.get("mem_fraction_static"),
                        "weights_GB": usage.get("weight"), "kv_cache_GB": usage.get("kvcache"),
                        "cuda_graphs_GB": usage.get("graph"),
                        "server_gpu_bytes": process_tree_gpu_bytes(b.handle.pid) if b.handle.pid else None,
                    })
            except (ServerError, ClientError) as e:
                rows.append({"implementation": impl, "status": "server error", "error": getattr(e, "cause", str(e))[:300]})
    finally:
        engine.close()
    if all(r["status"] != "ok" for r in rows):  # nothing measured: fail with the cause rather than an empty table
        raise ServerError(f"no SGLang server could be reached: {rows[0]['error']}", cause=rows[0]["error"])
    return rows
