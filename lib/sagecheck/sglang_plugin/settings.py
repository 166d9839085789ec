"""The backend's settings: environment variables of the SGLang server process.

SGLang's command line belongs to SGLang, so a plugin reads its own settings from the
environment (the scheduler processes inherit it from ``launch_server``):

``SAGE_ATTN_DECODE``
    ``triton`` (default): decode steps run the baseline's Triton decode kernel over the cache,
    inside SGLang's CUDA graphs. ``sage``: decode steps run sageattention's kernel over each
    request's cached keys; its wrapper sizes buffers on the host, so it cannot be captured in a
    CUDA graph and needs ``--disable-cuda-graph`` (the server refuses to start otherwise).
    The default is what the measurements favour (benchmarks/sglang_serving.py, README "Against SGLang").
``SAGE_ATTN_PREFILL``
    Which sageattention function serves prefill and extend. ``varlen``: ``sageattn_varlen`` on the packed
    batch (a Triton kernel in both 1.0.6 and SageAttention 2). ``batched``: ``sageattn`` on the batch padded
    per group of similar lengths (:mod:`.batched`); ``sageattn`` dispatches by GPU, which in SageAttention 2
    is its INT8 Q·K + FP8 P·V CUDA kernel on Hopper (``sageattn_qk_int8_pv_fp8_cuda_sm90``). ``auto``
    (default): ``batched`` where the installed sageattention is version 2 (it has kernels by GPU behind
    ``sageattn``, and none behind ``sageattn_varlen``), else ``varlen`` (1.0.6: the same Triton arithmetic
    either way, and ``varlen`` pads nothing).
``SAGE_ATTN_DISPATCH``
    Which extend batches run on the kernel (:mod:`.dispatch`). ``measured`` (default): where the kernel path beat
    Triton's extend kernel in a measurement made when the server starts, on its GPU and model shapes (requests over
    a cached prefix by a crossover of their own); the rest on Triton. ``kernel``: every extend batch (10's verification of every path). A number ``N``: the kernel for batches
    whose pairs lie mostly in requests of at least ``N`` keys.
``SAGE_ATTN_STATS_DIR``
    A folder where each scheduler process writes what it ran (:mod:`.stats`); unset: nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

NAME = "sage_attn"  # the --attention-backend name the plugin registers
DECODE_ENV = "SAGE_ATTN_DECODE"
STATS_ENV = "SAGE_ATTN_STATS_DIR"
PREFILL_ENV = "SAGE_ATTN_PREFILL"
DISPATCH_ENV = "SAGE_ATTN_DISPATCH"
DECODE_MODES = ("triton", "sage")
PREFILL_MODES = ("auto", "varlen", "batched")
DEFAULT_DECODE = "triton"
INSTEAD = "serve with --attention-backend triton instead"


class SageAttnUnavailable(RuntimeError):
    """sage_attn cannot serve this GPU, model or setting; the message says why and what to use instead."""


@dataclass(frozen=True)
class Settings:
    decode: str = DEFAULT_DECODE
    stats_dir: Path | None = None
    prefill: str = "auto"
    dispatch: str = "measured"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        decode = env.get(DECODE_ENV, "").strip() or DEFAULT_DECODE
        if decode not in DECODE_MODES:
            raise SageAttnUnavailable(f"sage_attn: {DECODE_ENV}={decode!r} is not a decode mode; use one of {', '.join(DECODE_MODES)}")
        prefill = env.get(PREFILL_ENV, "").strip() or "auto"
        if prefill not in PREFILL_MODES:
            raise SageAttnUnavailable(f"sage_attn: {PREFILL_ENV}={prefill!r} is not a prefill mode; use one of {', '.join(PREFILL_MODES)}")
        dispatch = env.get(DISPATCH_ENV, "").strip() or "measured"
        check_dispatch(dispatch)
        stats = env.get(STATS_ENV, "").strip()
        return cls(decode=decode, stats_dir=Path(stats) if stats else None, prefill=prefill, dispatch=dispatch)

    def prefill_path(self, sageattention_generation: int | None) -> str:
        """``varlen`` or ``batched``: the setting, with ``auto`` resolved by the installed sageattention's generation."""
        if self.prefill != "auto":
            return self.prefill
        return "batched" if (sageattention_generation or 1) >= 2 else "varlen"


def check_dispatch(value: str) -> None:
    """``measured``, ``kernel`` or a whole number of keys; else :class:`SageAttnUnavailable` saying so."""
    if value in ("measured", "kernel") or (value.isdigit() and int(value) > 0):
        return
    raise SageAttnUnavailable(f"sage_attn: {DISPATCH_ENV}={value!r} is not a dispatch rule; use measured, kernel or a "
                              f"number of keys per request (e.g. 4096)")
