"""The backend's settings: environment variables of the SGLang server process.

SGLang's command line belongs to SGLang, so a plugin reads its own settings from the
environment (the scheduler processes inherit it from ``launch_server``):

``SAGE_ATTN_DECODE``
    ``triton`` (default): decode steps run the baseline's Triton decode kernel over the cache,
    inside SGLang's CUDA graphs. ``sage``: decode steps run sageattention's kernel over each
    request's cached keys; its wrapper sizes buffers on the host, so it cannot be captured in a
    CUDA graph and needs ``--disable-cuda-graph`` (the server refuses to start otherwise).
    The default is what the measurements favour (benchmarks/sglang_serving.py, README "Against SGLang").
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
DECODE_MODES = ("triton", "sage")
DEFAULT_DECODE = "triton"
INSTEAD = "serve with --attention-backend triton instead"


class SageAttnUnavailable(RuntimeError):
    """sage_attn cannot serve this GPU, model or setting; the message says why and what to use instead."""


@dataclass(frozen=True)
class Settings:
    decode: str = DEFAULT_DECODE
    stats_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        decode = env.get(DECODE_ENV, "").strip() or DEFAULT_DECODE
        if decode not in DECODE_MODES:
            raise SageAttnUnavailable(f"sage_attn: {DECODE_ENV}={decode!r} is not a decode mode; use one of {', '.join(DECODE_MODES)}")
        stats = env.get(STATS_ENV, "").strip()
        return cls(decode=decode, stats_dir=Path(stats) if stats else None)
