"""Checks that need only SGLang's arguments, run in ``launch_server`` before any model is loaded.

The plugin hooks them after ``ServerArgs.check_server_args`` (SGLang's plugin hook registry), so
``--attention-backend sage_attn`` without sageattention, or with a decode setting that cannot run
under CUDA graphs, stops the launcher in seconds with the reason, instead of after the weights and
the KV cache were allocated (which also needs the GPU memory of a whole server). What depends on
the model or the GPU (head dim, MLA, compute capability) is checked where the backend is built.
"""

from __future__ import annotations

from typing import Any

from sagecheck.sglang_plugin.settings import NAME
from sagecheck.sglang_plugin.settings import SageAttnUnavailable, Settings

BACKEND_ARGS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def uses_sage_attn(server_args: Any) -> bool:
    return any(getattr(server_args, a, None) == NAME for a in BACKEND_ARGS)


def decode_graphs_enabled(server_args: Any) -> bool:
    """Whether SGLang will capture decode steps in CUDA graphs (0.5.15: ``cuda_graph_config.decode.backend``)."""
    cfg = getattr(server_args, "cuda_graph_config", None)
    decode = getattr(cfg, "decode", None)
    if decode is not None and hasattr(decode, "backend"):
        return str(decode.backend) != "disabled"
    return not getattr(server_args, "disable_cuda_graph", False)


def check_decode_mode(settings: Settings, decode_graphs: bool) -> None:
    if settings.decode == "sage" and decode_graphs:
        raise SageAttnUnavailable(
            f"{NAME}: SAGE_ATTN_DECODE=sage runs sageattn_varlen for decode, whose wrapper sizes its buffers on the host "
            f"and cannot be captured in a CUDA graph; add --disable-cuda-graph, or use SAGE_ATTN_DECODE=triton (the default)")


def preflight(server_args: Any) -> None:
    """Raise :class:`SageAttnUnavailable` where a server asked for sage_attn cannot serve it, whatever the model."""
    if not uses_sage_attn(server_args):
        return
    from sagecheck.sglang_plugin.varlen import load_kernel

    check_decode_mode(Settings.from_env(), decode_graphs_enabled(server_args))
    load_kernel()


def after_check_server_args(result: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    """SGLang AFTER hook on ``ServerArgs.check_server_args``."""
    preflight(server_args)
