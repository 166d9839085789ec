"""The SGLang servers of a run: baseline, candidate and an A/A copy of the baseline, started once, side by side.

Why side by side, once per run: a server takes one to two minutes to start (CUDA graphs are
captured), so starting two per notebook would cost more than the measurements; and speed can
only be compared fairly between servers that run at the same time, measured interleaved
request by request, under the same settings. Two servers of the *same* backend started
apart, with different ``--mem-fraction-static``, were far apart in speed (README), so the set is started with identical command lines except for the memory
fraction, and the throughput notebook measures an A/A pair (baseline against its copy) beside
the A/B pair. The copy is started only where it is measured (04_throughput, ``aa_control``).

Memory: SGLang sizes a server's static memory (weights + KV cache) as a fraction of the whole
GPU, the memory of servers already running included. Without ``sglang.max_total_tokens`` each
server would take all the KV cache its fraction allows, so the set starts one after the other and
the i-th server gets ``i × share`` (share = 0.85 / 3 unless ``sglang.mem_fraction_static`` sets the
first's), which leaves each about the same room. With ``sglang.max_total_tokens``
(``--max-total-tokens``: the same KV capacity for all, so that no server's batching differs) a
server takes only that, and the set starts side by side, every server with the same fraction
(``sglang.mem_fraction_static`` or 0.85): identical command lines, and the one to two minutes of
start-up paid once instead of per server (mostly imports). One exception: a candidate that times kernels at start
(sage_attn's dispatch rule) is launched first and the others once it has measured, so that its timings are not taken
while the others load weights and capture CUDA graphs on the same GPU (on an H100, 2026-12-05, the bare kernel at
16384 keys read 5.5 ms and the kernel path, which makes that call and more, 3.2 ms, in one such measurement).

A server that fails to start is recorded with its error; the notebooks that need it fail with
that error, the others run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sagecheck.engines.sglang.server import Server, ServerError, launch_spec

BASELINE, CANDIDATE, BASELINE_COPY = "baseline", "candidate", "baseline_copy"
ROLES = (BASELINE, CANDIDATE, BASELINE_COPY)
SHARE = 0.85 / len(ROLES)
SIDE_BY_SIDE_FRACTION = 0.85  # each server of a set started at once (KV cache capped by --max-total-tokens)


def stepped_fraction(index: int, first: float | None = None) -> float:
    """``--mem-fraction-static`` of the index-th (1-based) server running at once on a GPU."""
    return round(min(0.92, index * (first or SHARE)), 3)


def needed_roles(params: Any, notebooks: Iterable[str]) -> list[str]:
    """The roles the selected notebooks need (none unless the engine is SGLang and no server was given by URL): the
    baseline and the candidate for every notebook that measures with the run's engine, the copy for 04's A/A control."""
    from sagecheck.params import SECTIONS, section_for

    if params.engine != "sglang" or params.sglang.url or params.sglang.baseline_url:
        return []
    sections = {section_for(nb) for nb in notebooks} - {None}
    if not any(SECTIONS[s].uses_engine == "run" for s in sections):
        return []
    roles = [BASELINE, CANDIDATE]
    if "throughput" in sections and params.throughput.aa_control:
        roles.append(BASELINE_COPY)
    return roles


def check_tensor_parallel(tp: int, gpus: int | None) -> None:
    """SGLang runs one scheduler process per tensor-parallel rank, each on its own GPU: ``sglang.tp`` larger than the
    GPUs this machine shows fails here in one line, not after minutes of server start-up. ``gpus`` None: not known
    (no CUDA in this process; the servers may still see GPUs, so SGLang decides)."""
    from sagecheck.params import ParamError

    if gpus is not None and tp > gpus:
        raise ParamError(f"parameter 'sglang.tp' = {tp}: tensor parallelism over {tp} GPUs, but this machine shows {gpus} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use sglang.tp <= {gpus}")


def visible_gpus() -> int | None:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


@dataclass
class ServerHandle:
    """What a notebook needs of one server of the set (travels to notebooks as a plain dict)."""

    role: str
    attention_backend: str | None
    url: str | None = None
    pid: int | None = None
    log: str | None = None
    stats_dir: str | None = None
    mem_fraction_static: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    stats_at_start: dict[str, int] = field(default_factory=dict)  # the plugin's counters once ready (warm-up, graph capture)
    # seconds from its launch to its start-up measurement, taken before the set's other servers were launched (None:
    # it measured nothing at start, or not alone)
    measured_alone_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServerHandle":
        return cls(**data)


def backend_for(params: Any, role: str) -> str:
    return params.sglang_attention_backend if role == CANDIDATE else params.sglang_baseline_backend


def role_env(params: Any, role: str, log_dir: Path) -> dict[str, str]:
    """The sage_attn plugin's settings for the candidate (decode mode, statistics folder); nothing for the others."""
    if role != CANDIDATE:
        return {}
    return {"SAGE_ATTN_DECODE": params.sglang.sage_attn_decode, "SAGE_ATTN_PREFILL": params.sglang.sage_attn_prefill,
            "SAGE_ATTN_DISPATCH": params.sglang.sage_attn_dispatch,
            "SAGE_ATTN_STATS_DIR": str(Path(log_dir) / f"sage_attn-stats-{role}")}


