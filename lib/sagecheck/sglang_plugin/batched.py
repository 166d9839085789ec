"""A batch of SGLang requests through ``sageattention.sageattn``, which takes batched, not packed, tensors.

SageAttention 2's fast kernels (on Hopper ``sageattn_qk_int8_pv_fp8_cuda_sm90``: INT8 Q·K, FP8 P·V) are
reached only through ``sageattn(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k)``, whose tensors are
``[batch, tokens, heads, head_dim]`` ("NHD"): every sequence of a call has the same length. SGLang packs the
requests of a batch one after the other, each with its own length. This module pads them:

* **Right padding keeps causal attention exact.** With as many queries as keys, the kernel's causal mask lets
  row ``i`` see keys ``0..i``; a request's real rows come first, so no real row sees a padded key. The padded
  rows' outputs are dropped. Queries, keys and values of padded rows are zeros, so they raise no quantization
  scale (each INT8 group's and FP8 channel's scale is a maximum of absolute values). A request that extends a
  cached prefix is packed as its whole sequence first (:func:`sagecheck.sglang_plugin.varlen.extend_attention`),
  so it too has as many queries as keys: the same alignment that the varlen path relies on.
* **Grouping bounds the padding's cost.** One call over the whole batch padded to its longest request would
  spend the causal work of the longest on every short one. Requests are sorted by length and cut into groups,
  one ``sageattn`` call each, such that a group's padded causal work (``g·L²``) exceeds its requests' own
  (``Σ l²``) by at most :data:`MAX_PADDED_WORK` (25%). A batch of equal lengths (the usual benchmark, and
  SGLang's chunked prefill of one long request) is one call with no padding and no copy.
* **SageAttention 2's CUDA kernels run on the default stream.** They are launched as ``kernel<<<grid, block,
  smem>>>`` with no stream (``csrc/qattn/qk_int_sv_f8_cuda_sm90.cu``, ``csrc/fused/fused.cu`` at d1a57a5), so on
  the legacy default stream, while SGLang runs its forward (and the eager breaks of its prefill CUDA graphs) on
  streams of its own, which do not wait for it: unordered, the attention read inputs not yet written and the
  allocator handed out memory it still used (seen: a device-side index assert while SGLang captured its
  prefill graphs). :func:`on_default_stream` runs each call on the default stream between two waits.
* **K is smoothed per request, out of place** (:func:`~sagecheck.sglang_plugin.varlen.smooth_keys`) before
  padding, and the kernel gets ``smooth_k=False``: its own smoothing would take the mean over the padding too,
  and the caller's K (SGLang's KV cache) is never written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sagecheck.sglang_plugin.settings import INSTEAD, SageAttnUnavailable
from sagecheck.sglang_plugin.varlen import SeqIndex, smooth_keys, to_device

BatchedKernel = Callable[..., torch.Tensor]  # sageattn's signature
MAX_PADDED_WORK = 0.25  # a group's padded causal work may exceed its requests' own by this fraction


@dataclass
class PaddedGroup:
    """Requests that run in one ``sageattn`` call: ``count`` sequences padded to ``length`` tokens.

    ``rows``: the packed rows of the group's tokens, request after request; ``slots``: where each of those rows
    sits in the flattened ``[count * length]`` padded tensor. ``packed_range``: (first row, end) when the group is
    a contiguous run of the packed batch with no padding, so that a view replaces the copies.
    """

    count: int
    length: int
    rows: torch.Tensor
    slots: torch.Tensor
    packed_range: tuple[int, int] | None

    @property
    def padded_tokens(self) -> int:
        return self.count * self.length - int(self.rows.numel())


def group_by_length(seq_lens: Sequence[int], max_padded_work: float = MAX_PADDED_WORK) -> list[list[int]]:
    """Request indices in groups: longest first, a request joins the current group while the group's padded causal
    work stays within ``1 + max_padded_work`` times its requests' own; else it starts the next group. Within a group,
    requests keep the packed batch's order."""
    lens = [int(n) for n in seq_lens]
    order = sorted(range(len(lens)), key=lambda r: (-lens[r], r))
    groups: list[list[int]] = []
    longest = own = 0
    for r in order:
        if groups and (len(groups[-1]) + 1) * longest ** 2 <= (1 + max_padded_work) * (own + lens[r] ** 2):
            groups[-1].append(r)
            own += lens[r] ** 2
        else:
            groups.append([r])
            longest, own = lens[r], lens[r] ** 2
    return [sorted(g) for g in groups]


def plan(seq_lens: Sequence[int], device: torch.device | str = "cpu",
         max_padded_work: float = MAX_PADDED_WORK) -> list[PaddedGroup]:
    """The padded calls for a packed batch of sequences of ``seq_lens`` tokens (built once per batch, used by every
    layer)."""
    lens = [int(n) for n in seq_lens]
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"sequence lengths {lens}: at least one request, each at least one token")
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    groups = []
    for members in group_by_length(lens, max_padded_work):
        length = max(lens[r] for r in members)
        rows = torch.cat([torch.arange(starts[r], starts[r] + lens[r]) for r in members])
        slots = torch.cat([torch.arange(i * length, i * length + lens[r]) for i, r in enumerate(members)])
        contiguous = all(lens[r] == length for r in members) and members == list(range(members[0], members[-1] + 1))
        packed_range = (starts[members[0]], starts[members[0]] + len(members) * length) if contiguous else None
        groups.append(PaddedGroup(len(members), length, to_device(rows, device), to_device(slots, device), packed_range))
    return groups


