"""Deliberately wrong in-process candidates: sagecheck's emulation of SageAttention 1.0.6 with one integration defect
each, on the path where a backend would have it. Registered for a test by :func:`register`; 10_code_paths must fail
each on its own path and pass the others.

* ``sage-prefix-top-left``: an extend over a cached prefix (more keys than queries) called with the kernel's causal
  mask, which assumes as many queries as keys: aligned top-left, the new tokens see the prefix's first keys only.
* ``sage-padded-decode``: a decode step (one query) over keys zero-padded up to a multiple of 64, the padding not
  masked: its scores (0) take part in the softmax, as 1.0.6's non-causal kernels count masked-out key slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagecheck.attention.baseline import causal_keep_mask
from sagecheck.attention.sage_emulated import sage_emulated
from sagecheck.registry import ATTENTION

PAD_TO = 64


def prefix_top_left(q, k, v, *, causal=False, scale=None, mask=None):
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and mask is None and 1 < n_q < n_k:
        top_left = causal_keep_mask(n_q, n_q, q.device)  # query i sees keys 0..i, whatever the prefix
        keep = torch.zeros(n_q, n_k, dtype=torch.bool, device=q.device)
        keep[:, :n_q] = top_left
        return sage_emulated(q, k, v, causal=False, scale=scale, mask=keep)
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


def padded_decode(q, k, v, *, causal=False, scale=None, mask=None):
    n_q, n_k = q.shape[2], k.shape[2]
    pad = -n_k % PAD_TO
    if n_q == 1 and mask is None and pad:
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    return sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)


VARIANTS = {"sage-prefix-top-left": ("prefix_top_left", "prefix"), "sage-padded-decode": ("padded_decode", "decode_eager")}


def register() -> None:
    """The variants as in-process candidates (once per process)."""
    for name, (fn, _) in VARIANTS.items():
        if name not in ATTENTION:
            ATTENTION.register(name, f"tests.faults.in_process:{fn}", role="candidate",
                               description=f"a deliberately wrong candidate for the tests ({fn})")
