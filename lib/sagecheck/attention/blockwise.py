"""The online softmax over key blocks that SageAttention's kernels run, shared by the emulations.

Each emulation supplies what differs between kernels: the block's scores (dequantized, in log2 units, as the
kernel computes them) and the block's P·V (with the kernel's rounding of P and of the product); this module does
what they share: the causal rows a block can skip, the block's part of the causal and boolean masks, the running
maximum (optionally offset, as SageAttention 2 lowers it by log2 448 to fill FP8's range), the rescaling of the
denominator and the accumulator.
"""

from __future__ import annotations

from typing import Callable

import torch

# scores(rows, start, stop): the scores of the query rows ``rows`` against keys start..stop, [b, h, len(rows), stop - start]
ScoresFn = Callable[[slice, int, int], torch.Tensor]
# block_pv(p, start, stop): the block's P·V [b, h, rows, d] from its probabilities p [b, h, rows, stop - start]
BlockPVFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def online_softmax(scores: ScoresFn, block_pv: BlockPVFn, shape: tuple[int, int, int, int], n_k: int, block: int, *,
                   causal: bool, mask: torch.Tensor | None, device: torch.device,
                   max_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(accumulator [b, h, n_q, d], denominator [b, h, n_q, 1]) in float32 after every key block; the output is
    their quotient (and whatever scale the kernel applies after it). ``shape`` is (b, h, n_q, d); causal masking
    is bottom-right aligned (query i sits at position n_k - n_q + i); ``mask`` is a boolean keep-mask over
    [n_q, n_k] or over the keys only."""
    b, h, n_q, d = shape
    rows = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    m = torch.full((b, h, n_q, 1), float("-inf"), dtype=torch.float32, device=device)
    denom = torch.zeros((b, h, n_q, 1), dtype=torch.float32, device=device)
    acc = torch.zeros((b, h, n_q, d), dtype=torch.float32, device=device)
    for start in range(0, n_k, block):
        stop = min(n_k, start + block)
        # causal: the query rows before the block's first key see none of it; for them the block changes nothing
        # (score -inf: m, denom and acc stay as they are, exactly), so only the rows from r0 on are computed
        r0 = max(0, start - (n_k - n_q)) if causal else 0
        if r0 >= n_q:
            break
        rq = slice(r0, n_q)
        s = scores(rq, start, stop)
        if causal or mask is not None:  # masks built per key block: a full n_q x n_k mask would not fit at 32k
            keep = torch.arange(start, stop, device=device)[None, :] <= rows[rq] if causal else None
            if mask is not None:
                block_mask = mask[..., rq, start:stop] if mask.shape[-2] == n_q else mask[..., start:stop]
                keep = block_mask if keep is None else (block_mask & keep)
            s = s.masked_fill(~keep, float("-inf"))
        m_old = m[:, :, rq]
        m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True) - max_offset)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp2(s - m_safe)
        alpha = torch.exp2(torch.where(torch.isfinite(m_old), m_old - m_safe, torch.full_like(m_old, float("-inf"))))
        denom[:, :, rq] = denom[:, :, rq] * alpha + p.sum(dim=-1, keepdim=True)
        acc[:, :, rq] = acc[:, :, rq] * alpha + block_pv(p, start, stop)
        m[:, :, rq] = m_new
    return acc, denom
