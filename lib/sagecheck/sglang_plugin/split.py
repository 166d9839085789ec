"""Extends over a cached prefix without the prefix's rows: two kernel calls merged by their log-sum-exp.

A request with ``p`` cached keys and ``e`` new tokens needs, for each new token, attention over the whole prefix
and over the new tokens up to itself. sageattention's causal mask is top-left (it assumes as many queries as keys),
so :func:`sagecheck.sglang_plugin.varlen.extend_with` hands the kernel the whole sequence: ``p + e`` rows, ``p`` of
them zero queries computed and dropped, ``(p + e)²/2`` query-key pairs. Here, where the kernel returns the
log-sum-exp of each row's scores (SageAttention 2's ``sageattn(..., return_lse=True)``; 1.0.6 has no such output),
each request is two calls of the kernel's own cases, ``p·e + e²/2`` pairs:

* **prefix part**: the ``e`` new queries against the ``p`` prefix keys, not causal (every new token sees the whole
  prefix);
* **new part**: the ``e`` new queries against their own keys, causal and square.

Each returns its output ``o`` and log-sum-exp ``l``; attention over the union of the two key sets is exactly
``(e^lA·oA + e^lB·oB) / (e^lA + e^lB)`` (:func:`merge_by_lse`, in float32: B's output moved towards A's by A's share
``sigmoid(lA - lB)``).

**One smoothing for both calls.** K is smoothed (its mean subtracted) before quantization. Smoothing by a mean ``μ``
shifts every score of a row by the same ``-q·μ·scale``, which softmax ignores but a log-sum-exp does not: two calls
smoothed by different means would be merged with wrongly weighted halves. So K is smoothed by each request's mean
over all its ``p + e`` keys (what the whole-sequence method uses, :class:`SmoothingIndex`, built once per batch),
the same in both calls, and the shift cancels in the merge. The kernel gets ``smooth_k=False``.

**Padding.** A non-causal call lets every row see every key, so the prefix part pads no keys: its calls take the
requests of one prefix length together (one call per distinct prefix length; a chunked prefill is one request, a
shared system prompt one length), their queries padded to the longest (a padded query row is dropped; zeros raise
no quantization scale). The new part is :mod:`.batched`'s causal calls, grouped by length as for a cold prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sagecheck.sglang_plugin.batched import PaddedGroup, attend_groups, plan
from sagecheck.sglang_plugin.varlen import ExtendLayout, minus_request_means, request_means, to_device

LseKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``sageattn(q, k, v, tensor_layout="NHD", is_causal=..., sm_scale=..., smooth_k=False, return_lse=True)``: the
output ``[batch, tokens, heads, d]`` and each row's log-sum-exp ``[batch, heads, tokens]`` (natural log)."""


def merge_by_lse(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                 with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over two disjoint key sets from each one's output ``[tokens, heads, d]`` and log-sum-exp
    ``[tokens, heads]``: (the output in ``o_b``'s dtype, the log-sum-exp of the union, or ``None`` without
    ``with_lse``). A row that saw no key of set A has ``-inf`` there and takes B's output unchanged."""
    # A's share of each row is e^lA / (e^lA + e^lB) = sigmoid(lA - lB): the output is B's moved that far towards A's,
    # one lerp in float32 (at least). 9 top-level aten calls where exp(l - logaddexp(lA, lB)) weights made 14 and the
    # max-subtracted form 22 (benchmarks/merge_calls.py); every layer of a prefix extend on the kernel runs it
    work = torch.promote_types(o_b.dtype, torch.float32)
    share_a = torch.sigmoid(lse_a - lse_b).to(work)[..., None]
    out = torch.lerp(o_b.to(work), o_a.to(work), share_a).to(o_b.dtype)
    return out, (torch.logaddexp(lse_a, lse_b) if with_lse else None)


@dataclass
class SmoothingIndex:
    """Which request each new token and each prefix key belongs to, and each request's key count (the layout's
    :class:`~sagecheck.sglang_plugin.varlen.SeqIndex` lengths), on the device: built once per batch, so that smoothing
    in each layer copies nothing from the host."""

    new_request: torch.Tensor
    prefix_request: torch.Tensor
    keys_per_request: torch.Tensor  # float32

    @classmethod
    def build(cls, layout: ExtendLayout, device: torch.device | str = "cpu") -> "SmoothingIndex":
        requests = torch.arange(len(layout.extend_lens))
        new = torch.repeat_interleave(requests, torch.tensor(layout.extend_lens, dtype=torch.int64))
        prefix = torch.repeat_interleave(requests, torch.tensor(layout.prefix_lens, dtype=torch.int64))
        counts = layout.seq_index.lengths if layout.seq_index is not None else torch.tensor(layout.seq_lens, dtype=torch.float32)
        return cls(to_device(new, device), to_device(prefix, device), to_device(counts, device))


def smooth_request_keys(k_new: torch.Tensor, k_prefix: torch.Tensor | None,
                        index: SmoothingIndex) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The new and prefix keys minus their request's mean over all its keys (per head; the mean of
    :func:`sagecheck.sglang_plugin.varlen.request_means`, as ``smooth_keys`` takes it), out of place."""
    parts = [(k_new, index.new_request)]
    if k_prefix is not None and k_prefix.shape[0]:
        parts.append((k_prefix, index.prefix_request))
    mean = request_means(parts, index.keys_per_request)
    smoothed_prefix = None if k_prefix is None else minus_request_means(k_prefix, mean, index.prefix_request)
    return minus_request_means(k_new, mean, index.new_request), smoothed_prefix


@dataclass
class PrefixGroup:
    """The requests of one prefix length, in one non-causal call: ``count`` requests, ``prefix`` keys each, queries
    padded to ``length``. ``rows``/``slots``: the packed new-token rows and their places in the padded queries;
    ``key_rows``: the packed prefix rows of the group's requests, request after request."""

    count: int
    prefix: int
    length: int
    rows: torch.Tensor
    slots: torch.Tensor
    key_rows: torch.Tensor
    # consecutive requests of ``length`` new tokens each (one request always): their queries and prefix keys are
    # contiguous ranges of the packed rows, (first, end) each, taken as views with no padding and no copy
    new_range: tuple[int, int] | None = None
    key_range: tuple[int, int] | None = None


