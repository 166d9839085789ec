"""STAND-IN: sage_attn's prefill with SageAttention 2 (``SAGE_ATTN_PREFILL=batched``), computed by the plugin's own code.

With SageAttention 2 installed, the real plugin's batched prefill calls ``sageattn`` (SA2's, which returns the
log-sum-exp), and an extend over a cached prefix runs :func:`sagecheck.sglang_plugin.split.extend_split`: the new tokens
against the prefix (not causal) and against themselves (causal), merged by log-sum-exp, both smoothed by the request's
mean. Here the same function runs on each request of the stand-in's forward, with sagecheck's emulation of SA2's sm90
kernel as ``sageattn`` (:func:`sageattn`), so that CI judges the plugin's split on 10's prefix and chunked paths, and a
variant with a defect in it (``sagecheck_faults.split``) fails them. Decode steps and anything else (a mask, a call
that is not causal) run the emulation as a correct integration calls it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from sagecheck.attention.sage2_fp8_emulated import sage2_fp8_emulated
from sagecheck.sglang_plugin import split
from sagecheck.sglang_plugin.varlen import ExtendLayout

KERNEL = "sage2-fp8-emulated through the plugin's split (stand-in: sagecheck's emulation of SageAttention 2's sm90 kernel)"


def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "NHD", is_causal: bool = False,
             sm_scale: float | None = None, smooth_k: bool = True, return_lse: bool = False) -> Any:
    """SageAttention 2's ``sageattn`` on ``[batch, tokens, heads, d]`` through the emulation of its sm90 kernel; with
    ``return_lse`` also each row's log-sum-exp ``[batch, heads, tokens]`` (natural log), as the kernel returns it."""
    assert tensor_layout == "NHD", "the plugin calls sageattn with tensor_layout='NHD'"
    got = sage2_fp8_emulated(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal, scale=sm_scale,
                             smooth_k=smooth_k, return_lse=return_lse)
    if return_lse:
        out, lse = got
        return out.transpose(1, 2), lse
    return got.transpose(1, 2)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
            mask: torch.Tensor | None = None, extend: Callable[..., torch.Tensor] = split.extend_split) -> torch.Tensor:
    """Attention on ``[batch, heads, tokens, d]`` as sage_attn computes a prefill with SA2: each request's new tokens
    (the queries) over its cached prefix (the keys before them) and themselves, by ``extend``."""
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == 1 or not causal or mask is not None:
        return sage2_fp8_emulated(q, k, v, causal=causal, scale=scale, mask=mask)
    prefix = n_k - n_q
    layout = ExtendLayout.build([prefix], [n_q])
    plan = split.plan_split(layout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for i in range(q.shape[0]):
        q3, k3, v3 = (x[i].transpose(0, 1) for x in (q, k, v))
        out = extend(sageattn, q3, k3[prefix:], v3[prefix:], k3[:prefix] if prefix else None, v3[:prefix] if prefix else None,
                     layout, plan, scale, kernel_smooths=True)  # as the plugin calls it with SageAttention 2
        outs.append(out.transpose(0, 1))
    return torch.stack(outs)


def prefill_own_means(q, k, v, *, causal=False, scale=None, mask=None):
    """:func:`prefill` with the variant ``sage_attn_split_own_means``'s split (each part smoothed by its own mean)."""
    from sagecheck_faults.split import extend_split_own_means

    return prefill(q, k, v, causal=causal, scale=scale, mask=mask, extend=extend_split_own_means)
