"""SageAttention v1's arithmetic in plain torch (CPU or GPU).

This mirrors what ``sageattention==1.0.6`` does for head dims 64 and 128, step by
step, so that the report can tell "the quantization scheme loses accuracy" (the
emulation shows it too) from "the kernel is wrong" (only the kernel shows it).
Each step names the file of the 1.0.6 wheel it reproduces:

1. ``core.py``: K is smoothed, ``k -= k.mean(dim=seq)``, in K's own dtype (we subtract
   out of place: the caller's K is never changed). V is cast to fp16 when it is
   bf16 or fp32.
2. ``quant_per_block.py``: Q is scaled by ``sm_scale * 1.44269504`` (log2(e), so that
   the softmax can use exp2) in fp32; Q is quantized per block of 128 tokens, K per
   block of 64 tokens, each block with one scale ``max|x| / 127``; a value becomes
   ``int8(x / scale + 0.5 * sign(x))`` (round half away from zero, then truncation by
   the int8 conversion). The last, partial block takes its maximum over the real
   tokens only (masked loads).
3. ``attn_qk_int8_per_block.py`` / ``attn_qk_int8_per_block_causal.py``: the scores of
   a 64-key block are ``(Q_int8 · K_int8^T) * q_scale * k_scale`` in fp32 (the integer
   dot product is exact); an online softmax over key blocks with exp2, a running
   maximum ``m`` and sum ``l`` (``l`` sums the fp32 probabilities); the probabilities
   are rounded to fp16 and multiplied with the fp16 V of the block; the block's
   P·V result is rounded to fp16 (``tl.dot(p, v, out_dtype=tl.float16)``) before it
   is added to the fp32 accumulator; the output is ``acc / l`` in the input dtype.

Where the emulation deliberately differs from the kernel:

* Exact masking: keys past the sequence end never take part. The non-causal 1.0.6
  kernel loads the missing keys of a last, partial 64-key block as zeros, so each
  of them enters the softmax denominator with score 0 (their V is zero). When the
  number of keys is not a multiple of 64, the kernel's output is scaled down by
  ``sum(exp(s)) / (sum(exp(s)) + n_pad * exp(0))``; the emulation has no such term.
  The causal kernel masks those keys and is exact.
* Inside one 64-key block, the kernel's tensor cores accumulate P·V in fp16; the
  emulation accumulates in fp32 and rounds the block's result to fp16 once.
* A block whose values are all zero has scale 0; the kernel then divides 0 by 0.
  The emulation quantizes such a block to zeros.

Bottom-right causal masking with a query shorter than the keys and arbitrary
boolean masks are supported here (the kernel supports neither); they follow the
same arithmetic with the masked scores excluded.
"""

from __future__ import annotations

import torch

from sagecheck import census
from sagecheck.attention.baseline import check_shapes, expand_kv
from sagecheck.attention.blockwise import online_softmax

EMULATED_VERSION = "1.0.6"
CENSUS_KERNEL = "sageattn_varlen / _attn_fwd (1.0.6 Triton, emulated)"
BLOCK_Q = 128  # quant_per_block.py: BLKQ
BLOCK_K = 64  # quant_per_block.py: BLKK; attn kernels: BLOCK_N
LOG2E = 1.44269504  # quant_per_block.py: sm_scale * 1.44269504


def quantize_per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric INT8 quantization along the sequence (quant_per_block.py).

    ``x``: ``[b, h, n, d]`` float32 (already scaled). Returns the int8 values (held in
    float32, exact integers) and the scales ``[b, h, ceil(n / block)]``.
    """
    b, h, n, d = x.shape
    n_blocks = -(-n // block)
    token_max = x.abs().amax(dim=-1)  # the block maxima from the tokens' (exact): no padded copy of x
    pad = n_blocks * block - n
    token_max = torch.nn.functional.pad(token_max, (0, pad)) if pad else token_max
    scale = token_max.reshape(b, h, n_blocks, block).amax(dim=-1) / 127.0
    token_scale = per_token(scale, block, n)[..., None]
    q = x / torch.where(token_scale > 0, token_scale, torch.ones_like(token_scale))
    q = torch.trunc(q + torch.where(q >= 0, 0.5, -0.5)).clamp_(-127, 127)
    if bool((scale == 0).any()):  # an all-zero block: zeros (the kernel would divide 0 by 0)
        q = torch.where(token_scale > 0, q, torch.zeros_like(q))
    return q, scale


def per_token(block_values: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """``[b, h, blocks]`` -> ``[b, h, n]``: each token's value of its block."""
    return block_values.repeat_interleave(block, dim=2)[:, :, :n]


def sage_emulated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    smooth_k: bool = True,
) -> torch.Tensor:
    """SageAttention v1 (per-block INT8 Q·K^T, fp16 P·V) in plain torch; see the module docstring."""
    b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
    census.record_attention("sageattn", CENSUS_KERNEL, "sagecheck.attention.sage_emulated:sage_emulated", q, k,
                            causal=causal, scale=scale)
    out_dtype = q.dtype
    sm_scale = d**-0.5 if scale is None else scale

    if smooth_k:  # core.py: km = k.mean(dim=seq_dim, keepdim=True); k -= km (here out of place)
        k = k - k.mean(dim=2, keepdim=True)
    v16 = v.to(torch.float16)  # core.py: bf16/fp32 V -> fp16

    q_scaled = q.float() * torch.tensor(sm_scale * LOG2E, dtype=torch.float32)
    q_int, q_scale = quantize_per_block(q_scaled, BLOCK_Q)
    k_int, k_scale = quantize_per_block(k.float(), BLOCK_K)

    # one scale per query row (its 128-token block) and per key block; kv heads shared by their query group
    q_scale_rows = per_token(q_scale, BLOCK_Q, n_q)[..., None]
    k_int, v16 = expand_kv(k_int, h), expand_kv(v16, h)
    k_scale_keys = per_token(expand_kv(k_scale, h), BLOCK_K, n_k)[:, :, None]  # each key's block scale

    def scores(rows: slice, start: int, stop: int) -> torch.Tensor:
        s = torch.matmul(q_int[:, :, rows], k_int[:, :, start:stop].transpose(-1, -2))  # exact: |sum| < 2**24
        return s * q_scale_rows[:, :, rows] * k_scale_keys[..., start:stop]

    def block_pv(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:  # P in fp16; each block's product in fp16
        blocks, length = p.shape[2], p.shape[-1]
        v_blocks = v16[:, :, start:stop].float().reshape(b, h, blocks, length, d)
        return torch.matmul(p.to(torch.float16).float(), v_blocks).to(torch.float16).float()

    acc, l = online_softmax(scores, block_pv, (b, h, n_q, d), n_k, BLOCK_K, causal=causal, mask=mask, device=q.device)
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(out_dtype)