@dataclass
class SplitPlan:
    """Everything the two parts need, built once per batch (:func:`plan_split`) and used by every layer."""

    smoothing: SmoothingIndex
    new_groups: list[PaddedGroup]
    prefix_groups: list[PrefixGroup]
    rows_with_prefix: torch.Tensor  # packed new-token rows of the requests that have a prefix
    every_row_has_prefix: bool = False  # then the merge takes whole tensors, no rows gathered

    @property
    def calls(self) -> int:
        return len(self.new_groups) + len(self.prefix_groups)


def plan_split(layout: ExtendLayout, device: torch.device | str = "cpu") -> SplitPlan:
    prefix, extend = layout.prefix_lens, layout.extend_lens
    new_start = [0]
    prefix_start = [0]
    for p, e in zip(prefix, extend):
        new_start.append(new_start[-1] + e)
        prefix_start.append(prefix_start[-1] + p)
    groups = []
    for length in sorted({p for p in prefix if p > 0}, reverse=True):
        members = [r for r, p in enumerate(prefix) if p == length]
        longest = max(extend[r] for r in members)
        rows = torch.cat([torch.arange(new_start[r], new_start[r] + extend[r]) for r in members])
        slots = torch.cat([torch.arange(i * longest, i * longest + extend[r]) for i, r in enumerate(members)])
        key_rows = torch.cat([torch.arange(prefix_start[r], prefix_start[r] + length) for r in members])
        consecutive = members == list(range(members[0], members[-1] + 1)) and all(extend[r] == longest for r in members)
        new_range = (new_start[members[0]], new_start[members[0]] + len(members) * longest) if consecutive else None
        key_range = (prefix_start[members[0]], prefix_start[members[0]] + len(members) * length) if consecutive else None
        groups.append(PrefixGroup(len(members), length, longest, to_device(rows, device), to_device(slots, device),
                                  to_device(key_rows, device), new_range, key_range))
    with_prefix = [torch.arange(new_start[r], new_start[r] + extend[r]) for r, p in enumerate(prefix) if p > 0]
    rows_with_prefix = torch.cat(with_prefix) if with_prefix else torch.zeros(0, dtype=torch.int64)
    return SplitPlan(SmoothingIndex.build(layout, device), plan(extend, device), groups, to_device(rows_with_prefix, device),
                     every_row_has_prefix=all(p > 0 for p in prefix))


