"""TEST ONLY: a third engine, as a package that adds one to sagecheck would be: this file and one entry point
(``[sagecheck.engines] stub = sagecheck_stub_engine:StubEngine``), nothing changed in sagecheck.

It serves an in-process model (transformers) through the Backend protocol alone, and gives less than the in-process
engine does: top-k log-probabilities only (no full distributions), no hidden states, no call counts, no accepted-
precision control of its own (the notebooks measure that in process). What it cannot give, the notebooks must say and
take from elsewhere; what it can, they must measure with it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from sagecheck.engines import Backend, Engine, PathRun, TopK
from sagecheck.engines.hf import HFEngine

TOP_K = 20


class StubBackend(Backend):
    engine_name = "stub"

    def __init__(self, inner: Any, label: str) -> None:
        self.inner, self.label = inner, label

    def token_logprobs(self, batch: list[list[int]]) -> list[Any]:
        return self.inner.token_logprobs(batch)

    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> TopK:
        return self.inner.next_token_logprobs(ids, top_k or TOP_K)  # never the full vocabulary

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.inner.generate(prompts, max_new_tokens)

    def generate_scored(self, prompts: list[list[int]], max_new_tokens: int) -> list[Any]:
        return self.inner.generate_scored(prompts, max_new_tokens)

    def prefix_logprobs(self, seq: list[int], prefix: int) -> PathRun:
        return self.inner.prefix_logprobs(seq, prefix)

    def chunked_logprobs(self, seq: list[int], chunk: int) -> PathRun:
        return self.inner.chunked_logprobs(seq, chunk)


class StubEngine(Engine):
    name = "stub"
    capabilities = frozenset()
    REGISTRY_INFO = {"serves": False, "labels": ("baseline", "candidate"),
                     "description": "TEST ONLY: an in-process model behind the protocol alone (top-k only)"}

    def __init__(self, inner: HFEngine) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.baseline, self.candidate = inner.baseline, inner.candidate
        self.max_context = inner.max_context
        self._ran: str = "the candidate did not run"

    @classmethod
    def from_params(cls, params: Any, **_: Any) -> "StubEngine":
        return cls(HFEngine.from_params(params))

    @contextmanager
    def backend(self, label: str, layers: set[int] | None = None) -> Iterator[StubBackend]:
        with self.inner.backend(label) as b:
            yield StubBackend(b, label)
        if label == self.candidate:
            self._ran = f"the stub engine served {label} (in process, behind the protocol)"

    def candidate_ran(self) -> str:
        return self._ran

    def model_config(self) -> Any:
        return self.inner.model_config()

    def close(self) -> None:
        self.inner.close()
