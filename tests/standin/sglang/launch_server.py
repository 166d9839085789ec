"""STAND-IN for ``python -m sglang.launch_server`` (tests only; see the package docstring).

As SGLang 0.5.15 does, it loads the general plugins of the entry-point group
``sglang.srt.plugins`` before it parses arguments (``sglang.srt.plugins`` here), so
``--attention-backend sage_attn`` is accepted only where sagecheck's plugin is installed
and loaded. Built-in backends ``fa3``, ``flashinfer`` (the default), ``triton``,
``torch_native`` compute SDPA; ``sage_attn`` computes sagecheck's emulation of SageAttention
1.0.6 in prefill (and in decode with ``SAGE_ATTN_DECODE=sage``), refuses to start where
``import sageattention`` fails (the plugin's own check and message), and writes the plugin's
statistics to ``SAGE_ATTN_STATS_DIR``. Any other name is refused by the argument parser with
exit code 2, as SGLang does. Failure modes for the tests, chosen by ``SAGECHECK_STANDIN_MODE``:
``crash`` (dies while starting), ``hang`` (never becomes ready), ``die-after:N`` (exits after
answering N /generate requests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

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
    lock = threading.Lock()


def entries(values, ids):
    """SGLang's [logprob, token_id, text] triples (text only with return_text_in_logprobs)."""
    return [[None if v is None else float(v), int(i), None] for v, i in zip(values, ids)]


def handle_generate(req: dict):
    ids = req["input_ids"]
    batch = ids if ids and isinstance(ids[0], list) else [ids]
    sp = req.get("sampling_params") or {}
    n_new = int(sp.get("max_new_tokens", 16))
    want_lp = bool(req.get("return_logprob"))
    start = req.get("logprob_start_len")
    start = -1 if start is None else int(start)
    top = int(req.get("top_logprobs_num") or 0)
    engine, impl = State.engine, State.backend
    outs = []
    if State.stats is not None:  # what the plugin counts: one prefill batch, then decode steps
        State.stats.count("extend_batches_kernel")
        State.stats.count("extend_tokens_kernel", sum(len(x) for x in batch))
        State.stats.count("decode_batches_kernel" if State.decode == "sage" else "decode_graph_replays", max(0, n_new - 1))
    with State.lock, engine.backend(impl) as b:
        gens = b.generate(batch, n_new) if n_new > 0 else [[] for _ in batch]
        for seq, gen in zip(batch, gens):
            meta = {"prompt_tokens": len(seq), "completion_tokens": len(gen), "finish_reason": {"type": "length", "length": len(gen)}}
            if want_lp:
                # like a real server: input logprobs come from the prefill of the prompt alone,
                # output logprobs from the sequence as it grows
                logp_in = torch.log_softmax(b.logits(seq).double(), dim=-1)  # row t predicts token t+1
                input_lp = [None] + [float(logp_in[t - 1, seq[t]]) for t in range(1, len(seq))]
                full = seq + gen
                logp_all = torch.log_softmax(b.logits(full).double(), dim=-1) if gen else logp_in
                output_lp = [float(logp_all[t - 1, full[t]]) for t in range(len(seq), len(full))]
                if start >= 0:
                    meta["input_token_logprobs"] = entries(input_lp[start:], seq[start:])
                meta["output_token_logprobs"] = entries(output_lp, gen)
                if top:
                    def top_rows(logp, rows):
                        vals, idx = logp[rows].topk(top, dim=-1)
                        return [entries(v.tolist(), i.tolist()) for v, i in zip(vals, idx)]

                    if start >= 0:
                        meta["input_top_logprobs"] = ([None] + top_rows(logp_in, list(range(len(seq) - 1))))[start:]
                    out_rows = [len(seq) - 1 + j for j in range(max(1, len(gen)))]
                    meta["output_top_logprobs"] = top_rows(logp_in, out_rows[:1]) + top_rows(logp_all, out_rows[1:])
            outs.append({"text": engine.tokenizer.decode(gen), "output_ids": gen, "meta_info": meta})
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
                "disable_cuda_graph": a.disable_cuda_graph, "cuda_graph_max_bs": a.cuda_graph_max_bs,
                "chunked_prefill_size": a.chunked_prefill_size or 8192,
                "max_total_num_tokens": capacity, "max_req_input_len": cfg.max_position_embeddings - 1,
                "internal_states": [{"memory_usage": {"weight": round(weights_gb, 2), "kvcache": 0.0, "token_capacity": capacity,
                                                      "graph": 0.0},
                                     "effective_max_running_requests_per_dp": 64}],
                "version": "0.0.0-standin",
            })
        if self.path == "/flush_cache":
            return self._send(200, b"Cache flushed.\n", "text/plain")
        return self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/flush_cache":
            return self._send(200, b"Cache flushed.\n", "text/plain")
        if self.path != "/generate":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if not State.ready:
            return self._send(503, {"error": {"message": "server is starting"}})
        State.generate_calls += 1
        if State.die_after is not None and State.generate_calls > State.die_after:
            sys.stderr.write("standin: simulated crash in the scheduler (die-after)\n")
            sys.stderr.flush()
            os._exit(1)
        try:
            req = json.loads(body)
            outs = handle_generate(req)
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
    """The phases a plugin backend computes with SageAttention (sage_attn: prefill; decode only with SAGE_ATTN_DECODE=sage)."""
    if name != "sage_attn":
        raise SystemExit(f"standin: the plugin backend {name!r} has no stand-in computation")
    if importlib.util.find_spec("sageattention") is not None:
        from sagecheck.sglang_plugin.varlen import load_kernel

        load_kernel()  # the plugin's own check: raises its message where the import fails
    return ("prefill", "decode") if os.environ.get("SAGE_ATTN_DECODE") == "sage" else ("prefill",)


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
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if mode == "hang":
        while True:
            time.sleep(1)
    from sagecheck import models
    from sagecheck.engines.hf import HFEngine

    torch.set_num_threads(1)
    dtype = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32}.get(args.dtype, torch.float32)
    src = models.resolve(args.model_path)
    model = models.load_model(src, torch.device("cpu"), dtype, "sagecheck-sdpa", seed=args.random_seed or 0)
    phases = ("prefill", "decode")
    State.backend = "sdpa"
    if State.name not in BUILTIN:
        assert State.name in ATTENTION_BACKENDS, f"{State.name} passed the parser but no plugin registered it"
        phases = candidate_phases(State.name)
        State.backend = "sage-emulated"
        State.decode = "sage" if "decode" in phases else "triton"
        from sagecheck.environment import package_version
        from sagecheck.sglang_plugin.settings import Settings
        from sagecheck.sglang_plugin.stats import Stats

        cfg = model.config
        State.stats = RankStats([Stats(Settings.from_env().stats_dir, {
            "backend": State.name, "kernel": "sage-emulated (stand-in: sagecheck's emulation of SageAttention 1.0.6)",
            "sageattention_version": package_version("sageattention"), "decode": State.decode, "decode_cuda_graphs": not args.disable_cuda_graph,
            "tp_rank": rank, "tp_size": args.tp_size, "q_heads_per_rank": cfg.num_attention_heads // args.tp_size,
            "kv_heads_per_rank": max(1, cfg.num_key_value_heads // args.tp_size), "head_dim": cfg.head_dim})
            for rank in range(args.tp_size)])
    State.engine = HFEngine(model, models.load_tokenizer(src), torch.device("cpu"), dtype, phases=phases)
    State.ready = True
    print("The server is fired up and ready to roll!", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
