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
from sagecheck.engines import (ACCEPTED_PRECISION, ALLOCATOR_MEMORY, CALL_COUNTS, FULL_LOGITS, HIDDEN_STATES, STEPWISE, Backend,
                               Engine, Generated, PathRun, TopK)


class HFEngine(Engine):
    name = "hf"
    capabilities = frozenset({FULL_LOGITS, HIDDEN_STATES, ALLOCATOR_MEMORY, CALL_COUNTS, STEPWISE, ACCEPTED_PRECISION})

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, baseline: str = "sdpa",
                 candidate: str = "sage-emulated", phases: tuple[str, ...] = ("prefill", "decode"),
                 control: str = "sdpa-fp8kv") -> None:
        from sagecheck.params import labels

        attn_hf.register()
        self._model = model
        self.tokenizer = tokenizer
        self._device = device
        self._dtype = dtype
        self.phases = tuple(phases)
        self.baseline, self.candidate = labels({"engine": "hf", "baseline": baseline, "candidate": candidate})
        self.control = f"{control} (control)"  # its own label, whatever the candidate is (an A/A run, the control itself)
        self._implementation = {self.baseline: baseline, self.candidate: candidate, self.control: control}
        self._baseline_impl = baseline
        self._calls: dict[str, Any] = {}
        attn_hf.configure(baseline=baseline, phases=phases)

    @classmethod
    def from_params(cls, params: Any, implementation: str | None = None, **_: Any) -> "HFEngine":
        """Load ``params.model`` once, with ``implementation`` (default: the baseline)."""
        from sagecheck import models, runtime

        attn_hf.register()
        device = runtime.resolve_device(params.device)
        dtype = runtime.resolve_dtype(params.dtype, device)
        impl = implementation or params.baseline
        attention.get(impl)  # fail before loading where the implementation cannot run here (a clear message)
        source = models.resolve(params.model, params.revision)
        model = models.load_model(source, device, dtype, attn_hf.transformers_name(impl), seed=params.seed)
        tokenizer = models.load_tokenizer(source)
        return cls(model, tokenizer, device, dtype, params.baseline, params.candidate, tuple(params.candidate_phases),
                   params.accuracy_control)

    @classmethod
    def facts(cls, params: Any) -> dict[str, Any]:
        out = super().facts(params)
        base, cand = out["labels"]["baseline"], out["labels"]["candidate"]
        phases = ", ".join(params.candidate_phases)
        out["description"] = f"baseline `{base}` vs candidate `{cand}` (phases: {phases})"
        out["table"] = {"model": params.model, "engine": params.engine, "baseline": base, "candidate": cand,
                        "candidate phases": phases,
                        "accuracy thresholds from": f"the control {params.accuracy_control} against {params.baseline}",
                        "seed": params.seed}
        return out

    @property
    def model(self) -> Any:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def model_config(self) -> Any:
        return self._model.config

    @property
    def max_context(self) -> int | None:
        return getattr(self._model.config, "max_position_embeddings", None)

    def implementation(self, label: str) -> str:
        """The attention implementation behind a label (the baseline's, the candidate's, or a name of its own)."""
        return self._implementation.get(label, label)

    def current_implementation(self) -> str:
        return attn_hf.sagecheck_name(self._model.config._attn_implementation)

    def timed_gpus(self) -> tuple[list[int] | None, str]:
        if self._device.type != "cuda":
            return None, f"the run is on the {self._device.type.upper()}, not a GPU"
        return [self._device.index if self._device.index is not None else torch.cuda.current_device()], ""

    @contextmanager
    def backend(self, label: str, layers: set[int] | None = None) -> Iterator["HFBackend"]:
        """Run ``label``'s implementation inside the block (only in ``layers`` if given; the baseline elsewhere)."""
        impl = self.implementation(label)
        attention.get(impl)
        attn_hf.register()  # an implementation registered after the engine was made (a test's variant)
        previous = self.current_implementation()
        self._model.set_attn_implementation(attn_hf.transformers_name(impl))
        attn_hf.configure(baseline=self._baseline_impl, phases=self.phases, layers=layers)
        attn_hf.STATS.reset()
        try:
            yield HFBackend(self, label, impl)
        finally:
            self._calls[label] = attn_hf.STATS.snapshot()
            attn_hf.configure(baseline=self._baseline_impl, phases=self.phases, layers=None)
            self._model.set_attn_implementation(attn_hf.transformers_name(previous))

    def calls(self, label: str) -> dict[str, Any]:
        """The calls counted in the last block of ``label`` (empty where it has not run)."""
        return self._calls.get(label, {})

    def candidate_ran(self) -> str:
        calls = self.calls(self.candidate)
        if not calls:
            return "the candidate did not run"
        impl = self.implementation(self.candidate)
        phases = ", ".join(f"{k.split(':', 1)[1]} {n}" for k, n in sorted(calls["by_phase"].items()) if k.startswith(impl + ":"))
        reasons = "; ".join(f"{n}× {why}" for why, n in calls["fallback_reasons"].items())
        return (f"{impl} (in process, phases {', '.join(self.phases)}): {calls['calls'].get(impl, 0)} attention calls"
                + (f" ({phases})" if phases else "") + f"; fallbacks to the baseline: {reasons or 'none'}")

    def close(self) -> None:
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class HFBackend(Backend):
    engine_name = "hf"

    def __init__(self, engine: HFEngine, label: str, implementation: str) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.label = label
        self.implementation = implementation

    def calls(self) -> dict[str, Any]:
        return attn_hf.STATS.snapshot()

    def kernel_phases(self) -> frozenset[str]:
        """The phases of ``candidate_phases`` for a candidate; none for the baseline or the control."""
        from sagecheck import attention

        if attention.ATTENTION.info(self.implementation).get("role") in ("baseline", "accepted"):
            return frozenset()
        return frozenset(self.engine.phases)

    def census(self) -> dict[str, Any]:
        """This process's census: the emulations and the kernel record their calls as they are made."""
        from sagecheck import census

        return census.snapshot()

    def counters(self) -> dict[str, int]:
        """The attention calls of this block so far: ``calls:<impl>``, ``<impl>:<phase>`` and ``fallbacks:<impl>``."""
        snap = self.calls()
        return {**{f"calls:{k}": v for k, v in snap["calls"].items()}, **snap["by_phase"],
                **{f"fallbacks:{k}": v for k, v in snap["fallbacks"].items()}}

    @staticmethod
    def _picked(logits: torch.Tensor, targets: list[int]) -> np.ndarray:
        """log p of each target under the rows of ``logits`` ([n, vocab]), in float64."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        return logp.gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].cpu().numpy()

    @torch.inference_mode()
    def prefix_logprobs(self, seq: list[int], prefix: int) -> PathRun:
        """The prefix in one forward that keeps its KV cache, then the rest as an extend over it (evidence: the kernel
        calls of the extend alone, ``kernel_calls``)."""
        from sagecheck import census

        x = self._tensor([seq])
        cache = self.model(input_ids=x[:, :prefix], use_cache=True).past_key_values
        before = census.snapshot()
        logits = self.model(input_ids=x[:, prefix:], past_key_values=cache, use_cache=True).logits[0, :-1]
        return PathRun([self._picked(logits, seq[prefix + 1:])],
                       {"cached_tokens": prefix, "kernel_calls": census.difference(census.snapshot(), before)})

    @torch.inference_mode()
    def chunked_logprobs(self, seq: list[int], chunk: int) -> PathRun:
        """Chunks of ``chunk`` tokens, each an extend over the KV cache of the ones before (evidence: the kernel calls
        of the chunks after the first, ``kernel_calls``)."""
        from sagecheck import census

        x, cache, parts, before = self._tensor([seq]), None, [], None
        for start in range(0, len(seq), chunk):
            out = self.model(input_ids=x[:, start:start + chunk], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits[0])
            before = before if before is not None else census.snapshot()
        logits = torch.cat(parts)[:-1]
        return PathRun([self._picked(logits, seq[1:])], {"chunks": -(-len(seq) // chunk), "chunk_tokens": chunk,
                                                        "kernel_calls": census.difference(census.snapshot(), before)})

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
    def generate_scored(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generated]:
        """Greedy decoding with a KV cache, prompts of equal length as one batch; each token's log-probability as the
        step that chose it computed it."""
        result: list[Generated] = [Generated([], np.zeros(0))] * len(prompts)
        if max_new_tokens < 1:
            return result
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        for idx in groups.values():
            logits, cache = self.prefill(self._tensor([prompts[i] for i in idx]))
            tokens, scores = [], []
            for step in range(max_new_tokens):
                if step:
                    logits, cache = self.decode_step(tokens[-1], cache)
                logp = torch.log_softmax(logits.double(), dim=-1)
                chosen = logp.argmax(-1)
                tokens.append(chosen)
                scores.append(logp.gather(-1, chosen[:, None])[:, 0])
            toks = torch.stack(tokens, dim=1).cpu().tolist()
            lps = torch.stack(scores, dim=1).cpu().numpy()
            for row, i in enumerate(idx):
                result[i] = Generated(toks[row], lps[row])
        return result

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding with a KV cache; prompts of equal length run as one batch."""
        return [g.tokens for g in self.generate_scored(prompts, max_new_tokens)]
