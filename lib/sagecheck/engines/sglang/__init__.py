"""The SGLang engine: a real ``sglang.launch_server`` per attention backend, driven over HTTP.

Names: the notebooks ask for ``params.baseline`` and ``params.candidate``; here they mean
the SGLang backends ``params.sglang_baseline_backend`` (e.g. ``fa3``) and
``params.sglang_attention_backend`` (``sage_attn``). Any other name is passed to
``--attention-backend`` as it is. With ``sglang.url`` (and ``sglang.baseline_url``) the
engine attaches to servers that are already running instead of starting them.

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

__all__ = ["SGLangEngine", "SGLangBackend", "ServerError", "ClientError", "launch_spec", "runtime_flag_checks",
           "throughput_sweep", "memory_report"]


def launch_spec(params: Any, backend: str | None, log_dir: Path) -> LaunchSpec:
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
        mem_fraction_static=s.mem_fraction_static, disable_cuda_graph=s.disable_cuda_graph,
        context_length=s.context_length, seed=params.seed, load_format=load_format, extra_args=extra,
        python=s.python or sys.executable,
    )


class SGLangBackend(Backend):
    capabilities = frozenset()

    def __init__(self, client: SGLangClient, implementation: str, server: Server | None, info: dict[str, Any]) -> None:
        self.client = client
        self.implementation = implementation
        self.server = server
        self.info = info

    def describe(self) -> dict[str, Any]:
        return {"name": self.implementation, "attention_backend": self.info.get("attention_backend"),
                "sglang_version": self.info.get("version")}

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        return self.client.input_logprobs(batch)

    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> TopK:
        values, indices = self.client.top_logprobs(ids, top_k or 20)
        return TopK(values, indices)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.client.greedy(prompts, max_new_tokens)


class SGLangEngine(Engine):
    name = "sglang"

    def __init__(self, params: Any, log_dir: Path, env: dict[str, str] | None = None) -> None:
        from sagecheck import models

        self.params = params
        self.log_dir = Path(log_dir)
        self.env = env
        self.tokenizer = models.load_tokenizer(models.resolve(params.model, params.revision))
        self.max_context = None

    @classmethod
    def from_params(cls, params: Any, log_dir: str | Path | None = None, **_: Any) -> "SGLangEngine":
        return cls(params, Path(log_dir) if log_dir else Path.cwd() / "sglang-logs")

    def backend_name(self, implementation: str) -> str:
        if implementation == self.params.candidate:
            return self.params.sglang_attention_backend
        if implementation == self.params.baseline:
            return self.params.sglang_baseline_backend
        return implementation

    def _attached_url(self, implementation: str) -> str | None:
        s = self.params.sglang
        if not (s.url or s.baseline_url):
            return None
        url = s.url if implementation == self.params.candidate else s.baseline_url
        if not url:
            role = "candidate" if implementation == self.params.candidate else "baseline"
            raise ServerError(f"attached mode needs a running server for the {role} too: set sglang.url and sglang.baseline_url")
        return url

    @contextmanager
    def backend(self, implementation: str | None) -> Iterator[SGLangBackend]:
        """A server running ``implementation``'s SGLang backend (None: no --attention-backend)."""
        s = self.params.sglang
        url = self._attached_url(implementation) if implementation else None
        if url:
            client = SGLangClient(url, s.request_timeout_s)
            info = client.server_info()
            self.max_context = info.get("context_length") or info.get("max_req_input_len")
            yield SGLangBackend(client, implementation, None, info)
            return
        name = self.backend_name(implementation) if implementation else None
        server = Server(launch_spec(self.params, name, self.log_dir), self.log_dir, s.startup_timeout_s, env=self.env)
        try:
            server.start()
            client = SGLangClient(server.url, s.request_timeout_s, on_failure=server.check_alive)
            info = client.server_info()
            self.max_context = info.get("context_length") or info.get("max_req_input_len")
            yield SGLangBackend(client, implementation or "default", server, info)
        finally:
            server.stop()


# --------------------------------------------------------------------------- notebook helpers


