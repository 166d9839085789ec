"""The online softmax over key blocks that SageAttention's kernels run, shared by the emulations.

Each emulation supplies what differs between kernels: the scores (dequantized, in log2 units, as the kernel computes
them) and each block's P·V (with the kernel's rounding of P and of the product); this module does what they share:
the block's part of the causal and boolean masks, the running maximum after each block (optionally offset, as
SageAttention 2 lowers it by log2 448 to fill FP8's range), the rescaling of the denominator and the accumulator.

The arithmetic is the kernel's, block after block: the probabilities of a block are taken against the running
maximum as it stands after that block, and the denominator and accumulator are rescaled and added to once per block,
in order. What is done for several blocks at once is only what does not depend on that order (scores, block maxima,
probabilities and the blocks' P·V products), for a segment of blocks at a time: a decode step costs a few dozen
tensor operations, not ~20 per 64-key block. The result is the same, bit for bit, as block after block
(tests/test_attention.py holds it to the plain loop).
"""

from __future__ import annotations

from typing import Callable

import torch

# scores(rows, start, stop): the scores of the query rows ``rows`` against keys start..stop, [b, h, len(rows), stop - start]
ScoresFn = Callable[[slice, int, int], torch.Tensor]
# block_pv(p, start, stop): the P·V of each of the consecutive, equally long key blocks covering start..stop:
# p [b, h, blocks, rows, block] -> [b, h, blocks, rows, d]
BlockPVFn = Callable[[torch.Tensor, int, int], torch.Tensor]

# the score elements a segment of key blocks aims at: the blocks of a decode step (a few hundred elements each) go
# several at once (a decode step on a CPU runs several times faster so; README has the figures), a prefill's one at a time, as
# the kernel does. Kept far below torch's parallel grain (32,768 elements): a longer tensor is split between threads
# at places that send some elements through the scalar loop, whose exp2 differs from the vector loop's in the last bit
SEGMENT_ELEMENTS = 1 << 12


def key_segments(n_k: int, block: int, blocks_at_once: int, rows_change_after: int) -> list[tuple[int, int, int]]:
    """(start, stop, block length) of the key segments a call works through: runs of up to ``blocks_at_once`` whole
    blocks that compute the same query rows, then the last, partial block on its own, so that every block has the
    length and the rows it has in the kernel's loop. A block starting after ``rows_change_after`` (causal attention:
    the first query's position) skips rows the blocks before it computed, so it goes alone."""
    whole = n_k // block * block
    segments, start = [], 0
    while start < whole:
        if start <= rows_change_after:  # up to blocks_at_once blocks, each starting no later than rows_change_after
            stop = min(whole, start + max(1, blocks_at_once) * block, (rows_change_after // block + 1) * block)
        else:
            stop = start + block
        segments.append((start, stop, block))
        start = stop
    if whole < n_k:
        segments.append((whole, n_k, n_k - whole))
    return segments


def online_softmax(scores: ScoresFn, block_pv: BlockPVFn, shape: tuple[int, int, int, int], n_k: int, block: int, *,
                   causal: bool, mask: torch.Tensor | None, device: torch.device,
                   max_offset: float = 0.0, with_max: bool = False) -> tuple[torch.Tensor, ...]:
    """(accumulator [b, h, n_q, d], denominator [b, h, n_q, 1]) in float32 after every key block; the output is
    their quotient (and whatever scale the kernel applies after it). ``with_max``: the running maximum ``m``
    [b, h, n_q, 1] too (the scores' units, ``max_offset`` included), so that ``m + log(denominator)`` (in those units)
    is the rows' log-sum-exp. ``shape`` is (b, h, n_q, d); causal masking
    is bottom-right aligned (query i sits at position n_k - n_q + i); ``mask`` is a boolean keep-mask over
    [n_q, n_k] or over the keys only."""
    b, h, n_q, d = shape
    positions = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    m = torch.full((b, h, n_q, 1), float("-inf"), dtype=torch.float32, device=device)
    acc_denom = torch.zeros((b, h, n_q, d + 1), dtype=torch.float32, device=device)  # the accumulator, the denominator
    blocks_at_once = SEGMENT_ELEMENTS // max(1, b * h * n_q * block)
    for start, stop, length in key_segments(n_k, block, blocks_at_once, n_k - n_q if causal else n_k):
        # causal: the query rows before the segment's first key see none of it; for them it changes nothing (score
        # -inf: m, denom and acc stay as they are, exactly), so only the rows from r0 on are computed. A row that
        # sees none of a later block in the segment is left exactly as it was by that block, as in the kernel
        r0 = max(0, start - (n_k - n_q)) if causal else 0
        if r0 >= n_q:
            break
        rq = slice(r0, n_q)
        s = scores(rq, start, stop)
        if causal or mask is not None:  # masks built per segment: a full n_q x n_k mask would not fit at 32k
            keep = torch.arange(start, stop, device=device)[None, :] <= positions[rq] if causal else None
            if mask is not None:
                segment_mask = mask[..., rq, start:stop] if mask.shape[-2] == n_q else mask[..., start:stop]
                keep = segment_mask if keep is None else (segment_mask & keep)
            s = s.masked_fill(~keep, float("-inf"))
        rows = n_q - r0
        s = s.reshape(b, h, rows, (stop - start) // length, length)
        # the running maximum after each block of the segment, from the one before it
        m_before = m[:, :, rq]
        m_after = torch.cummax(torch.cat([m_before, s.amax(dim=-1) - max_offset], dim=-1), dim=-1).values
        m_prev, m_new = m_after[..., :-1], m_after[..., 1:]
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp2(s - m_safe[..., None])
        log2_alpha = torch.where(torch.isfinite(m_prev), m_prev - m_safe, torch.full_like(m_prev, float("-inf")))
        log2_alpha = log2_alpha.permute(3, 0, 1, 2).contiguous()  # [blocks, b, h, rows]: each block's own tensor
        # each block's P·V with its sum of probabilities as one more column: the accumulator and the denominator are
        # rescaled and added to in the same two operations, [b, h, blocks, rows, d + 1]
        added = torch.cat([block_pv(p.transpose(2, 3), start, stop), p.sum(dim=-1).transpose(2, 3)[..., None]], dim=-1)
        total = acc_denom[:, :, rq]
        for j in range(added.shape[2]):  # the kernel's order: rescale, then add, one block after the other
            # each block's rescale from its own contiguous [b, h, rows] tensor, as in the loop: torch's CPU exp2 rounds
            # the last bit differently in its vector and scalar loops, which a tensor's length and layout select
            # (measured: 242 of 4,096 values)
            total = total * torch.exp2(log2_alpha[j])[..., None] + added[:, :, j]
        acc_denom[:, :, rq], m[:, :, rq] = total, m_after[..., -1:]
    if with_max:
        return acc_denom[..., :d], acc_denom[..., d:], m
    return acc_denom[..., :d], acc_denom[..., d:]
