"""The STAND-IN SGLang server behind ``python -m sglang.launch_server`` (tests only; see the ``sglang`` package docstring).

As SGLang 0.5.15 does, it loads the general plugins of the entry-point group
``sglang.srt.plugins`` before it parses arguments (``sglang.srt.plugins`` here), so
``--attention-backend sage_attn`` is accepted only where sagecheck's plugin is installed
and loaded. Built-in backends ``fa3``, ``flashinfer`` (the default), ``triton``,
``torch_native`` compute SDPA; ``sage_attn`` computes sagecheck's emulation of SageAttention
1.0.6 in prefill (and in decode with ``SAGE_ATTN_DECODE=sage``), refuses to start where
``import sageattention`` fails (the plugin's own check and message), and writes the plugin's
statistics to ``SAGE_ATTN_STATS_DIR``; with ``SAGE_ATTN_DISPATCH=N`` the plugin's dispatch rule sends
a batch of shorter requests to Triton's route (computed here by SDPA, counted as the plugin counts it); with
``SAGE_ATTN_DISPATCH=measured`` and ``SAGECHECK_STANDIN_DISPATCH=cpu`` the crossover is measured at start as the plugin
measures it, on this CPU (the plugin's varlen path on the emulation, the emulation alone, SDPA), and followed. Any other name is refused by the argument parser with
exit code 2, as SGLang does. Failure modes for the tests, chosen by ``SAGECHECK_STANDIN_MODE``:
``crash`` (dies while starting), ``hang`` (never becomes ready), ``die-after:N`` (exits after
answering N /generate requests), and after N answered /generate requests, on every later one:
``stall-after:N`` (never answers), ``http500-after:N`` (HTTP 500), ``badjson-after:N`` (a reply that is
not JSON).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tests.standin import split_prefill

BUILTIN = ("fa3", "flashinfer", "triton", "torch_native")  # all computed with SDPA here


def parse_args(argv=None):
    from sglang.srt.server_args import build_parser

    return build_parser().parse_args(argv)


class State:
    decode = "triton"
    engine = None
    args = None
    backend = None
    name = None
    stats = None
    ready = False
    generate_calls = 0
    die_after = None
    fault = None  # (kind, after): stall, http500 or badjson after N answered /generate requests
    lock = threading.Lock()
    radix = None
    chunk = 8192
    graph_max_bs = 16
    baseline = "sdpa"
    variant = None  # the defect of a deliberately wrong variant (tests/faults), None for sage_attn itself
    split = False  # SAGE_ATTN_PREFILL=batched: prefix extends through the plugin's split (SageAttention 2, emulated)
    crossover = None  # SAGE_ATTN_DISPATCH=N: the plugin's rule (sglang_plugin.dispatch), Triton's route computed by the baseline
    profile = None  # between /start_profile and /stop_profile: {"dir", "id", "events"}


def entries(values, ids):
    """SGLang's [logprob, token_id, text] triples (text only with return_text_in_logprobs)."""
    return [[None if v is None else float(v), int(i), None] for v, i in zip(values, ids)]


class Radix:
    """The prefix cache as SGLang's radix cache behaves for one request: the longest prefix of the request that an
    earlier request (its prompt and its output) left, at most ``limit`` tokens; emptied by /flush_cache."""

    def __init__(self):
        self.seqs = []

    def match(self, ids, limit):
        best = 0
        for seq in self.seqs:
            n = 0
            for a, b in zip(seq, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, max(0, limit))

    def insert(self, ids):
        self.seqs.append(list(ids))

    def flush(self):
        self.seqs.clear()


def prefix_limit(n, want_lp, start):
    """What SGLang lets a request take from the cache (schedule_batch.py): at most n - 1 tokens, and with logprobs from
    logprob_start_len >= 0 at most that many."""
    limit = n - 1
    if want_lp and start >= 0:
        limit = min(limit, start)
    return limit