def measures_at_start(params: Any, role: str) -> bool:
    """Whether the role's server times kernels when it starts: sage_attn's dispatch rule, measured (it writes its
    statistics, where the measurement shows up)."""
    return (role == CANDIDATE and params.sglang_attention_backend == "sage_attn"
            and params.sglang.sage_attn_dispatch == "measured")


def counters_when_ready(stats_dir: str | None) -> dict[str, int]:
    """The sage_attn plugin's counters once its server is ready: SGLang's own warm-up and CUDA-graph capture ran
    batches through the backend, which the notebooks subtract (the plugin writes at intervals: wait for it)."""
    from sagecheck import backend_stats as stats

    if not stats_dir:
        return {}
    time.sleep(2 * stats.settle_s())
    return dict((stats.read(stats_dir) or {}).get("counts", {}))


class ServerSet:
    """Start the given roles (side by side where the KV cache is capped, else one after the other: module docstring),
    hand out their URLs, stop them all."""

    def __init__(self, params: Any, log_dir: Path, roles: Iterable[str], env: dict[str, str] | None = None,
                 progress: bool = False) -> None:
        self.params = params
        self.log_dir = Path(log_dir)
        self.roles = list(roles)
        self.env = dict(env or {})
        self.progress = progress
        self.servers: dict[str, Server] = {}
        self.handles: dict[str, ServerHandle] = {}

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"sagecheck: {text}", file=sys.stderr, flush=True)

    def start(self) -> "ServerSet":
        if not self.params.sglang.max_total_tokens:
            for role in self.roles:
                self._ready(*self._launch(role, stepped_fraction(len(self.servers) + 1, self.params.sglang.mem_fraction_static)))
            return self
        fraction = self.params.sglang.mem_fraction_static or SIDE_BY_SIDE_FRACTION
        # a server that times kernels at start (sage_attn's dispatch rule) measures first, with the GPU to itself: started
        # beside the others it timed its kernels while they loaded and captured CUDA graphs on the same GPU
        first = [role for role in self.roles if measures_at_start(self.params, role)]
        launched = [self._launch(role, fraction) for role in first]
        for server, handle in launched:
            self._wait_measured(server, handle)
        launched += [self._launch(role, fraction) for role in self.roles if role not in first]  # the rest start now ...
        self.handles = {role: self.handles[role] for role in self.roles}  # in the roles' order, as asked
        for server, handle in launched:  # ... and are waited for in turn: together, the slowest one's start-up
            self._ready(server, handle)
        return self

    def _wait_measured(self, server: Server | None, handle: ServerHandle, poll_s: float = 0.5) -> None:
        """Until the server's statistics hold its start-up measurement (every rank's), it exits, or its start-up time
        runs out (then :meth:`_ready` says why); the time it took is in ``handle.measured_alone_s``."""
        from sagecheck import backend_stats

        if server is None:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.params.sglang.startup_timeout_s and server.process.poll() is None:
            stats = backend_stats.read(handle.stats_dir) or {}
            ranks = stats.get("ranks") or []
            if len(ranks) >= max(1, self.params.sglang.tp) and all("dispatch" in r for r in ranks):
                handle.measured_alone_s = round(time.monotonic() - t0, 1)
                self._say(f"the {handle.role} server measured its kernels at start ({handle.measured_alone_s} s)")
                return
            time.sleep(poll_s)

    def start_role(self, role: str) -> ServerHandle:
        """Start one more server, with the next stepped fraction (servers started one after the other)."""
        return self._ready(*self._launch(role, stepped_fraction(len(self.servers) + 1, self.params.sglang.mem_fraction_static)))

    def _launch(self, role: str, fraction: float) -> tuple[Server | None, ServerHandle]:
        backend = backend_for(self.params, role)
        renv = role_env(self.params, role, self.log_dir)
        spec = launch_spec(self.params, backend, self.log_dir, mem_fraction_static=fraction)
        server = Server(spec, self.log_dir, self.params.sglang.startup_timeout_s, env={**self.env, **renv}, name=role)
        handle = ServerHandle(role, backend, log=str(server.log_path), stats_dir=renv.get("SAGE_ATTN_STATS_DIR"),
                              mem_fraction_static=fraction, env=renv)
        self.handles[role] = handle
        self._say(f"starting the {role} SGLang server (--attention-backend {backend}, --mem-fraction-static {fraction})")
        try:
            server.launch()
        except OSError as e:
            handle.error = f"the {role} SGLang server could not be launched: {e}"
            self._say(handle.error)
            return None, handle
        self.servers[role] = server
        return server, handle

    def _ready(self, server: Server | None, handle: ServerHandle) -> ServerHandle:
        if server is None:
            return handle
        try:
            server.wait_ready()
        except ServerError as e:
            handle.error = str(e)
            self.servers.pop(handle.role, None)
            server.stop()
            self._say(f"the {handle.role} server did not start: {e.cause}")
        else:
            handle.url, handle.pid, handle.log = server.url, server.process.pid, str(server.log_path)
            handle.stats_at_start = counters_when_ready(handle.stats_dir)
        return handle

    def as_dicts(self) -> dict[str, dict[str, Any]]:
        return {role: h.to_dict() for role, h in self.handles.items()}

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def __enter__(self) -> "ServerSet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
