"""Where the model runs: in process (``hf``, transformers) or behind an SGLang server (``sglang``).

Both give a :class:`Backend` for one attention implementation at a time::

    engine = sagecheck.engines.create(P)        # hf: loads the weights once
    with engine.backend(P.baseline) as base:   # sglang: starts a server with that backend
        lp = base.token_logprobs([ids])

What an engine cannot give (SGLang has no per-layer activations, no full
vocabulary) is named in :attr:`Backend.capabilities`; notebooks check it and say so.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

FULL_LOGITS = "full_logits"  # next-token distribution over the whole vocabulary
HIDDEN_STATES = "hidden_states"  # per-layer activations (hooks)
ALLOCATOR_MEMORY = "allocator_memory"  # torch allocator peaks
CALL_COUNTS = "call_counts"  # calls that reached the attention implementation


@dataclass
class TopK:
    """Top-k next-token log-probabilities per position: ``values``/``indices`` are [positions, k]."""

    values: np.ndarray
    indices: np.ndarray


class Backend(abc.ABC):
    """One model with one attention implementation."""

    implementation: str
    capabilities: frozenset[str] = frozenset()

    @abc.abstractmethod
    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        """Per sequence: log p(x_t | x_<t) for t = 1..n-1 (teacher forcing)."""

    @abc.abstractmethod
    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> torch.Tensor | TopK:
        """After each prefix ids[:t+1]: the full log-softmax [n, vocab] (float32), or the top-k when ``top_k``."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt."""

    def describe(self) -> dict[str, Any]:
        return {"implementation": self.implementation}


class Engine(abc.ABC):
    name: str
    tokenizer: Any
    max_context: int | None = None  # longest sequence the model takes, where known

    @abc.abstractmethod
    @contextmanager
    def backend(self, implementation: str) -> Iterator[Backend]:
        """A backend running ``implementation`` (for SGLang: an --attention-backend name)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def create(params: Any, **kwargs: Any) -> Engine:
    """The engine chosen by ``params.engine``."""
    if params.engine == "hf":
        from sagecheck.engines.hf import HFEngine

        return HFEngine.from_params(params, **kwargs)
    if params.engine == "sglang":
        from sagecheck.engines.sglang import SGLangEngine

        return SGLangEngine.from_params(params, **kwargs)
    raise ValueError(f"unknown engine {params.engine!r}")


def record_candidate(engine: Engine, results: Any) -> Any:
    """SGLang: what the candidate server ran (sage_attn's statistics), as a metric and a line to display."""
    from sagecheck import show
    from sagecheck.engines.sglang import candidate_ran

    text = candidate_ran(engine)
    results.metric("candidate_ran", text)
    return show.say(f"**What the candidate server ran** (since it started): {text}")
