"""The in-process engine: one set of weights, the attention implementation switched at run time.

The baseline and the candidate run on the very same weights and tokens: the model is
loaded once and :meth:`HFEngine.backend` switches transformers' attention
implementation (``model.set_attn_implementation``) for the duration of a ``with``
block, counting the calls that reach it (:data:`sagecheck.attention.hf.STATS`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from sagecheck import attention
from sagecheck.attention import hf as attn_hf
from sagecheck.engines import ALLOCATOR_MEMORY, CALL_COUNTS, FULL_LOGITS, HIDDEN_STATES, Backend, Engine, TopK


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        baseline: str = "sdpa",
        phases: tuple[str, ...] = ("prefill", "decode"),
        description: dict[str, Any] | None = None,
    ) -> None:
        attn_hf.register()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.baseline = baseline
        self.phases = tuple(phases)
        self.description = description or {}
        attn_hf.configure(baseline=baseline, phases=phases)

    @classmethod
    def from_params(cls, params: Any, implementation: str | None = None, **_: Any) -> "HFEngine":
        """Load ``params.model`` once, with ``implementation`` (default: the baseline)."""
        from sagecheck import models, runtime

        attn_hf.register()
        device = runtime.resolve_device(params.device)
        dtype = runtime.resolve_dtype(params.dtype, device)
        impl = implementation or params.baseline
        _require(impl)
        source = models.resolve(params.model, params.revision)
        runtime.seed_everything(params.seed)
        model = models.load_model(source, device, dtype, attn_hf.transformers_name(impl), seed=params.seed)
        tokenizer = models.load_tokenizer(source)
        desc = {
            "model": params.model,
            "source": source.kind,
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "dtype": runtime.dtype_name(dtype),
            "attention_at_load": impl,
        }
        return cls(model, tokenizer, device, dtype, params.baseline, tuple(params.candidate_phases), desc)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def current_implementation(self) -> str:
        return attn_hf.sagecheck_name(self.model.config._attn_implementation)

    def set_implementation(self, implementation: str) -> None:
        _require(implementation)
        self.model.set_attn_implementation(attn_hf.transformers_name(implementation))

    @contextmanager
    def backend(self, implementation: str, layers: set[int] | None = None) -> Iterator["HFBackend"]:
        """Run ``implementation`` inside the block (only in ``layers`` if given; the baseline elsewhere)."""
        previous = self.current_implementation()
        self.set_implementation(implementation)
        attn_hf.configure(baseline=self.baseline, phases=self.phases, layers=layers)
        attn_hf.STATS.reset()
        try:
            yield HFBackend(self, implementation)
        finally:
            attn_hf.configure(baseline=self.baseline, phases=self.phases, layers=None)
            self.model.set_attn_implementation(attn_hf.transformers_name(previous))

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _require(implementation: str) -> None:
    """Fail before loading or switching if the implementation cannot run here (clear message)."""
    attention.get(implementation)


class HFBackend(Backend):
    capabilities = frozenset({FULL_LOGITS, HIDDEN_STATES, ALLOCATOR_MEMORY, CALL_COUNTS})

    def __init__(self, engine: HFEngine, implementation: str) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.implementation = implementation

    def describe(self) -> dict[str, Any]:
        return {**attention.info(self.implementation), "phases": list(self.engine.phases)}

    def calls(self) -> dict[str, Any]:
        return attn_hf.STATS.snapshot()

    def _tensor(self, batch: list[list[int]]) -> torch.Tensor:
        return torch.tensor(batch, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def logits(self, ids: list[int] | list[list[int]]) -> torch.Tensor:
        """Raw logits in float32: [n, vocab] for one sequence, [b, n, vocab] for a batch of equal length."""
        single = bool(ids) and isinstance(ids[0], int)
        x = self._tensor([ids] if single else ids)
        out = self.model(input_ids=x, use_cache=False).logits.float()
        return out[0] if single else out

    @torch.inference_mode()
    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(batch):
            groups.setdefault(len(seq), []).append(i)
        result: list[np.ndarray] = [np.zeros(0)] * len(batch)
        for idx in groups.values():
            x = self._tensor([batch[i] for i in idx])
            logits = self.model(input_ids=x, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            picked = logp.gather(-1, x[:, 1:, None])[..., 0]
            for row, i in enumerate(idx):
                result[i] = picked[row].cpu().numpy()
        return result

    @torch.inference_mode()
    def next_token_logprobs(self, ids: list[int], top_k: int | None = None) -> torch.Tensor | TopK:
        logp = torch.log_softmax(self.logits(ids), dim=-1)
        if top_k is None:
            return logp
        values, indices = logp.topk(top_k, dim=-1)
        return TopK(values.cpu().numpy(), indices.cpu().numpy())

    @torch.inference_mode()
    def prefill(self, batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Process prompts ``[b, n]`` with a fresh KV cache; returns (next-token logits [b, vocab], cache).

        Only the last position's logits are computed (``logits_to_keep=1``), as a serving engine does.
        """
        out = self.model(input_ids=batch, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One token per sequence ``[b]`` through the cache."""
        out = self.model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding with a KV cache; prompts of equal length run as one batch."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        result: list[list[int]] = [[] for _ in prompts]
        for idx in groups.values():
            logits, cache = self.prefill(self._tensor([prompts[i] for i in idx]))
            tokens = logits.argmax(-1)
            produced = [tokens]
            for _ in range(max_new_tokens - 1):
                logits, cache = self.decode_step(tokens, cache)
                tokens = logits.argmax(-1)
                produced.append(tokens)
            out = torch.stack(produced, dim=1).cpu().tolist()
            for row, i in enumerate(idx):
                result[i] = out[row]
        return result
