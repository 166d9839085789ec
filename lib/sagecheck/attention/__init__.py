"""Attention implementations behind one signature.

``sagecheck.attention.get(name)`` returns ``attn(q, k, v, *, causal=False, scale=None, mask=None)``
on tensors shaped ``[batch, heads, seq, head_dim]``:

* k and v may have fewer heads than q (grouped-query attention: q head ``i`` reads kv head
  ``i // (heads / kv_heads)``);
* the query may be shorter than the keys (decode with a KV cache). ``causal`` is then
  aligned bottom-right: query ``i`` sits at position ``n_k - n_q + i``;
* ``mask`` (optional) is a boolean keep-mask broadcastable to ``[batch, heads, n_q, n_k]``.
  Implementations that cannot honour it raise :class:`UnsupportedCall`, and so do they
  for shapes they do not support; callers may then fall back to the baseline.

Names: ``sdpa`` and ``eager`` (the baseline), ``sage`` (the real SageAttention kernel,
CUDA only), ``sage-emulated`` (its arithmetic in plain torch, any device) and
``sdpa-noisy`` (a deliberately wrong candidate, the report's negative control).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

BASELINE_NAMES = ("sdpa", "eager")
CANDIDATE_NAMES = ("sage", "sage-emulated")
CONTROL_NAMES = ("sdpa-noisy",)


class AttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class AttentionUnavailable(RuntimeError):
    """The implementation cannot run on this machine (no CUDA, package missing)."""


class UnsupportedCall(ValueError):
    """The implementation cannot compute this call (a mask, a shape); the baseline can."""


def _load(name: str) -> AttentionFn:
    if name == "sdpa":
        from sagecheck.attention.baseline import sdpa

        return sdpa
    if name == "eager":
        from sagecheck.attention.baseline import eager

        return eager
    if name == "sage-emulated":
        from sagecheck.attention.sage_emulated import sage_emulated

        return sage_emulated
    if name == "sage":
        from sagecheck.attention.sage_kernel import load_kernel

        return load_kernel()
    if name == "sdpa-noisy":
        from sagecheck.attention.baseline import sdpa_noisy

        return sdpa_noisy
    raise KeyError(f"unknown attention implementation {name!r}; known: {', '.join(names())}")


def names() -> list[str]:
    return [*BASELINE_NAMES, *CANDIDATE_NAMES, *CONTROL_NAMES]


_LOADED: dict[str, AttentionFn] = {}


def get(name: str) -> AttentionFn:
    """The implementation called ``name``; raises :class:`AttentionUnavailable` with the reason if it cannot run here."""
    fn = _LOADED.get(name)
    if fn is None:
        fn = _LOADED[name] = _load(name)
    return fn


def info(name: str) -> dict[str, Any]:
    """What exactly runs under ``name`` (kernel variant, package version), for the results."""
    if name == "sage":
        from sagecheck.attention.sage_kernel import kernel_info

        return kernel_info()
    if name == "sage-emulated":
        from sagecheck.attention.sage_emulated import EMULATED_VERSION

        return {"name": name, "variant": f"plain-torch emulation of sageattention {EMULATED_VERSION} (v1 Triton kernels)"}
    if name == "sdpa":
        return {"name": name, "variant": f"torch.nn.functional.scaled_dot_product_attention (torch {torch.__version__})"}
    if name == "eager":
        return {"name": name, "variant": "explicit QK^T, softmax in float32, PV"}
    if name == "sdpa-noisy":
        from sagecheck.attention.baseline import NOISE_RELATIVE

        return {"name": name, "variant": f"sdpa + Gaussian noise of {NOISE_RELATIVE:g} x output RMS (negative control)"}
    raise KeyError(name)


def available(name: str) -> tuple[bool, str]:
    """(True, '') if ``name`` can run here, else (False, the reason)."""
    try:
        get(name)
    except AttentionUnavailable as e:
        return False, str(e)
    return True, ""