def runtime_flag_checks(params: Any, names: list[str], log_dir: Path, max_new_tokens: int, prompt_ids: list[int]) -> list[dict[str, Any]]:
    """Start a server per backend name; each must report that backend and generate, or fail with SGLang's own error."""
    engine = SGLangEngine(params, log_dir)
    rows = []
    for name in [None, *names]:
        sglang_name = engine.backend_name(name) if name else None
        row = {"implementation": name or "(default)", "attention_backend_asked": sglang_name or "(none: SGLang's default)"}
        try:
            with engine.backend(name) as b:
                out = b.generate([prompt_ids], max_new_tokens)[0]
                row.update({"loaded": True, "error": "", "attention_backend_reported": b.info.get("attention_backend"),
                            "generated_tokens": len(out), "generated": engine.tokenizer.decode(out),
                            "version": b.info.get("version")})
        except (ServerError, ClientError) as e:
            row.update({"loaded": False, "error": str(e), "generated_tokens": 0, "generated": ""})
        rows.append(row)
    return rows


def throughput_sweep(params: Any, lengths: list[int], batches: list[int], log_dir: Path) -> list[dict[str, Any]]:
    """Per backend (one server at a time), per point: time to first token and decode throughput from client-side timing.

    Each repeat flushes the prefix cache first. Prefill = a request for one new token;
    decode = (request for ``decode_tokens`` new tokens - that) / (decode_tokens - 1).
    """
    from sagecheck.metrics.throughput import random_prompts, speedup_fields, timing_row
    from sagecheck.metrics.timing import Samples

    p = params.throughput
    engine = SGLangEngine(params, log_dir)
    vocab = len(engine.tokenizer)
    rows: list[dict[str, Any]] = []
    samples: dict[tuple[str, int, int], dict[str, Samples]] = {}
    for impl in (params.baseline, params.candidate):
        try:
            with engine.backend(impl) as b:
                for length in lengths:
                    for batch in batches:
                        prompts = random_prompts(vocab, batch, length, params.seed, torch.device("cpu")).tolist()
                        pre, full = [], []
                        for r in range(p.warmup + p.repeats):
                            b.client.flush_cache()
                            t1 = b.client.timed_generate(prompts, 1)
                            b.client.flush_cache()
                            tn = b.client.timed_generate(prompts, p.decode_tokens)
                            if r >= p.warmup:
                                pre.append(t1)
                                full.append(tn)
                        pre_s = Samples(np.asarray(pre), "client wall clock")
                        dec_s = Samples(np.maximum(np.asarray(full) - np.asarray(pre), 1e-6), "client wall clock")
                        samples[(impl, batch, length)] = {"prefill": pre_s, "decode": dec_s}
                        row = timing_row(batch, length, impl, pre_s, dec_s, max(1, p.decode_tokens - 1))
                        rows.append({**row, "attention_backend": b.info.get("attention_backend")})
        except (ServerError, ClientError) as e:
            rows += [{"batch": b_, "input_length": l_, "implementation": impl, "status": "server error", "error": str(e)[:300]}
                     for l_ in lengths for b_ in batches]
    for row in rows:
        base = samples.get((params.baseline, row["batch"], row["input_length"]))
        if row["implementation"] == params.candidate and row["status"] == "ok" and base:
            row.update(speedup_fields(base, samples[(params.candidate, row["batch"], row["input_length"])]))
    return rows


def memory_report(params: Any, log_dir: Path) -> list[dict[str, Any]]:
    """Per backend: the KV-cache capacity and memory figures the server reports, and NVML's used memory."""
    from sagecheck.metrics.memory import nvml_used

    engine = SGLangEngine(params, log_dir)
    rows = []
    for impl in (params.baseline, params.candidate):
        try:
            with engine.backend(impl) as b:
                info = b.info
                used = nvml_used(torch.device("cuda", 0)) if torch.cuda.is_available() else None  # None where NVML fails
                states = info.get("internal_states") or [{}]
                rows.append({
                    "implementation": impl, "status": "ok", "attention_backend": info.get("attention_backend"),
                    "max_total_num_tokens": info.get("max_total_num_tokens"),
                    "mem_fraction_static": info.get("mem_fraction_static"),
                    "memory_usage": states[0].get("memory_usage") if isinstance(states[0], dict) else None,
                    "nvml_used_bytes": used,
                })
        except (ServerError, ClientError) as e:
            rows.append({"implementation": impl, "status": "server error", "error": str(e)[:300]})
    return rows

