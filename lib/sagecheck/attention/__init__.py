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
CUDA only), ``sage-emulated`` (1.0.6's arithmetic in plain torch, any device), ``sage2-fp8-emulated``
(SageAttention 2's Hopper kernel, INT8 Q·K and FP8 P·V, in plain torch) and
``sdpa-noisy`` (a deliberately wrong candidate, the report's negative control).
"""

from __future__ import annotations

from typing import Any

from sagecheck.attention.contract import AttentionFn, AttentionUnavailable, UnsupportedCall
from sagecheck.registry import ATTENTION, UnknownName


def names() -> list[str]:
    return ATTENTION.names()


def is_baseline(name: str) -> bool:
    return ATTENTION.info(name).get("role") == "baseline"


def get(name: str) -> AttentionFn:
    """The implementation called ``name`` (:data:`sagecheck.registry.ATTENTION`); raises :class:`AttentionUnavailable`
    with the reason if it cannot run here, :class:`~sagecheck.registry.UnknownName` for a name nobody registered."""
    return ATTENTION.load(name)


def info(name: str) -> dict[str, Any]:
    """What exactly runs under ``name`` (kernel variant, package version), for the results."""
    name = ATTENTION.canonical(name)
    if name == "sage":
        from sagecheck.attention.sage_kernel import kernel_info

        return kernel_info()
    if name == "sage-emulated":
        from sagecheck.attention.sage_emulated import EMULATED_VERSION

        return {"name": name, "variant": f"plain-torch emulation of sageattention {EMULATED_VERSION} (v1 Triton kernels)"}
    if name == "sage2-fp8-emulated":
        from sagecheck.attention.sage2_fp8_emulated import EMULATED_KERNEL, EMULATED_SOURCE

        return {"name": name, "variant": f"plain-torch emulation of {EMULATED_KERNEL} ({EMULATED_SOURCE})"}
    if name == "sdpa":
        import torch

        return {"name": name, "variant": f"torch.nn.functional.scaled_dot_product_attention (torch {torch.__version__})"}
    if name == "sdpa-noisy":
        from sagecheck.attention.baseline import NOISE_RELATIVE

        return {"name": name, "variant": f"sdpa + Gaussian noise of {NOISE_RELATIVE:g} x output RMS (negative control)"}
    return {"name": name, "variant": ATTENTION.info(name)["description"]}


def available(name: str) -> tuple[bool, str]:
    """(True, '') if ``name`` can run here, else (False, the reason)."""
    try:
        get(name)
    except AttentionUnavailable as e:
        return False, str(e)
    return True, ""


__all__ = ["AttentionFn", "AttentionUnavailable", "UnsupportedCall", "UnknownName", "names", "is_baseline", "get", "info",
           "available"]
