"""STAND-IN for ``python -m sglang.launch_server`` (tests only; see the package docstring).

Backends: ``sage_attn`` (sagecheck's SageAttention emulation), ``fa3``, ``flashinfer``,
``triton``, ``torch_native`` (SDPA). Any other ``--attention-backend`` is refused by the
argument parser with exit code 2, as SGLang does. Failure modes for the tests, chosen by
``SAGECHECK_STANDIN_MODE``: ``crash`` (dies while starting), ``hang`` (never becomes
ready), ``die-after:N`` (exits after answering N /generate requests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

BACKENDS = {"sage_attn": "sage-emulated", "fa3": "sdpa", "flashinfer": "sdpa", "triton": "sdpa", "torch_native": "sdpa"}
DEFAULT_BACKEND = "flashinfer"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sglang.launch_server")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--attention-backend", choices=sorted(BACKENDS))
    ap.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    ap.add_argument("--tp", "--tp-size", dest="tp_size", type=int, default=1)
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--random-seed", type=int)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--revision")
    return ap.parse_args(argv)


class State:
    engine = None
    args = None
    backend = None
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
        if self.path == "/get_server_info":
            cfg = State.engine.model.config
            return self._send(200, {
                "model_path": State.args.model_path, "attention_backend": State.args.attention_backend or DEFAULT_BACKEND,
                "dtype": State.args.dtype, "tp_size": State.args.tp_size, "mem_fraction_static": State.args.mem_fraction_static,
                "random_seed": State.args.random_seed, "context_length": State.args.context_length or cfg.max_position_embeddings,
                # one sequence at a time, as long as the model takes: the stand-in's real capacity
                "max_total_num_tokens": cfg.max_position_embeddings, "max_req_input_len": cfg.max_position_embeddings - 1,
                "internal_states": [{"memory_usage": None}], "version": "0.0.0-standin",
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
            return self._send(200, handle_generate(json.loads(body)))
        except Exception as e:  # reported like SGLang's error response
            return self._send(400, {"error": {"message": f"{type(e).__name__}: {e}"}})


def main(argv=None):
    args = parse_args(argv)
    State.args = args
    mode = os.environ.get("SAGECHECK_STANDIN_MODE", "")
    print(f"standin sglang: model {args.model_path}, attention backend {args.attention_backend or DEFAULT_BACKEND}", flush=True)
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
    State.engine = HFEngine(model, models.load_tokenizer(src), torch.device("cpu"), dtype)
    State.backend = BACKENDS[args.attention_backend or DEFAULT_BACKEND]
    State.ready = True
    print("The server is fired up and ready to roll!", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
