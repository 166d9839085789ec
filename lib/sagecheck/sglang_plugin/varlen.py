"""A batch of SGLang requests through sageattention's varlen kernel, in plain torch around it.

``sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
sm_scale, smooth_k)`` (sageattention 1.0.6) takes the sequences of a batch packed one after
the other, ``[tokens, heads, head_dim]``. Three of its properties shape this module (each read
in the 1.0.6 wheel, and checked on the GPU by ``tests/test_sglang_plugin.py``):

* **Causal means top-left**: query row ``i`` of a sequence sees keys ``0..i``
  (``attn_qk_int8_per_block_causal_varlen.py``), so it is right only where a sequence has as
  many queries as keys. A request that extends a cached prefix (radix cache hit, a chunk of a
  chunked prefill) has fewer. :func:`extend_attention` therefore gives the kernel the whole
  sequence, prefix keys gathered from the cache, with zero queries in the prefix rows, and
  keeps the rows of the new tokens: exact, at the cost of the prefix rows' work.
* **Non-causal counts padding**: the non-causal kernel (``attn_qk_int8_block_varlen.py``)
  loads the keys of a sequence's last, partial 64-key block as zeros and lets them into the
  softmax's denominator with score 0; their values are zero. Its output is the true one
  times ``D / (D + n_pad·e^-m)``, the same factor for every value column. A second call with
  values of ones returns that factor, and :func:`decode_attention` divides it out.
* **Smoothing in place, over the whole batch**: with ``smooth_k`` it subtracts the mean of K
  over all tokens of all sequences *in place*. Here K is smoothed out of place, per sequence
  and head (what ``sageattn`` does for one request), and the kernel gets ``smooth_k=False``:
  the caller's K, and SGLang's KV cache, are never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sagecheck.sglang_plugin.settings import INSTEAD, SageAttnUnavailable

VarlenKernel = Callable[..., torch.Tensor]  # sageattn_varlen's signature
KEY_BLOCK = 64  # the kernel's BLOCK_N: keys are loaded, quantized and padded per 64


@dataclass
class ExtendLayout:
    """Where each request's tokens sit when its cached prefix and its new tokens are packed into one sequence.

    Request ``r`` becomes ``prefix_lens[r]`` cached keys followed by ``extend_lens[r]`` new
    tokens. ``new_pos`` / ``prefix_pos``: the packed row of every new token / every prefix key,
    in SGLang's order (requests one after the other). ``cu_seqlens``: int32 offsets of the
    packed sequences (the same for queries and keys).
    """

    prefix_lens: list[int]
    extend_lens: list[int]
    cu_seqlens: torch.Tensor
    new_pos: torch.Tensor
    prefix_pos: torch.Tensor
    seq_index: "SeqIndex | None" = None

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    @property
    def has_prefix(self) -> bool:
        return any(self.prefix_lens)

    @property
    def total(self) -> int:
        return sum(self.seq_lens)

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens, default=0)

    @classmethod
    def build(cls, prefix_lens: Sequence[int], extend_lens: Sequence[int], device: torch.device | str = "cpu") -> "ExtendLayout":
        prefix = [int(p) for p in prefix_lens]
        extend = [int(e) for e in extend_lens]
        if len(prefix) != len(extend) or any(p < 0 for p in prefix) or any(e < 1 for e in extend):
            raise ValueError(f"prefix lengths {prefix} and extend lengths {extend}: one of each per request, extend >= 1")
        p = torch.tensor(prefix, dtype=torch.int64)
        e = torch.tensor(extend, dtype=torch.int64)
        starts = torch.cumsum(p + e, 0) - (p + e)  # first packed row of each request
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(p + e, 0)]).to(torch.int32)
        new_pos = _ranges(starts + p, e)
        prefix_pos = _ranges(starts, p)
        return cls(prefix, extend, to_device(cu, device), to_device(new_pos, device), to_device(prefix_pos, device),
                   SeqIndex.build([a + b for a, b in zip(prefix, extend)], device))


@dataclass
class SeqIndex:
    """The sequence of each packed row and each sequence's length, on the device: built once per batch, so that
    smoothing K in every layer copies nothing from the host."""

    seq_id: torch.Tensor
    lengths: torch.Tensor  # float32

    @classmethod
    def build(cls, seq_lens: Sequence[int], device: torch.device | str = "cpu") -> "SeqIndex":
        lens = torch.tensor([int(n) for n in seq_lens], dtype=torch.int64)
        return cls(to_device(torch.repeat_interleave(torch.arange(len(lens)), lens), device),
                   to_device(lens.clamp(min=1).to(torch.float32), device))


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor of a batch's plan (indices, offsets) on ``device``, without waiting for the GPU.

    ``t.to("cuda")`` from pageable host memory copies and then synchronizes the stream: in an SGLang server that is a
    wait for every batch still running before the next one's plan is on the device (an H100 profile of 2026-12-05: 7
    ``cudaStreamSynchronize`` per prefill batch on the kernel). From pinned memory the copy is queued on the stream and
    the host goes on; the pinned block is not reused until the copy is done (PyTorch's caching host allocator)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def load_kernel():
    """``sageattention.sageattn_varlen``, or :class:`SageAttnUnavailable` saying how to get it."""
    try:
        from sageattention import sageattn_varlen
    except ImportError as e:
        raise SageAttnUnavailable(
            f"sage_attn: the sageattention package cannot be imported ({e}); install it with "
            f"`pip install sageattention==1.0.6` (or sagecheck's gpu extra), or {INSTEAD}"
        ) from None
    return sageattn_varlen


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))`` without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(offsets - starts, lengths)


def smooth_keys(k: torch.Tensor, seq_lens: Sequence[int], index: SeqIndex | None = None) -> torch.Tensor:
    """K minus its mean over each sequence, per head (``sageattn``'s smoothing for one request), out of place.

    ``k``: ``[tokens, kv_heads, head_dim]`` packed by ``seq_lens``. The mean is taken in float32
    and rounded to K's dtype before the subtraction, as ``k.mean(dim=seq)`` then ``k -= km`` does.
    ``index``: :class:`SeqIndex` of ``seq_lens`` on K's device (else built here, a copy from the host).
    """
    if index is None:
        index = SeqIndex.build(seq_lens, k.device)
    return minus_request_means(k, request_means([(k, index.seq_id)], index.lengths), index.seq_id)


def minus_request_means(keys: torch.Tensor, means: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
    """``keys`` minus the mean of each row's request (``means[request]``), out of place; one request's mean (a long
    prefill, a chunked prefill) broadcast, with no gather of a mean per row."""
    return keys - (means if means.shape[0] == 1 else means[request])


def request_means(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], key_counts: torch.Tensor) -> torch.Tensor:
    """Each request's mean key ``[requests, kv_heads, head_dim]``, in the keys' dtype: the rows of every part
    (``(keys, the request of each row)``, on the device) summed per request in float32, divided by ``key_counts``
    (float32, one per request) and rounded, as ``k.mean(dim=seq)`` does for one request. Several parts: a request's
    keys in two tensors (its cached prefix and its new tokens, :mod:`.split`)."""
    first = parts[0][0]
    if key_counts.shape[0] == 1:
        # one request (a long prefill, a chunked prefill): one float32 reduction per part, reading K once. The
        # indexed sum below converts K to float32 first and adds it row by row (0.105 of 1.74 ms per layer at 8192
        # keys on an H100, benchmarks/backend_overhead.py)
        sums = sum(torch.sum(keys, 0, keepdim=True, dtype=torch.float32) for keys, _ in parts)
        return (sums / key_counts[:, None, None]).to(first.dtype)
    sums = torch.zeros((key_counts.shape[0], *first.shape[1:]), dtype=torch.float32, device=first.device)
    for keys, request in parts:
        sums.index_add_(0, request, keys.float())
    return (sums / key_counts[:, None, None]).to(first.dtype)


def varlen(kernel: VarlenKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
           max_q: int, max_k: int, k_lens: Sequence[int], causal: bool, scale: float,
           index: SeqIndex | None = None) -> torch.Tensor:
    """One kernel call with K smoothed per sequence out of place (see the module docstring)."""
    k_smooth = smooth_keys(k, k_lens, index)
    return kernel(q, k_smooth, v, cu_q, cu_k, max_q, max_k, is_causal=causal, sm_scale=scale, smooth_k=False)


PackedCausal = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of packed whole sequences over themselves (as many queries as keys): (q, k, v) -> out."""


def extend_with(attend: PackedCausal, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None, layout: ExtendLayout) -> torch.Tensor:
    """Causal attention of the new tokens over their request's prefix and themselves: ``[new tokens, heads, head_dim]``.

    ``q``: ``[new tokens, heads, d]``; ``k_new``/``v_new``: ``[new tokens, kv_heads, d]``;
    ``k_prefix``/``v_prefix``: the prefix keys and values read from the cache, ``[prefix tokens, kv_heads, d]``
    in request order (None when no request has a prefix). ``attend`` runs on the whole sequences, packed by
    ``layout`` (prefix rows get zero queries, computed and dropped), so that every sequence has as many queries
    as keys, whatever the kernel's causal alignment.
    """
    if not layout.has_prefix:
        return attend(q, k_new, v_new)
    if k_prefix is None or v_prefix is None or k_prefix.shape[0] != sum(layout.prefix_lens):
        raise ValueError(f"{sum(layout.prefix_lens)} prefix keys expected, got {None if k_prefix is None else k_prefix.shape[0]}")
    total = layout.total
    q_all = q.new_zeros((total, *q.shape[1:]))
    q_all[layout.new_pos] = q
    k_all = k_new.new_empty((total, *k_new.shape[1:]))
    v_all = v_new.new_empty((total, *v_new.shape[1:]))
    k_all[layout.new_pos], k_all[layout.prefix_pos] = k_new, k_prefix
    v_all[layout.new_pos], v_all[layout.prefix_pos] = v_new, v_prefix
    return attend(q_all, k_all, v_all)[layout.new_pos]


def extend_attention(kernel: VarlenKernel, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None, layout: ExtendLayout,
                     scale: float) -> torch.Tensor:
    """:func:`extend_with` on ``sageattn_varlen``: one causal call over the packed batch."""
    def attend(q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        return varlen(kernel, q_all, k_all, v_all, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                      layout.max_seqlen, layout.seq_lens, True, scale, layout.seq_index)

    return extend_with(attend, q, k_new, v_new, k_prefix, v_prefix, layout)


def decode_attention(kernel: VarlenKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_k: torch.Tensor,
                     seq_lens: Sequence[int], scale: float) -> torch.Tensor:
    """One query per request over all its cached keys: ``[requests, heads, head_dim]``, in q's dtype.

    ``k``/``v``: every request's keys and values, packed (``cu_k``: int32 offsets). The
    non-causal kernel's padding factor is divided out with a second call on values of ones
    (module docstring). Both calls run in float16 (a bf16 tensor converts exactly for values
    within fp16's range), so the factor is not rounded to bf16 before the division.
    """
    requests = q.shape[0]
    cu_q = torch.arange(requests + 1, dtype=torch.int32, device=q.device)
    max_k = max(int(n) for n in seq_lens)
    q16, k16, v16 = q.to(torch.float16), k.to(torch.float16), v.to(torch.float16)
    k_smooth = smooth_keys(k16, seq_lens)
    call = dict(is_causal=False, sm_scale=scale, smooth_k=False)
    out = kernel(q16, k_smooth, v16, cu_q, cu_k, 1, max_k, **call)
    norm = kernel(q16, k_smooth, torch.ones_like(v16), cu_q, cu_k, 1, max_k, **call)
    return (out.float() / norm.float()[..., :1]).to(q.dtype)


def extend_lengths(forward_batch: Any) -> tuple[list[int], list[int]]:
    """Each request's cached-prefix and new-token counts as plain ints, from SGLang's host copies where it made them
    (during CUDA-graph capture they are tensors, or lists of 0-d tensors) else from the device tensors."""
    def ints(host: Any, device: Any) -> list[int]:
        values = host if host is not None else device.tolist()
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        return [int(n) for n in values]

    return (ints(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens),
            ints(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens))
