"""The SGLang engine: real ``sglang.launch_server`` processes, driven over HTTP.

Labels are SGLang's own names: the baseline is the server of ``params.sglang_baseline_backend``
(``triton``), the candidate the server of ``params.sglang_attention_backend`` (``sage_attn``), and
``"<baseline> copy"`` (:attr:`SGLangEngine.copy`) a second baseline server, the A/A control of 04.
Any other name is started as that ``--attention-backend`` on its own server.

Where the servers come from, first match wins:

1. the run's server set (:mod:`.servers`: ``python -m sagecheck run`` starts baseline,
   candidate and, for 04, the copy once, side by side, and hands their URLs to every notebook);
2. ``sglang.url`` / ``sglang.baseline_url``: servers started by hand;
3. otherwise (a notebook run by hand) the engine starts the roles it is asked for, side by
   side with the same stepped memory fractions, and stops them at :meth:`SGLangEngine.close`.

What SGLang cannot give: full-vocabulary distributions (top-k logprobs only), per-layer
activations, the torch allocator's peaks, per-call counts (the engine's ``capabilities``).
What the candidate ran comes from the sage_attn plugin's statistics (read by :mod:`sagecheck.backend_stats`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sagecheck.engines import CUDA_GRAPHS, RADIX_CACHE, SERVER_MEMORY, SERVERS, Backend, Engine, Generated, Limits, PathRun, TopK
from sagecheck.engines.sglang.client import ClientError, SGLangClient
from sagecheck.engines.sglang.server import Server, ServerError, launch_spec
from sagecheck.engines.sglang.servers import (BASELINE, BASELINE_COPY, CANDIDATE, SIDE_BY_SIDE_FRACTION, ServerHandle, ServerSet,
                                             backend_for, stepped_fraction)

__all__ = ["SGLangEngine", "SGLangBackend", "ServerError", "ClientError", "launch_spec", "BASELINE", "CANDIDATE", "BASELINE_COPY"]

PLUGIN = "sage_attn"  # sagecheck's own backend, whose servers write statistics of what they ran


def plugin_stats(handle: ServerHandle | None) -> dict[str, Any] | None:
    """What the sage_attn plugin of this server wrote it ran since it was ready (None: nothing written).

    The counters SGLang's own start-up put there (warm-up requests, CUDA-graph capture) are subtracted.
    """
    from sagecheck import backend_stats

    got = backend_stats.read(handle.stats_dir) if handle is not None and handle.stats_dir else None
    if got:
        got["counts"] = {k: v - handle.stats_at_start.get(k, 0) for k, v in got["counts"].items()}
    return got


def process_tree_gpu_bytes(pid: int) -> int | None:
    """GPU memory held by a process and its descendants on every GPU, as NVML reports it per process.

    An SGLang server's memory sits in its scheduler processes (one per tensor-parallel rank),
    children of the process that was started. None where NVML or the process is not available,
    or NVML lists none of them (in a container NVML may see other process ids).
    """
    try:
        import psutil
        import pynvml

        root = psutil.Process(pid)
        pids = {root.pid, *(c.pid for c in root.children(recursive=True))}
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        total, seen = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    total, seen = total + int(proc.usedGpuMemory), True
        return total if seen else None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def extra_arg(extra_args: Any, name: str) -> int | None:
    """The integer an SGLang flag is given in ``sglang.extra_args`` (``--name V`` or ``--name=V``; the last one counts,
    as in argparse), None where it is not given."""
    args = [str(a) for a in extra_args or []]
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = int(a.split("=", 1)[1])
        elif a == name and i + 1 < len(args):
            value = int(args[i + 1])
    return value


def servers_gpus(params: Any) -> tuple[list[int] | None, str]:
    """The CUDA devices of the servers sagecheck starts (:meth:`SGLangEngine.timed_gpus`): they run on this machine, side
    by side, on the first ``sglang.tp`` GPUs it shows from SGLang's ``--base-gpu-id`` (0 unless ``sglang.extra_args``
    sets it); servers given by URL may run anywhere. None and why where they are not on a GPU of this machine."""
    s = params.sglang
    if s.url or s.baseline_url:
        return None, "the servers were given by URL (sglang.url): they may run on another machine"
    if str(params.device) == "cpu":
        return None, "the run is on the CPU, not a GPU"
    base = extra_arg(s.extra_args, "--base-gpu-id") or 0
    return list(range(base, base + s.tp)), ""


class SGLangBackend(Backend):
    engine_name = "sglang"

    def __init__(self, client: SGLangClient, label: str, handle: ServerHandle, info: dict[str, Any],
                 params: Any = None) -> None:
        self.client = client
        self.label = label
        self.handle = handle
        self.info = info
        self.params = params

    def plugin_stats(self) -> dict[str, Any] | None:
        return plugin_stats(self.handle)

    def describe(self) -> dict[str, Any]:
        """The server's own report (``/get_server_info``): its backend and the settings that decide its speed."""
        keys = ("attention_backend", "mem_fraction_static", "max_total_num_tokens", "cuda_graph_max_bs", "disable_cuda_graph",
                "chunked_prefill_size", "version")
        return {"role": self.handle.role, "url": self.handle.url, **{k: self.info.get(k) for k in keys}}

    def streamed_timing(self, prompts: list[list[int]], decode_tokens: int) -> tuple[float, float]:
        return self.client.streamed_timing(prompts, decode_tokens)

    def memory_report(self) -> dict[str, Any]:
        usage = ((self.info.get("internal_states") or [{}])[0] or {}).get("memory_usage") or {}
        return {"attention_backend": self.info.get("attention_backend"),
                "max_total_num_tokens": self.info.get("max_total_num_tokens"),
                "mem_fraction_static": self.info.get("mem_fraction_static"),
                "weights_GB": usage.get("weight"), "kv_cache_GB": usage.get("kvcache"), "cuda_graphs_GB": usage.get("graph"),
                "server_gpu_bytes": process_tree_gpu_bytes(self.handle.pid) if self.handle.pid else None}

    # -------------------------------------------------------------- code paths

    def reset_cache(self) -> None:
        self.client.flush_cache()

    def limits(self) -> Limits:
        """From the server's own arguments (``/get_server_info``), else from the command line sagecheck gave it."""
        extra = self.params.sglang.extra_args if self.params is not None else []
        graphs = not self.info.get("disable_cuda_graph") and not (self.params is not None and self.params.sglang.disable_cuda_graph)
        return Limits(chunked_prefill_size=self.info.get("chunked_prefill_size") or extra_arg(extra, "--chunked-prefill-size"),
                      cuda_graph_max_bs=self.info.get("cuda_graph_max_bs") or extra_arg(extra, "--cuda-graph-max-bs"),
                      cuda_graphs=graphs,
                      tp=int(self.info.get("tp_size") or (self.params.sglang.tp if self.params is not None else 1)))

    def counters(self) -> dict[str, int] | None:
        stats = self.plugin_stats()
        return dict(stats["counts"]) if stats else None

    def rank_report(self) -> dict[str, Any] | None:
        return self.plugin_stats()

    def dispatch(self) -> dict[str, Any] | None:
        stats = self.plugin_stats()
        cfg = (stats or {}).get("config", {})
        if not cfg.get("dispatch_rule"):
            return None
        # measured_alone_s: the server set launched the others once this one had measured (servers.ServerSet.start)
        return {"rule": cfg["dispatch_rule"], "measured": cfg.get("dispatch") or {},
                "measured_alone_s": self.handle.measured_alone_s}

    def kernel_phases(self) -> frozenset[str]:
        """sagecheck's sage_attn: prefill, and decode where its statistics say it decodes on the kernel; another backend
        (a fork's): every phase."""
        stats = self.plugin_stats()
        if stats and stats.get("config", {}).get("decode") == "triton":
            return frozenset({"prefill"})
        return frozenset({"prefill", "decode"})

    def census(self) -> dict[str, Any] | None:
        """The server's census of kernel calls (every scheduler process records it, whatever backend serves)."""
        from sagecheck.backend_stats import read_census

        return read_census(self.handle.stats_dir) if self.handle.stats_dir else None

    def cold_logprobs(self, seqs: list[list[int]]) -> PathRun:
        out, cached = [], []
        for seq in seqs:
            self.reset_cache()
            (lp, c), = self.client.scored([seq], 0)
            out.append(lp)
            cached.append(c)
        return PathRun(out, {"cached_tokens": cached})

    def batched_logprobs(self, seqs: list[list[int]]) -> PathRun:
        self.reset_cache()
        got = self.client.scored(seqs, 0)
        return PathRun([lp for lp, _ in got], {"batch": len(seqs), "cached_tokens": [c for _, c in got]})

    def continuation_logprobs(self, seqs: list[list[int]], starts: list[int]) -> PathRun:
        got = self.client.scored(seqs, starts)
        return PathRun([lp for lp, _ in got], {"cached_tokens": [c for _, c in got]})

    def prefix_logprobs(self, seq: list[int], prefix: int) -> PathRun:
        """An earlier request leaves ``seq[:prefix]`` in the radix cache; the sequence then asks for log-probabilities
        from ``prefix`` on, which lets SGLang reuse up to that many cached tokens."""
        from sagecheck import census

        self.reset_cache()
        self.client.generate(seq[:prefix], max_new_tokens=1)
        before = self._settled_census()
        (lp, cached), = self.client.scored([seq], prefix)
        after = self._settled_census() if before is not None else None
        calls = census.difference(after, before) if after is not None else None
        return PathRun([lp], {"cached_tokens": cached, "prefix": prefix, **({"kernel_calls": calls} if calls is not None else {})})

    def _settled_census(self) -> dict[str, Any] | None:
        """The server's census once what just ran was written (its processes write at intervals)."""
        import time

        from sagecheck.backend_stats import settle_s

        if self.census() is None:
            return None
        time.sleep(settle_s())
        return self.census()

    def chunked_logprobs(self, seq: list[int], chunk: int) -> PathRun:
        """The server chunks by its own ``--chunked-prefill-size`` (``chunk`` is what the caller read from it); evidence:
        the request's own kernel calls (``kernel_calls``), apart from the reference extend 10 runs after it."""
        from sagecheck import census

        self.reset_cache()
        before = self._settled_census()
        (lp, cached), = self.client.scored([seq], 0)
        after = self._settled_census() if before is not None else None
        calls = census.difference(after, before) if after is not None else None
        return PathRun([lp], {"chunks": -(-len(seq) // chunk), "chunk_tokens": chunk, "cached_tokens": cached,
                              **({"kernel_calls": calls} if calls is not None else {})})

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        return self.client.input_logprobs(batch)

    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> TopK:
        values, indices = self.client.top_logprobs(ids, top_k or 20)
        return TopK(values, indices)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.client.greedy(prompts, max_new_tokens)

    def generate_scored(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generated]:
        return [Generated(tokens, np.asarray(lps, dtype=np.float64))
                for tokens, lps in self.client.greedy_scored(prompts, max_new_tokens)]


class SGLangEngine(Engine):
    name = "sglang"
    capabilities = frozenset({SERVERS, SERVER_MEMORY, CUDA_GRAPHS, RADIX_CACHE})
    _SERVED = ("model", "revision", "dtype", "engine", "sglang_baseline_backend", "sglang_attention_backend",
               "sglang.sage_attn_decode", "sglang.sage_attn_prefill",
               "sglang.sage_attn_dispatch")
    speed_depends_on = (*_SERVED, "throughput.decode_tokens")
    memory_depends_on = (*_SERVED, "sglang.max_total_tokens", "memory.decode_tokens")

    @classmethod
    def facts(cls, params: Any) -> dict[str, Any]:
        out = super().facts(params)
        base = out["labels"]["baseline"]
        s = params.sglang
        plugin = params.sglang_attention_backend == PLUGIN
        extra = (f"; sage_attn prefill {s.sage_attn_prefill}, dispatch {s.sage_attn_dispatch}, decode on {s.sage_attn_decode}"
                 if plugin else "")
        out["description"] = (f"SGLang --attention-backend `{params.sglang_baseline_backend}` (baseline) vs "
                              f"`{params.sglang_attention_backend}` (candidate{extra})")
        env = (f" (SAGE_ATTN_PREFILL={s.sage_attn_prefill}, SAGE_ATTN_DISPATCH={s.sage_attn_dispatch}, "
               f"SAGE_ATTN_DECODE={s.sage_attn_decode})" if plugin else "")
        out["table"] = {"model": params.model, "engine": params.engine, "baseline server": f"--attention-backend {base}",
                        "candidate server": f"--attention-backend {params.sglang_attention_backend}{env}",
                        "tensor parallel": s.tp, "in-process pair (06, 08)": f"{params.baseline} vs {params.candidate}",
                        "accuracy thresholds from": f"the control {params.accuracy_control} against {params.baseline}, in process",
                        "seed": params.seed}
        out["tp"] = s.tp
        return out

    @classmethod
    def check_machine(cls, params: Any) -> None:
        """Where sagecheck starts the servers: no more tensor-parallel ranks than the GPUs this machine shows."""
        from sagecheck.engines.sglang.servers import check_tensor_parallel, visible_gpus

        if not params.sglang.url:
            check_tensor_parallel(params.sglang.tp, visible_gpus())

    @classmethod
    def run_servers(cls, params: Any, notebooks: list[str], log_dir: Any, env: dict[str, str] | None = None,
                    progress: bool = False) -> ServerSet | None:
        """Baseline, candidate and (for 04's A/A control) a copy of the baseline, started once for the notebooks that
        measure with the run's engine (:mod:`.servers`); None where none needs a server or the servers were given."""
        from sagecheck.engines.sglang.servers import needed_roles

        roles = needed_roles(params, notebooks)
        return ServerSet(params, Path(log_dir), roles, env=env, progress=progress).start() if roles else None

    def __init__(self, params: Any, log_dir: Path, env: dict[str, str] | None = None,
                 servers: dict[str, dict[str, Any]] | None = None) -> None:
        from sagecheck import models
        from sagecheck.params import labels

        self.params = params
        self.log_dir = Path(log_dir)
        self.env = env
        self.handles = {role: ServerHandle.from_dict(h) for role, h in (servers or {}).items()}
        self._own: ServerSet | None = None
        self.tokenizer = models.load_tokenizer(models.resolve(params.model, params.revision))
        self.max_context = None
        self.baseline, self.candidate = labels(params)
        self.copy = f"{self.baseline} copy"

    @classmethod
    def from_params(cls, params: Any, log_dir: str | Path | None = None, **_: Any) -> "SGLangEngine":
        return cls(params, Path(log_dir) if log_dir else Path.cwd() / "sglang-logs", servers=getattr(params, "servers", None))

    def timed_gpus(self) -> tuple[list[int] | None, str]:
        return servers_gpus(self.params)

    def model_config(self) -> Any:
        from sagecheck import models

        return models.load_config(models.resolve(self.params.model, self.params.revision))

    def role(self, label: str) -> str | None:
        return {self.baseline: BASELINE, self.candidate: CANDIDATE, self.copy: BASELINE_COPY}.get(label)

    def backend_name(self, label: str) -> str:
        """The ``--attention-backend`` a label's server runs."""
        role = self.role(label)
        return backend_for(self.params, role) if role else label

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
    def backend(self, label: str, layers: set[int] | None = None) -> Iterator[SGLangBackend]:
        """The server of ``label``'s role (kept running), or a server of its own for another backend name."""
        if layers is not None:
            from sagecheck.engines import HIDDEN_STATES, NotAvailable

            raise NotAvailable(self.name, HIDDEN_STATES)
        role = self.role(label)
        if role is None:
            with self.own_server(label) as (server, client, info):
                yield SGLangBackend(client, label, ServerHandle("other", label, url=server.url), info, self.params)
            return
        handle = self.handle(role)
        client = self.client(handle)
        info = client.server_info()
        self.max_context = info.get("context_length") or info.get("max_req_input_len")
        yield SGLangBackend(client, label, handle, info, self.params)

    def candidate_ran(self) -> str:
        """What the candidate server ran (the sage_attn plugin's statistics)."""
        from sagecheck.backend_stats import describe

        handle = self.handles.get(CANDIDATE)
        if handle is None:
            return "the candidate server was not used"
        if handle.error:
            return f"the candidate server did not start: {handle.error.splitlines()[0]}"
        backend = self.params.sglang_attention_backend
        if backend != PLUGIN:  # e.g. an A/A run, triton on both sides: no plugin statistics to expect
            return f"--attention-backend {backend}, not sagecheck's {PLUGIN} (no plugin statistics)"
        return describe(plugin_stats(handle))

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

    def flag_checks(self, prompt_ids: list[int], max_new_tokens: int, serving: list[str] = (),
                    refused: list[str] = ()) -> list[dict[str, Any]]:
        """01's checks on servers (:mod:`.flag`)."""
        from sagecheck.engines.sglang.flag import server_checks

        return server_checks(self, prompt_ids, max_new_tokens, serving, refused)

    def close(self) -> None:
        if self._own is not None:
            self._own.stop()
            self._own = None