def prefill(b, seq, cached):
    """Logits of positions cached..n-1 and the KV cache of the whole sequence, by the path a server takes: an extend
    over the cached prefix, chunked prefill above the chunk size, else a cold prefill. Returns (logits, cache, chunks)."""
    from tests.standin import faults

    from sagecheck.census import CENSUS

    model, x = b.model, torch.tensor([seq])
    if cached:
        # a real server reads the cached prefix's keys from its cache: recomputing them here is no kernel call of its
        with faults.path("prefill"), CENSUS.paused():
            cache = model(input_ids=x[:, :cached], use_cache=True).past_key_values
        with faults.path("radix_extend"):
            out = model(input_ids=x[:, cached:], past_key_values=cache, use_cache=True)
        return out.logits[0].double(), out.past_key_values, 1
    cache, parts = None, []
    for start in range(0, len(seq), State.chunk):
        with faults.path("prefill" if start == 0 else "chunk_extend"):
            out = model(input_ids=x[:, start:start + State.chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        parts.append(out.logits[0].double())
    return torch.cat(parts), cache, len(parts)


def handle_generate(req: dict):
    from tests.standin import faults

    ids = req["input_ids"]
    batch = ids if ids and isinstance(ids[0], list) else [ids]
    sp = req.get("sampling_params") or {}
    n_new = int(sp.get("max_new_tokens", 16))
    want_lp = bool(req.get("return_logprob"))
    starts = req.get("logprob_start_len")
    starts = starts if isinstance(starts, list) else [starts] * len(batch)
    starts = [-1 if s is None else int(s) for s in starts]
    top = int(req.get("top_logprobs_num") or 0)
    engine, impl = State.engine, State.backend
    # decode steps replay a CUDA graph up to the largest captured batch, unless graphs are off (kernel decode needs them off)
    graph = not State.args.disable_cuda_graph and State.decode != "sage" and len(batch) <= State.graph_max_bs
    outs = []
    on_kernel = True
    if State.crossover is not None:  # the plugin's own rule on the batch's lengths (its cached prefixes before it runs)
        from sagecheck.sglang_plugin.dispatch import to_kernel

        prefix = [State.radix.match(seq, prefix_limit(len(seq), want_lp, st)) for seq, st in zip(batch, starts)]
        on_kernel = to_kernel(prefix, [len(seq) - p for seq, p in zip(batch, prefix)], State.crossover)
        if State.variant != "route_miscount":  # that variant runs the kernel all the same, counted as Triton's
            impl = impl if on_kernel else State.baseline
    with State.lock, engine.backend(impl) as b, torch.inference_mode():
        rounds, with_prefix, kernel_calls = 1, False, 0
        for seq, start in zip(batch, starts):
            cached = State.radix.match(seq, prefix_limit(len(seq), want_lp, start))
            logits, cache, chunks = prefill(b, seq, cached)  # logits[i] belongs to position cached + i
            rounds, with_prefix = max(rounds, chunks), with_prefix or cached > 0 or chunks > 1
            # the split's sageattn calls per layer, as the plugin counts them: one for a cold prefill, two for an extend
            # over a cached prefix (every chunk after the first is one)
            kernel_calls += 2 if cached else 2 * chunks - 1
            logp = torch.log_softmax(logits, dim=-1)
            gen, out_lp, out_rows = [], [], [logp[-1]]
            tok = int(logp[-1].argmax())
            faults.start_sequence()
            for step in range(n_new):
                gen.append(tok)
                out_lp.append(float(out_rows[-1][tok]))
                if step + 1 == n_new:
                    break
                with faults.path("graph_decode" if graph else "eager_decode"):
                    step_logits, cache = b.decode_step(torch.tensor([tok]), cache)
                out_rows.append(torch.log_softmax(step_logits[0].double(), dim=-1))
                tok = int(out_rows[-1].argmax())
            State.radix.insert(seq + gen)
            meta = {"prompt_tokens": len(seq), "completion_tokens": len(gen), "cached_tokens": cached,
                    "finish_reason": {"type": "length", "length": len(gen)}}
            if want_lp:
                # entry t: log p(x_t | x_<t) where the logits of position t-1 were computed (not inside a cached prefix)
                input_lp = [float(logp[t - 1 - cached, seq[t]]) if t - 1 >= cached else None for t in range(len(seq))]
                input_lp[0] = None
                if start >= 0:
                    meta["input_token_logprobs"] = entries(input_lp[start:], seq[start:])
                meta["output_token_logprobs"] = entries(out_lp, gen)
                if top:
                    def top_rows(rows):
                        pairs = [r.topk(top) for r in rows]
                        return [entries(v.tolist(), i.tolist()) for v, i in pairs]

                    if start >= 0:
                        rows = [logp[t - 1 - cached] if t - 1 >= cached else None for t in range(1, len(seq))]
                        meta["input_top_logprobs"] = ([None] + [None if r is None else top_rows([r])[0] for r in rows])[start:]
                    meta["output_top_logprobs"] = top_rows(out_rows)
            outs.append({"text": engine.tokenizer.decode(gen), "output_ids": gen, "meta_info": meta})
    if State.stats is not None:  # what the plugin counts: the prefill batches (chunks), then the decode steps
        route = "kernel" if on_kernel else "triton"
        State.stats.count(f"extend_batches_{route}", rounds)
        State.stats.count(f"extend_tokens_{route}", sum(len(x) for x in batch))
        if with_prefix:
            State.stats.count("extend_batches_with_prefix" + ("" if on_kernel else "_triton"), rounds if rounds > 1 else 1)
            if State.split and on_kernel:
                State.stats.count("extend_batches_split", rounds if rounds > 1 else 1)
        if State.split and on_kernel:  # one request per call here: no padded token
            State.stats.count("extend_kernel_calls", kernel_calls)
        steps = max(0, n_new - 1)
        if graph:
            State.stats.count("decode_graph_replays", steps)
        else:
            State.stats.count("decode_batches_kernel" if State.decode == "sage" else "decode_batches_triton", steps)
    return outs if ids and isinstance(ids[0], list) else outs[0]


def stream_chunks(req: dict, outs):
    """SGLang's streamed answer: per generated token a chunk of each request (with its ``index``), then [DONE]."""
    outs = outs if isinstance(outs, list) else [outs]
    n = max(len(o["output_ids"]) for o in outs)
    for j in range(n):
        for i, o in enumerate(outs):
            if j >= len(o["output_ids"]):
                continue
            done = j + 1 == len(o["output_ids"])
            meta = {"id": f"standin-{i}", "prompt_tokens": o["meta_info"]["prompt_tokens"], "completion_tokens": j + 1,
                    "finish_reason": {"type": "length", "length": j + 1} if done else None}
            yield {"text": "", "output_ids": o["output_ids"][: j + 1], "meta_info": meta, "index": i}


def profiled(fn):
    """``fn()``, under torch's profiler while a profile is on (SGLang's ``/start_profile``): its CPU ops are kept as
    Chrome trace events. Each request is profiled in its own handler thread, where torch's profiler sees its ops."""
    if State.profile is None:
        return fn()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    State.profile["events"].extend({"ph": "X", "cat": "cpu_op", "name": e.name, "ts": e.time_range.start,
                                    "dur": e.time_range.elapsed_us(), "pid": os.getpid(), "tid": e.thread}
                                   for e in prof.events())
    return result


def write_profile() -> None:
    """SGLang's file: ``{output_dir}/{profile_id}-TP-0.trace.json.gz``."""
    import gzip

    folder = Path(State.profile["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{State.profile['id']}-TP-0.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": State.profile["events"]}, f)
    State.profile = None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("standin: " + (fmt % args) + "\n")

    def _send(self, code: int, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path in ("/health", "/health_generate"):
            return self._send(200 if State.ready else 503, b"", "text/plain")
        if not State.ready:
            return self._send(503, {"error": "starting"})
        if self.path == "/get_model_info":
            return self._send(200, {"model_path": State.args.model_path, "tokenizer_path": State.args.model_path, "is_generation": True})
        if self.path in ("/get_server_info", "/server_info"):
            cfg = State.engine.model.config
            a = State.args
            # the stand-in computes one request at a time; its "capacity" is what --max-total-tokens says, else the context
            capacity = a.max_total_tokens or cfg.max_position_embeddings
            weights_gb = sum(p.numel() * p.element_size() for p in State.engine.model.parameters()) / 2**30
            return self._send(200, {
                "model_path": a.model_path, "tokenizer_path": a.model_path, "attention_backend": State.name,
                "dtype": a.dtype, "tp_size": a.tp_size, "mem_fraction_static": a.mem_fraction_static,
                "random_seed": a.random_seed, "context_length": a.context_length or cfg.max_position_embeddings,
                "disable_cuda_graph": a.disable_cuda_graph, "cuda_graph_max_bs": State.graph_max_bs,
                "chunked_prefill_size": State.chunk,
                "max_total_num_tokens": capacity, "max_req_input_len": cfg.max_position_embeddings - 1,
                "internal_states": [{"memory_usage": {"weight": round(weights_gb, 2), "kvcache": 0.0, "token_capacity": capacity,
                                                      "graph": 0.0},
                                     "effective_max_running_requests_per_dp": 64}],
                "version": "0.0.0-standin",
            })
        if self.path == "/flush_cache":
            State.radix.flush()
            return self._send(200, b"Cache flushed.\n", "text/plain")
        return self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/flush_cache":
            State.radix.flush()
            return self._send(200, b"Cache flushed.\n", "text/plain")
        if self.path == "/start_profile":
            req = json.loads(body or b"{}")
            State.profile = {"dir": req.get("output_dir") or "/tmp", "id": req.get("profile_id") or str(time.time()),
                             "events": []}
            return self._send(200, b"Start profiling.\n", "text/plain")
        if self.path == "/stop_profile":
            if State.profile is None:
                return self._send(500, {"error": {"message": "Profiling is not in progress. Call /start_profile first."}})
            write_profile()
            return self._send(200, b"Stop profiling. This will take some time.\n", "text/plain")
        if self.path != "/generate":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if not State.ready:
            return self._send(503, {"error": {"message": "server is starting"}})
        State.generate_calls += 1
        if State.die_after is not None and State.generate_calls > State.die_after:
            sys.stderr.write("standin: simulated crash in the scheduler (die-after)\n")
            sys.stderr.flush()
            os._exit(1)
        if State.fault is not None and State.generate_calls > State.fault[1]:
            kind = State.fault[0]
            if kind == "stall":  # ready, then a request that never gets its answer
                time.sleep(3600)
            if kind == "http500":
                return self._send(500, {"error": {"message": "standin: simulated internal error"}})
            return self._send(200, b'{"meta_info": {"input_token_logprobs": [[-1.0, 5, nul', "application/json")
        try:
            req = json.loads(body)
            outs = profiled(lambda: handle_generate(req))
        except Exception as e:  # reported like SGLang's error response
            return self._send(400, {"error": {"message": f"{type(e).__name__}: {e}"}})
        if not req.get("stream"):
            return self._send(200, outs)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in stream_chunks(req, outs):
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


def candidate_phases(name):
    """The phases a plugin backend computes with SageAttention (sage_attn and its test-only variants: prefill; decode
    only with SAGE_ATTN_DECODE=sage)."""
    if name != "sage_attn" and not name.startswith("sage_attn_"):
        raise SystemExit(f"standin: the plugin backend {name!r} has no stand-in computation")
    if importlib.util.find_spec("sageattention") is not None:
        from sagecheck.sglang_plugin.varlen import load_kernel

        load_kernel()  # the plugin's own check: raises its message where the import fails
    return ("prefill", "decode") if os.environ.get("SAGE_ATTN_DECODE") == "sage" else ("prefill",)


def measure_dispatch_on_cpu(cfg, max_length: int):
    """The plugin's measurement at start, on this CPU (``SAGECHECK_STANDIN_DISPATCH=cpu``): one layer of one request of L
    tokens through the plugin's own varlen path (packing, smoothing) on sagecheck's emulation of sageattn_varlen, the
    emulated kernel alone on keys smoothed beforehand, and SDPA standing for Triton's extend kernel; the crossover the
    plugin's rule takes from them. CPU timings, labelled so."""
    from sagecheck.attention.baseline import sdpa
    from sagecheck.sglang_plugin import dispatch as plugin_dispatch
    from sagecheck.sglang_plugin.varlen import ExtendLayout, extend_attention

    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    scale = d ** -0.5

    def sage_emulated_hnd(q, k, v, causal, sm_scale, smooth_k):
        from sagecheck.attention.sage_emulated import sage_emulated
        from sagecheck.census import CENSUS

        with CENSUS.paused():  # the measurement's calls stand for no request's
            o = sage_emulated(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=causal,
                              scale=sm_scale, smooth_k=smooth_k)
        return o[0].transpose(0, 1)

    def emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, sm_scale=None, smooth_k=True):
        out = torch.empty(q.shape, dtype=q.dtype)
        for i in range(len(cu_q) - 1):
            a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            o = sage_emulated_hnd(q[a:b], k[c:e], v[c:e], is_causal, sm_scale, smooth_k)
            out[a:b] = o
        return out

    def inputs(n):
        return plugin_dispatch.request_inputs(n, heads, kv_heads, d, torch.float32, "cpu")

    def kernel_path(n):
        q, k, v = inputs(n)
        layout = ExtendLayout.build([0], [n])
        return lambda: extend_attention(emulated_varlen, q, k, v, None, None, layout, scale)

    def alone(n):
        q, k, v = inputs(n)
        k = k - k.mean(0, keepdim=True)
        return lambda: sage_emulated_hnd(q, k, v, True, scale, False)

    def triton(n):
        q, k, v = inputs(n)
        qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        return lambda: sdpa(qh, kh, vh, causal=True, scale=scale)

    def kernel_path_prefix(n):  # the first half cached: the plugin's whole-sequence varlen path (1.0.6's), emulated
        q, k, v = inputs(n)
        p = n // 2
        layout = ExtendLayout.build([p], [n - p])
        return lambda: extend_attention(emulated_varlen, q[p:], k[p:], v[p:], k[:p], v[:p], layout, scale)

    def triton_prefix(n):
        q, k, v = inputs(n)
        qh, kh, vh = q[n // 2:].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        return lambda: sdpa(qh, kh, vh, causal=True, scale=scale)

    def cpu_ms(fn, warmup=1, repeats=5):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    where = f"stand-in on a CPU, {heads} query / {kv_heads} KV heads of {d}, float32, one request of L tokens"
    timers = plugin_dispatch.Timers(kernel_path, triton, alone, kernel_path_prefix=kernel_path_prefix,
                                    triton_prefix=triton_prefix)
    return plugin_dispatch.measure(timers, max_length, where,
                                   lengths=(16, 32, 64, 128, 256), time=cpu_ms,
                                   timing="ms per layer, median of 5 CPU timings (perf_counter) after 1 warm-up; SDPA "
                                          "stands for Triton's extend kernel")


def split_candidate(fault):
    """The candidate's attention where sage_attn's prefill is SageAttention 2's (``SAGE_ATTN_PREFILL=batched``): the
    plugin's own split on the emulated kernel (:mod:`tests.standin.split_prefill`), or a variant's defective split."""
    from sagecheck.registry import ATTENTION

    if fault not in (None, "split_own_means"):
        raise SystemExit(f"standin: the variant {State.name} has no stand-in computation with SAGE_ATTN_PREFILL=batched")
    name = "sage_attn-split" if fault is None else "sage_attn-split-own-means"
    if name not in ATTENTION:
        target = ("tests.standin.split_prefill:prefill" if fault is None else "tests.standin.split_prefill:prefill_own_means")
        ATTENTION.register(name, target, role="candidate", description=f"stand-in: {split_prefill.KERNEL}")
    return name


class RankStats:
    """The statistics of each tensor-parallel rank, as SGLang's scheduler processes write them (one file per rank,
    every batch counted on each); the stand-in computes on one process."""

    def __init__(self, ranks: list) -> None:
        self.ranks = ranks

    def count(self, key: str, n: int = 1) -> None:
        for r in self.ranks:
            r.count(key, n)


def main(argv=None):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import DEFAULT_ATTENTION_BACKEND

    load_plugins()  # before the arguments are parsed, as SGLang does
    args = parse_args(argv)
    State.args = args
    State.name = args.attention_backend or DEFAULT_ATTENTION_BACKEND
    mode = os.environ.get("SAGECHECK_STANDIN_MODE", "")
    print(f"standin sglang: model {args.model_path}, attention backend {State.name}", flush=True)
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: standin: simulated failure while loading the model", flush=True)
        sys.exit(1)
    if mode.startswith("die-after:"):
        State.die_after = int(mode.split(":", 1)[1])
    for kind in ("stall", "http500", "badjson"):
        if mode.startswith(f"{kind}-after:"):
            State.fault = (kind, int(mode.split(":", 1)[1]))
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if mode == "hang":
        while True:
            time.sleep(1)
    from sagecheck import models
    from sagecheck.engines.hf import HFEngine

    torch.set_num_threads(1)
    State.radix = Radix()
    State.chunk = args.chunked_prefill_size or 8192
    State.graph_max_bs = args.cuda_graph_max_bs or 16
    dtype = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32}.get(args.dtype, torch.float32)
    src = models.resolve(args.model_path)
    model = models.load_model(src, torch.device("cpu"), dtype, "sagecheck-sdpa", seed=args.random_seed or 0)
    phases = ("prefill", "decode")
    State.backend = baseline = "sdpa"
    if State.name not in BUILTIN:
        assert State.name in ATTENTION_BACKENDS, f"{State.name} passed the parser but no plugin registered it"
        phases = candidate_phases(State.name)
        from sagecheck.environment import package_version
        from sagecheck.sglang_plugin.settings import Settings
        from sagecheck.sglang_plugin.stats import Stats

        settings = Settings.from_env()
        State.backend, kernel = "sage-emulated", "sage-emulated (stand-in: sagecheck's emulation of SageAttention 1.0.6)"
        State.split = settings.prefill == "batched"  # SageAttention 2's sageattn (emulated): prefix extends split
        fault = None
        if State.name != "sage_attn":  # a deliberately wrong variant (tests/faults): the emulation with its one defect
            from sagecheck_faults import FAULTS
            from tests.standin import faults

            fault = State.variant = FAULTS[State.name]
            baseline, State.backend = faults.install(fault, args.tp_size)
        if State.split:
            State.backend, kernel = split_candidate(fault), split_prefill.KERNEL
        State.decode = "sage" if "decode" in phases else "triton"
        cfg = model.config
        # no GPU to measure a crossover on: "measured" runs every prefill batch on the (emulated) kernel; a crossover
        # set (SAGE_ATTN_DISPATCH=N) is the plugin's rule, its Triton route computed by the baseline (SDPA here)
        from sagecheck.sglang_plugin import dispatch as plugin_dispatch

        State.crossover = plugin_dispatch.from_setting(settings.dispatch)
        if State.crossover is None and os.environ.get("SAGECHECK_STANDIN_DISPATCH") == "cpu":
            State.crossover = measure_dispatch_on_cpu(model.config, model.config.max_position_embeddings)
        if State.crossover is None or State.crossover.mode == "kernel":
            State.crossover = None
            dispatch = {"mode": "kernel", "keys": 0, "source": "stand-in: no GPU to measure on, every batch on the emulated kernel"}
            rule = "every extend batch on the kernel (stand-in: no GPU to measure on)"
        else:
            dispatch, rule = State.crossover.as_dict(), State.crossover.describe()
        State.stats = RankStats([Stats(settings.stats_dir, {
            "dispatch": dispatch, "dispatch_rule": rule,
            "backend": State.name, "kernel": kernel, "prefill": "batched" if State.split else "varlen",
            "prefix_extend": ("split: the new tokens against the prefix and against themselves, merged by log-sum-exp"
                              if State.split else "whole sequence: the prefix's rows computed too"),
            "sageattention_version": package_version("sageattention"), "decode": State.decode, "decode_cuda_graphs": not args.disable_cuda_graph,
            "tp_rank": rank, "tp_size": args.tp_size, "q_heads_per_rank": cfg.num_attention_heads // args.tp_size,
            "kv_heads_per_rank": max(1, cfg.num_key_value_heads // args.tp_size), "head_dim": cfg.head_dim})
            for rank in range(args.tp_size)])
    State.baseline = baseline
    State.engine = HFEngine(model, models.load_tokenizer(src), torch.device("cpu"), dtype, baseline=baseline, phases=phases)
    State.ready = True
    print("The server is fired up and ready to roll!", flush=True)
    while True:
        time.sleep(3600)
