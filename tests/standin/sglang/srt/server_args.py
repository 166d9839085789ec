"""STAND-IN for ``sglang.srt.server_args``: the attention-backend choices, their hook, and argument parsing.

``prepare_server_args`` resolves the default backend as SGLang does when none is named (the
stand-in's default is ``flashinfer``; on an H100 SGLang's is ``fa3``).
"""

import argparse

ATTENTION_BACKEND_CHOICES = ["fa3", "flashinfer", "triton", "torch_native"]
DEFAULT_ATTENTION_BACKEND = "flashinfer"


def add_attention_backend_choices(choices):
    ATTENTION_BACKEND_CHOICES.extend(choices)


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m sglang.launch_server")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--attention-backend", choices=ATTENTION_BACKEND_CHOICES)
    ap.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    ap.add_argument("--tp", "--tp-size", dest="tp_size", type=int, default=1)
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--max-total-tokens", type=int)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--cuda-graph-max-bs", type=int)
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--random-seed", type=int)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--revision")
    ap.add_argument("--sampling-backend")
    ap.add_argument("--grammar-backend")
    ap.add_argument("--chunked-prefill-size", type=int)
    return ap


class ServerArgs(argparse.Namespace):
    def get_attention_backends(self):
        return self.attention_backend, self.attention_backend


def prepare_server_args(argv):
    args = build_parser().parse_args(argv, namespace=ServerArgs())
    if args.attention_backend is None:
        args.attention_backend = DEFAULT_ATTENTION_BACKEND
    return args
