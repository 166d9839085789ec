"""Deliberately wrong in-process candidates: sagecheck's emulation of SageAttention 1.0.6 with one integration defect
each, on the path where a backend would have it. Registered for a test by :func:`register`; 10_code_paths must fail
each on its own path and pass the others.

Defects of the output (10 judges them by the log-probabilities):

* ``sage-prefix-top-left``: an extend over a cached prefix (more keys than queries) computed with the kernel's causal
  mask, which assumes as many queries as keys: aligned top-left, the new tokens see the prefix's first keys only.
* ``sage-padded-decode``: a decode step (one query) over keys zero-padded up to a multiple of 64, the padding not
  masked: its scores (0) take part in the softmax, as 1.0.6's non-causal kernels count masked-out key slots.

Defects of the kernel call itself (the census, :mod:`sagecheck.census`, sees them whatever the output):

* ``sage-causal-prefix``: the extend calls the kernel causal with fewer queries than keys (what the kernel then
  computes: the top-left mask above);
* ``sage-padded-kernel``: decode calls a kernel that counts a partial block's masked-out key slots, and the
  integration does not correct for it (the replay of that configuration against the emulation shows it);
* ``sage-prefix-fallback``: every extend over cached keys silently runs on sdpa (no kernel call);
* ``sage-wrong-scale``: every call passes the kernel 1.25 times the model's softmax scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagecheck import census
from sagecheck.attention.baseline import causal_keep_mask, sdpa
from sagecheck.attention.sage_emulated import CENSUS_KERNEL, sage_emulated
from sagecheck.registry import ATTENTION

PAD_TO = 64
HERE = "tests.faults.in_process"


def _top_left(q, k, v, scale):
    n_q, n_k = q.shape[2], k.shape[2]
    keep = torch.zeros(n_q, n_k, dtype=torch.bool, device=q.device)
    keep[:, :n_q] = causal_keep_mask(n_q, n_q, q.device)  # query i sees keys 0..i, whatever the prefix
    return sage_emulated(q, k, v, causal=False, scale=scale, mask=keep)


def prefix_top_left(q, k, v, *, causal=False, scale=None, mask=None):
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and mask is None and 1 < n_q < n_k:
        return _top_left(q, k, v, scale)
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def padded_decode(q, k, v, *, causal=False, scale=None, mask=None):
    n_q, n_k = q.shape[2], k.shape[2]
    pad = -n_k % PAD_TO
    if n_q == 1 and mask is None and pad:
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def causal_prefix(q, k, v, *, causal=False, scale=None, mask=None):
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and mask is None and 1 < n_q < n_k:  # the call as it is made: causal, fewer queries than keys
        census.record_attention("sageattn", CENSUS_KERNEL, f"{HERE}:causal_prefix", q, k, causal=True, scale=scale,
                                integration=False)
        return _top_left_unrecorded(q, k, v, scale)  # what the kernel computes then: the mask aligned top-left
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def padded_kernel(q, k, v, *, causal=False, scale=None, mask=None):
    """A kernel that lets a partial block's masked-out key slots into the softmax (zero keys, zero values)."""
    n_k = k.shape[2]
    pad = -n_k % PAD_TO
    census.record_attention("sageattn_varlen", "padding-counting kernel (test)", f"{HERE}:padded_kernel", q, k,
                            causal=causal, scale=scale, integration=False)
    if pad and not causal:
        k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], pad, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], pad, v.shape[3])], dim=2)
    return _emulated_unrecorded(q, k, v, causal=causal, scale=scale)


padded_kernel.__sagecheck_emulation__ = "sage-emulated"


def padded_kernel_decode(q, k, v, *, causal=False, scale=None, mask=None):
    if q.shape[2] == 1 and mask is None:
        return padded_kernel(q, k, v, causal=causal, scale=scale)
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def prefix_fallback(q, k, v, *, causal=False, scale=None, mask=None):
    if 1 < q.shape[2] < k.shape[2]:
        return sdpa(q, k, v, causal=causal, scale=scale, mask=mask)
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def wrong_scale(q, k, v, *, causal=False, scale=None, mask=None):
    model = q.shape[-1] ** -0.5 if scale is None else scale
    return sage_emulated(q, k, v, causal=causal, scale=1.25 * model, mask=mask)


def _emulated_unrecorded(q, k, v, **kwargs):
    """The emulation's arithmetic without a census record of its own (the kernel calling it recorded the call)."""
    saved = census.CENSUS.record
    census.CENSUS.record = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        return sage_emulated(q, k, v, **kwargs)
    finally:
        census.CENSUS.record = saved  # type: ignore[method-assign]


def _top_left_unrecorded(q, k, v, scale):
    saved = census.CENSUS.record
    census.CENSUS.record = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        return _top_left(q, k, v, scale)
    finally:
        census.CENSUS.record = saved  # type: ignore[method-assign]


VARIANTS = {  # name: (function, the path it must fail, by its output or by the census)
    "sage-prefix-top-left": ("prefix_top_left", "prefix"),
    "sage-padded-decode": ("padded_decode", "decode_eager"),
}
CENSUS_VARIANTS = {  # name: (function, the paths whose kernel check it must fail, and no other)
    "sage-causal-prefix": ("causal_prefix", {"prefix", "chunked"}),
    "sage-padded-kernel": ("padded_kernel_decode", {"decode_eager"}),
    "sage-prefix-fallback": ("prefix_fallback", {"prefix", "chunked"}),
    "sage-wrong-scale": ("wrong_scale", {"cold", "prefix", "chunked", "decode_eager", "batch"}),
}


def register() -> None:
    """The variants as in-process candidates (once per process)."""
    for name, (fn, _) in {**VARIANTS, **CENSUS_VARIANTS}.items():
        if name not in ATTENTION:
            ATTENTION.register(name, f"{HERE}:{fn}", role="candidate",
                               description=f"a deliberately wrong candidate for the tests ({fn})")
