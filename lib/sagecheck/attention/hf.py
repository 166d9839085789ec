"""The implementations inside Hugging Face models, through transformers' attention registry.

After :func:`register`, any model that dispatches through ``AttentionInterface``
(Llama, Qwen2/3, Mistral, ...) takes ``attn_implementation=`` one of
:func:`transformers_name` of ``sdpa``, ``eager``, ``sage``, ``sage-emulated``,
``sdpa-noisy`` (``sage`` and ``sage-emulated`` keep their own names). Every call that
reaches an implementation is counted (:data:`STATS`), so a notebook can prove which
attention really ran.

* ``sdpa`` delegates to transformers' own SDPA function (the stack's baseline), only
  counted.
* The candidate runs only in the phases of :func:`configure` (``decode``: one query over
  a KV cache; ``prefill``: every other call, a prompt, a chunk of one or an extend over a
  cached prefix, as a serving engine's prefill). In the other phase the baseline runs.
* A call the candidate cannot compute (a padding mask for the kernel, a chunked
  causal prefill) falls back to the baseline; fallbacks are counted with their reason.
* The caller's tensors, the KV cache above all, are never changed.

Masks are built by transformers' SDPA mask function: ``None`` means plain causal
attention (or full attention for a single query), else a boolean keep-mask.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from sagecheck import attention
from sagecheck.attention.contract import UnsupportedCall
from sagecheck.attention.baseline import causal_keep_mask

# our names that transformers uses for its own implementations get a prefix; every other registered name is its own
TRANSFORMERS_NAMES = {"sdpa": "sagecheck-sdpa", "eager": "sagecheck-eager"}
_REVERSE = {v: k for k, v in TRANSFORMERS_NAMES.items()}


@dataclass
class CallStats:
    """Calls that reached each implementation, by phase, and the fallbacks with their reasons."""

    calls: Counter = field(default_factory=Counter)
    by_phase: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.by_phase.clear()
            self.fallbacks.clear()
            self.fallback_reasons.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": dict(self.calls),
                "by_phase": {f"{k[0]}:{k[1]}": n for k, n in self.by_phase.items()},
                "fallbacks": dict(self.fallbacks),
                "fallback_reasons": dict(self.fallback_reasons),
            }


STATS = CallStats()


@dataclass
class _Config:
    baseline: str = "sdpa"
    phases: frozenset = frozenset({"prefill", "decode"})
    layers: frozenset | None = None  # None: every layer runs the candidate


_CONFIG = _Config()


def configure(
    baseline: str = "sdpa",
    phases: tuple[str, ...] | list[str] = ("prefill", "decode"),
    layers: set[int] | None = None,
) -> None:
    """Choose the baseline used for fallbacks, the phases and (optionally) the layers where the candidate runs."""
    if not attention.is_baseline(baseline):
        raise ValueError(f"baseline must be one of {attention.names()} with the baseline role, not {baseline!r}")
    bad = set(phases) - {"prefill", "decode"}
    if bad or not phases:
        raise ValueError(f"phases must be a non-empty subset of prefill, decode; got {list(phases)}")
    _CONFIG.baseline = baseline
    _CONFIG.phases = frozenset(phases)
    _CONFIG.layers = None if layers is None else frozenset(layers)


def phase_of(n_q: int, n_k: int) -> str:
    """``decode``: one query over a longer cache; every other call (a prompt, a chunk or an extend over a cached
    prefix) is ``prefill``, as a serving engine's prefill/extend mode."""
    return "decode" if n_q == 1 and n_k > 1 else "prefill"


def transformers_name(name: str) -> str:
    """The name transformers knows an implementation by (:class:`~sagecheck.registry.UnknownName` for none)."""
    canonical = attention.ATTENTION.canonical(name)
    return TRANSFORMERS_NAMES.get(canonical, canonical)


def sagecheck_name(transformers_impl: str) -> str:
    """``sagecheck-sdpa`` -> ``sdpa``; a name transformers owns is returned as is."""
    return _REVERSE.get(transformers_impl, transformers_impl)


def _normalise_mask(mask: torch.Tensor | None, n_q: int, n_k: int, causal_default: bool) -> tuple[bool, torch.Tensor | None]:
    """(causal, keep-mask) from what transformers passed; a mask that is plain causal or all-true becomes None."""
    if mask is None:
        return causal_default and n_q > 1, None
    if mask.dtype != torch.bool:  # additive float mask
        mask = mask > torch.finfo(mask.dtype).min / 2
    if bool(mask.all()):
        return False, None
    causal = causal_keep_mask(n_q, n_k, mask.device)
    if bool((mask == causal).all()):
        return n_q > 1, None
    return False, mask


def _baseline_call(name: str, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _own_call(name, module, query, key, value, attention_mask, scaling, **kwargs)


def _own_call(name: str, module, query, key, value, attention_mask, scaling, **kwargs):
    """Run one of our implementations on transformers' tensors; returns ([b, n_q, h, d], None)."""
    n_q, n_k = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal, keep = _normalise_mask(attention_mask, n_q, n_k, is_causal)
    if attention_mask is None and causal and n_k > n_q:
        # a static cache's prefill: the trailing keys are empty slots (transformers' sdpa path slices them too)
        key, value = key[:, :, :n_q], value[:, :, :n_q]
    out = attention.get(name)(query, key, value, causal=causal, scale=scaling, mask=keep)
    return out.transpose(1, 2).contiguous(), None


def _make_forward(name: str):
    # the baseline, and the accepted-precision control (an FP8 KV cache is read in every phase), run in every call
    is_candidate = attention.ATTENTION.info(name).get("role") not in ("baseline", "accepted")

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
        n_q, n_k = query.shape[2], key.shape[2]
        phase = phase_of(n_q, n_k)
        baseline = _CONFIG.baseline
        off_layer = _CONFIG.layers is not None and getattr(module, "layer_idx", None) not in _CONFIG.layers
        if is_candidate and (phase not in _CONFIG.phases or off_layer):
            with STATS.lock:
                STATS.calls[baseline] += 1
                STATS.by_phase[(baseline, phase)] += 1
            return _baseline_call(baseline, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if not is_candidate and name == "sdpa":
            with STATS.lock:
                STATS.calls[name] += 1
                STATS.by_phase[(name, phase)] += 1
            return _baseline_call("sdpa", module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        try:
            result = _own_call(name, module, query, key, value, attention_mask, scaling, **kwargs)
        except UnsupportedCall as why:
            with STATS.lock:
                STATS.fallbacks[name] += 1
                STATS.fallback_reasons[f"{name}: {why}"] += 1
                STATS.calls[baseline] += 1
                STATS.by_phase[(baseline, phase)] += 1
            return _baseline_call(baseline, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        with STATS.lock:
            STATS.calls[name] += 1
            STATS.by_phase[(name, phase)] += 1
        return result

    forward.__name__ = f"sagecheck_{name.replace('-', '_')}_attention"
    return forward


_registered: set[str] = set()


def register() -> None:
    """Register every implementation of :data:`sagecheck.registry.ATTENTION` (and the SDPA mask builder for it) with
    transformers; one registered later (a test's variant) on the next call. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    for ours in attention.names():
        if ours in _registered:
            continue
        theirs = transformers_name(ours)
        AttentionInterface.register(theirs, _make_forward(ours))
        AttentionMaskInterface.register(theirs, sdpa_mask)
        _registered.add(ours)
