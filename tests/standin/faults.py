"""STAND-IN behaviours of the deliberately wrong sage_attn variants (``tests/faults/site/sagecheck_faults``).

The stand-in server computes with sagecheck's emulation of SageAttention in process; for a variant it computes with
:func:`faulty` instead, which applies that variant's one defect where the real variant has it, told by
:func:`path` which code path the server is in: a cold prefill, an extend over a radix-cached prefix, a chunk of a
chunked prefill, a decode step replayed from a CUDA graph or an eager one.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from sagecheck.attention.baseline import sdpa
from sagecheck.attention.sage_emulated import BLOCK_K, sage_emulated
from sagecheck.registry import ATTENTION

_state = threading.local()
FAULT = {"fault": None, "tp": 1}


@contextlib.contextmanager
def path(name: str):
    previous = getattr(_state, "path", None)
    _state.path = name
    try:
        yield
    finally:
        _state.path = previous


def current() -> str | None:
    return getattr(_state, "path", None)


def start_sequence() -> None:
    """A new sequence begins decoding (what a replayed graph's stale lengths are kept for)."""
    _state.frozen = None


def _stale(k, v):
    """A replayed graph keeps the lengths of its first replay for the sequence: the keys of every token generated since
    are left out."""
    frozen = getattr(_state, "frozen", None) or k.shape[2]
    _state.frozen = frozen
    return k[:, :, :frozen], v[:, :, :frozen]


def faulty_baseline(q, k, v, *, causal=False, scale=None, mask=None):
    """The stand-in's Triton decode under a variant: where the variant's graph replay is stale, the decode it runs is."""
    if FAULT["fault"] == "stale_graph" and current() == "graph_decode" and q.shape[2] == 1 and k.shape[2] > 1:
        k, v = _stale(k, v)
    return sdpa(q, k, v, causal=causal, scale=scale, mask=mask)


def faulty(q, k, v, *, causal=False, scale=None, mask=None):
    """sage_emulated with the configured variant's defect (FAULT) on the path where that variant has it."""
    fault, where = FAULT["fault"], current()
    census_fault = _census_fault(fault, where, q, k, v, causal, scale, mask)
    if census_fault is not None:
        return census_fault
    n_q, n_k = q.shape[2], k.shape[2]
    if fault == "prefix" and where == "radix_extend" and 1 < n_q < n_k:
        prefix = n_k - n_q
        lost = prefix % BLOCK_K
        if lost:  # the keys of the partial last block of the prefix read as the block's first key
            start = prefix - lost
            k, v = k.clone(), v.clone()
            k[:, :, start:prefix] = k[:, :, start:start + 1]
            v[:, :, start:prefix] = v[:, :, start:start + 1]
    if fault == "stale_graph" and where == "graph_decode" and n_q == 1 and n_k > 1:
        k, v = _stale(k, v)
    if fault == "padded_decode" and where in ("graph_decode", "eager_decode") and n_q == 1:
        pad = (-n_k) % BLOCK_K
        if pad:  # the non-causal kernel's zero-padded keys in the softmax: keys that smooth to exactly 0, values 0
            mean = k.float().mean(dim=2, keepdim=True).to(k.dtype)
            k = torch.cat([k, mean.expand(-1, -1, pad, -1)], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], pad, v.shape[3])], dim=2)
    out = sage_emulated(q, k, v, causal=causal, scale=scale, mask=mask)
    if fault == "head_split" and FAULT["tp"] > 1:  # ranks after the first put their heads' outputs in the wrong places
        per_rank = q.shape[1] // FAULT["tp"]
        out = out.clone()
        for r in range(1, FAULT["tp"]):
            sl = slice(r * per_rank, (r + 1) * per_rank)
            out[:, sl] = out[:, sl].roll(1, dims=1)
    return out


def _census_fault(fault, where, q, k, v, causal, scale, mask):
    """The variants whose defect is in the kernel call itself (tests/faults/in_process.py computes them): on an extend
    over a radix-cached prefix, a causal call over fewer queries than keys, or no kernel call at all; a wrong scale on
    every call; kernel decode on a kernel that counts padding. None where this call is not the variant's to change."""
    from tests.faults import in_process as bad

    extend = where == "radix_extend" and 1 < q.shape[2] < k.shape[2]
    if fault == "causal_prefix" and extend:
        return bad.causal_prefix(q, k, v, causal=causal, scale=scale, mask=mask)
    if fault == "prefix_fallback" and extend:
        return bad.prefix_fallback(q, k, v, causal=causal, scale=scale, mask=mask)
    if fault == "wrong_scale":
        return bad.wrong_scale(q, k, v, causal=causal, scale=scale, mask=mask)
    if fault == "padded_kernel" and where in ("graph_decode", "eager_decode") and q.shape[2] == 1:
        return bad.padded_kernel(q, k, v, causal=causal, scale=scale)
    return None


def install(fault: str, tp: int) -> tuple[str, str]:
    """Register the variant ``fault``'s attention (and the decode it runs where that is the baseline's); returns
    (the baseline's name, the candidate's name)."""
    FAULT.update(fault=fault, tp=tp)
    if "sage-emulated-fault" not in ATTENTION:
        ATTENTION.register("sage-emulated-fault", "tests.standin.faults:faulty", role="candidate",
                           description=f"stand-in variant: {fault}")
        ATTENTION.register("sdpa-fault", "tests.standin.faults:faulty_baseline", role="baseline",
                           description=f"stand-in Triton decode of the variant {fault}")
    return "sdpa-fault", "sage-emulated-fault"