def _padded(x: torch.Tensor, group: PaddedGroup) -> torch.Tensor:
    """Rows of packed ``x`` ``[tokens, heads, d]`` as ``[count, length, heads, d]``, zeros in the padding."""
    if group.packed_range is not None:
        first, end = group.packed_range
        return x[first:end].view(group.count, group.length, *x.shape[1:])
    out = x.new_zeros((group.count * group.length, *x.shape[1:]))
    out[group.slots] = x[group.rows]
    return out.view(group.count, group.length, *x.shape[1:])


def attend_groups(kernel: BatchedKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[PaddedGroup],
                  scale: float, return_lse: bool = False, smooth_k: bool = False) -> Any:
    """Causal attention of each packed sequence over itself, K already smoothed: ``[tokens, heads, d_v]``, and with
    ``return_lse`` each row's log-sum-exp ``[tokens, heads]`` (float32) too, from the kernel's own. ``smooth_k``: K is
    not smoothed yet and the kernel smooths it (each call's sequences by their own mean: right only where no group
    pads, and only for a kernel that does not write K, SageAttention 2's)."""
    extra = {"return_lse": True} if return_lse else {}

    def call(group: PaddedGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One group's call: its output and log-sum-exp as padded rows ``[count * length, ...]``."""
        o = kernel(_padded(q, group).contiguous(), _padded(k, group).contiguous(), _padded(v, group).contiguous(),
                   tensor_layout="NHD", is_causal=True, sm_scale=scale, smooth_k=smooth_k, **extra)
        o, l = o if return_lse else (o, None)
        rows = group.count * group.length
        return o.reshape(rows, *o.shape[2:]), None if l is None else l.transpose(1, 2).reshape(rows, -1).float()

    if len(groups) == 1 and groups[0].packed_range == (0, q.shape[0]):
        # the whole batch in one call with no padding (one request; equal lengths): the kernel's output is the answer,
        # not copied into another tensor
        o, l = call(groups[0])
        return (o, l) if return_lse else o
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device) if return_lse else None
    for group in groups:
        o, l = call(group)
        if group.packed_range is not None:
            first, end = group.packed_range
            out[first:end] = o
            if return_lse:
                lse[first:end] = l
        else:
            out[group.rows] = o[group.slots]
            if return_lse:
                lse[group.rows] = l[group.slots]
    return (out, lse) if return_lse else out


def causal_attention(kernel: BatchedKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int],
                     groups: list[PaddedGroup], scale: float, index: SeqIndex | None = None) -> torch.Tensor:
    """Causal attention of each packed sequence over itself (as many queries as keys): ``[tokens, heads, d_v]``.

    ``q``: ``[tokens, heads, d]``, ``k``/``v``: ``[tokens, kv_heads, d]``, packed by ``seq_lens``; ``groups``: from
    :func:`plan` for the same lengths; ``index``: their :class:`~sagecheck.sglang_plugin.varlen.SeqIndex`, if built.
    """
    return attend_groups(kernel, q, smooth_keys(k, seq_lens, index), v, groups, scale)


def on_default_stream(kernel: BatchedKernel) -> BatchedKernel:
    """``kernel`` run on the device's default stream, ordered after the caller's stream and before what follows on it
    (module docstring). The inputs and the output are marked as used by both streams, so that the caching allocator
    reuses none of their memory while either stream may still read it. A no-op off CUDA or on the default stream."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not q.is_cuda:
            return kernel(q, k, v, **kwargs)
        current, default = torch.cuda.current_stream(q.device), torch.cuda.default_stream(q.device)
        if current == default:
            return kernel(q, k, v, **kwargs)
        default.wait_stream(current)
        with torch.cuda.stream(default):
            out = kernel(q, k, v, **kwargs)
        current.wait_stream(default)
        for t in (q, k, v):
            t.record_stream(default)
        for t in (out if isinstance(out, tuple) else (out,)):  # with return_lse: (output, log-sum-exp)
            t.record_stream(current)
        return out

    return call


def load_kernel() -> BatchedKernel:
    """``sageattention.sageattn`` (it dispatches by GPU), or :class:`SageAttnUnavailable` saying how to get it."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise SageAttnUnavailable(
            f"sage_attn: the sageattention package cannot be imported ({e}); install sageattention (1.0.6 from PyPI, or "
            f"SageAttention 2 built from source for its Hopper kernels), or {INSTEAD}"
        ) from None
    return functools.wraps(sageattn)(on_default_stream(sageattn))


def describe_plan(groups: list[PaddedGroup]) -> dict[str, Any]:
    """Counts for the statistics: kernel calls and padded tokens of one batch."""
    return {"calls": len(groups), "padded_tokens": sum(g.padded_tokens for g in groups)}