def _prefix_part(kernel: LseKernel, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                 groups: Sequence[PrefixGroup], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The new queries against their request's prefix keys (not causal): output ``[new tokens, heads, d_v]`` and
    log-sum-exp ``[new tokens, heads]``; ``-inf`` on the rows of requests without a prefix."""

    def call(g: PrefixGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's call: its output and log-sum-exp as padded rows ``[count * length, ...]``."""
        if g.new_range is not None:  # views of contiguous rows (module docstring, PrefixGroup)
            (first, end), (k0, k1) = g.new_range, g.key_range
            qg, kg, vg = q[first:end], k_prefix[k0:k1], v_prefix[k0:k1]
        else:
            qg = q.new_zeros((g.count * g.length, *q.shape[1:]))
            qg[g.slots] = q[g.rows]
            kg, vg = k_prefix[g.key_rows], v_prefix[g.key_rows]
        o, l = kernel(qg.reshape(g.count, g.length, *q.shape[1:]).contiguous(),
                      kg.reshape(g.count, g.prefix, *k_prefix.shape[1:]).contiguous(),
                      vg.reshape(g.count, g.prefix, *v_prefix.shape[1:]).contiguous(), tensor_layout="NHD",
                      is_causal=False, sm_scale=scale, smooth_k=False, return_lse=True)
        rows = g.count * g.length
        return o.reshape(rows, *o.shape[2:]), l.transpose(1, 2).reshape(rows, -1).float()

    if len(groups) == 1 and groups[0].new_range == (0, q.shape[0]):
        # every new row in one call with no padding (a chunk of a chunked prefill; equal requests after one shared
        # prompt): the kernel's output and log-sum-exp are the answer, no zero-filled tensors to copy them into
        return call(groups[0])
    out = q.new_zeros((q.shape[0], q.shape[1], v_prefix.shape[-1]))
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for g in groups:
        o, l = call(g)
        if g.new_range is not None:
            first, end = g.new_range
            out[first:end], lse[first:end] = o, l
        else:
            out[g.rows], lse[g.rows] = o[g.slots], l[g.slots]
    return out, lse


def extend_split(kernel: LseKernel, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None, layout: ExtendLayout, split: SplitPlan,
                 scale: float, kernel_smooths: bool = False) -> torch.Tensor:
    """Causal attention of the new tokens over their request's prefix and themselves, ``[new tokens, heads, d_v]``,
    without computing the prefix's rows (module docstring). Shapes as
    :func:`sagecheck.sglang_plugin.varlen.extend_with`; ``split``: :func:`plan_split` of ``layout``.

    ``kernel_smooths``: the kernel's own smoothing leaves K unwritten (SageAttention 2's ``sageattn`` takes the mean
    over each call's sequence, per batch element and head, and subtracts it inside K's quantization; 1.0.6's subtracts
    it from K in place). Then a cold batch whose calls pad nothing has the kernel smooth each request by its own mean,
    the same mean as here, without a pass over K of ours (on an H100 the path's GPU time at 4096 keys was 10% over
    the bare kernel's, this smoothing the difference)."""
    if layout.has_prefix and (k_prefix is None or v_prefix is None or k_prefix.shape[0] != sum(layout.prefix_lens)):
        raise ValueError(f"{sum(layout.prefix_lens)} prefix keys expected, got {None if k_prefix is None else k_prefix.shape[0]}")
    if not layout.has_prefix and kernel_smooths and all(g.packed_range is not None for g in split.new_groups):
        return attend_groups(kernel, q, k_new, v_new, split.new_groups, scale, smooth_k=True)
    k_new_s, k_prefix_s = smooth_request_keys(k_new, k_prefix if layout.has_prefix else None, split.smoothing)
    if not layout.has_prefix:  # a cold prefill: the causal part alone, no log-sum-exp asked for
        return attend_groups(kernel, q, k_new_s, v_new, split.new_groups, scale)
    out_new, lse_new = attend_groups(kernel, q, k_new_s, v_new, split.new_groups, scale, return_lse=True)
    out_prefix, lse_prefix = _prefix_part(kernel, q, k_prefix_s, v_prefix, split.prefix_groups, scale)
    if split.every_row_has_prefix:
        return merge_by_lse(out_prefix, lse_prefix, out_new, lse_new, with_lse=False)[0]
    rows = split.rows_with_prefix
    merged, _ = merge_by_lse(out_prefix[rows], lse_prefix[rows], out_new[rows], lse_new[rows], with_lse=False)
    out_new[rows] = merged
    return out_new


def takes_lse(kernel: Callable[..., object]) -> bool:
    """Whether a ``sageattn`` returns the log-sum-exp (SageAttention 2's ``return_lse``; 1.0.6's has none)."""
    import inspect

    target = getattr(kernel, "__wrapped__", kernel)
    try:
        return "return_lse" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def pairs(prefix_lens: Sequence[int], extend_lens: Sequence[int], whole_sequence: bool) -> int:
    """Query-key pairs the kernel computes for a batch: the whole-sequence method's ``(p + e)(p + e + 1)/2`` per request,
    or the split's ``p·e + e(e + 1)/2``."""
    if whole_sequence:
        return sum((p + e) * (p + e + 1) // 2 for p, e in zip(prefix_lens, extend_lens))
    return sum(p * e + e * (e + 1) // 2 for p, e in zip(prefix_lens, extend_lens))
