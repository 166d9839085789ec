"""SageAttention 2's Hopper kernel, ``sageattn_qk_int8_pv_fp8_cuda_sm90``, in plain torch (CPU or GPU).

This is what ``sageattn`` of SageAttention 2 runs on an H100 or H200 (00's dispatch probe on an H200:
``per_thread_int8_triton``, ``per_channel_fp8``, then the kernel with ``pv_accum_dtype="fp32+fp32"``).
Each step names the file of thu-ml/SageAttention (commit d1a57a5) it reproduces:

1. ``core.py``: K is smoothed, ``km = k.mean(dim=seq)``, ``k - km``, both in K's dtype. Head dims
   below 64 or between 64 and 128 are zero-padded, which changes no dot product and no scale
   (not done here). The kernel takes fp16 or bf16; other inputs are taken as fp16 here.
2. ``triton/quant_per_thread.py`` (``per_thread_int8`` with BLKQ=64, WARPQ=16, BLKK=128,
   WARPK=128): Q and K are quantized to INT8 with one scale per group of tokens that one
   thread of the tensor-core tile holds. Q: in every 16-token tile, the tokens with the same
   index mod 8 (2 tokens a group). K: in every 128-token block, the tokens whose index mod 8
   is 2t or 2t+1 (32 tokens a group). ``scale = max|x| / 127 + 1e-7``; a value becomes
   ``int8(x / scale + 0.5 * sign(x))``. Q is not pre-scaled: ``sm_scale * log2(e)`` multiplies
   the dequantized scores.
3. ``quant.py`` ``per_channel_fp8`` and ``csrc/fused/fused.cu`` (``smooth_v=False``): V is padded
   with zero keys to a multiple of 128; per channel (head dim) ``scale = max|v| / 448``; the
   values ``v * (448 / max|v|)`` become FP8 e4m3 (round to nearest, saturating).
4. ``csrc/qattn/qk_int_sv_f8_cuda_sm90.cu`` with ``attn_utils.cuh``: per 128-key block, the
   scores are the exact INT32 dot products times ``sm_scale * log2(e) * q_scale * k_scale``;
   the running maximum is taken minus ``S_FP8_OFFSET = 8.807`` (log2 448), so that the
   probabilities ``P = exp2(s - m)`` fill (0, 448], the range of e4m3; the denominator sums P
   in fp32; P is converted to FP8 e4m3; the block's P·V is accumulated apart and then added
   to the fp32 accumulator ("fp32+fp32"); the output is ``acc / denominator * v_scale``,
   rounded to the input dtype. Keys past the sequence end are masked (score -5e6): padding
   takes no part, unlike the non-causal 1.0.6 kernel.

Where the emulation deliberately differs from the kernel:

* Hopper's FP8 tensor cores accumulate a 128-key block's P·V with fewer mantissa bits than
  fp32 (the reason for the kernel's second, fp32 accumulator); the emulation sums the block in
  fp32. Its ``exp2`` is exact where the kernel uses ``ex2.approx``; the scale factors are
  multiplied in one order for every block (the kernel's last block rounds in another).
* Bottom-right causal masking with a query shorter than the keys and boolean masks are
  supported here (the kernel's causal mask is top-left: it assumes as many queries as keys).
* A group or channel whose values are all zero has scale ``1e-7`` (Q, K: as the kernel) or
  gives zeros (V: the kernel divides by zero there).
"""

from __future__ import annotations

import torch

from sagecheck import census
from sagecheck.attention.baseline import check_shapes, expand_kv
from sagecheck.attention.blockwise import online_softmax

EMULATED_KERNEL = "sageattn_qk_int8_pv_fp8_cuda_sm90"
EMULATED_SOURCE = "thu-ml/SageAttention d1a57a5 (SageAttention 2.x)"
Q_TILE = 16  # WARPQ: a warp's rows of the query tile
Q_GROUPS_PER_TILE = 8  # quant_query_per_thread_int8_kernel: program_id % 8
K_BLOCK = 128  # BLKK = WARPK = CTA_K: keys per block of the kernel's loop
K_GROUPS_PER_BLOCK = 4  # quant_key_per_thread_int8_kernel: program_id % 4
FP8_MAX = 448.0  # e4m3's largest finite value
S_FP8_OFFSET = 8.807  # attn_utils.cuh: log2(448), subtracted from the running maximum
LOG2E = 1.44269504
SCALE_EPS = 1e-7  # quant_per_thread.py: max|x| / 127. + 0.0000001


def query_groups(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The scale group of each query token: ``(i // 16) * 8 + i % 8``."""
    i = torch.arange(n, device=device)
    return (i // Q_TILE) * Q_GROUPS_PER_TILE + i % Q_GROUPS_PER_TILE


def key_groups(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The scale group of each key token: ``(i // 128) * 4 + (i % 8) // 2``."""
    i = torch.arange(n, device=device)
    return (i // K_BLOCK) * K_GROUPS_PER_BLOCK + (i % 8) // 2


def quantize_per_group(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per token group (quant_per_thread.py). ``x``: ``[b, h, n, d]`` float32; ``groups``: ``[n]``.

    Returns the int8 values (held in float32, exact integers) and each token's scale ``[b, h, n]``.
    """
    b, h, n, _ = x.shape
    n_groups = int(groups.max()) + 1 if n else 0
    token_max = x.abs().amax(dim=-1)  # [b, h, n]
    group_max = torch.zeros(b, h, n_groups, dtype=x.dtype, device=x.device)
    group_max.scatter_reduce_(-1, groups.expand(b, h, n), token_max, reduce="amax", include_self=True)
    scale = group_max / 127.0 + SCALE_EPS
    token_scale = scale.gather(-1, groups.expand(b, h, n))
    q = x / token_scale[..., None]
    q = torch.trunc(q + 0.5 * torch.where(q >= 0, 1.0, -1.0))
    return q, token_scale


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 e4m3 as ``cvt.rn.satfinite`` does (nearest, ties to even; beyond ±448 saturated), back in float32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def quantize_v_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 V with one scale per channel (fused.cu, ``smooth_v=False``). ``v``: ``[b, h, n, d]`` in its dtype.

    Returns the e4m3 values (in float32) and the scales ``[b, h, 1, d]``. The zero keys the kernel pads V
    with change no maximum of absolute values, so none are added here.
    """
    x = v.float()
    amax = x.abs().amax(dim=2, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return to_e4m3(x * (FP8_MAX / safe)), amax / FP8_MAX


def sage2_fp8_emulated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    smooth_k: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SageAttention 2's sm90 kernel (per-thread INT8 Q·K^T, FP8 P·V) in plain torch; see the module docstring.

    ``return_lse``: also each row's log-sum-exp of its (smoothed, dequantized) scores in natural log units,
    ``[b, h, n_q]`` float32, as the kernel writes it (``log2(d) + m``, divided by log2(e) in ``core.py``)."""
    b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
    census.record_attention("sageattn", f"{EMULATED_KERNEL} (emulated)", "sagecheck.attention.sage2_fp8_emulated:sage2_fp8_emulated",
                            q, k, causal=causal, scale=scale)
    out_dtype = q.dtype
    kernel_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
    q, k, v = q.to(kernel_dtype), k.to(kernel_dtype), v.to(kernel_dtype)
    sm_scale = d**-0.5 if scale is None else scale

    if smooth_k:  # core.py: km = k.mean(dim=seq_dim, keepdim=True); quant: k = k - km (in K's dtype, out of place)
        k = k - k.mean(dim=2, keepdim=True)
    q_int, q_scale = quantize_per_group(q.float(), query_groups(n_q, q.device))
    k_int, k_scale = quantize_per_group(k.float(), key_groups(n_k, k.device))
    v8, v_scale = quantize_v_per_channel(v)
    k_int, k_scale, v8, v_scale = (expand_kv(x, h) for x in (k_int, k_scale, v8, v_scale))
    score_scale = torch.tensor(sm_scale * LOG2E, dtype=torch.float32)

    def scores(rows: slice, start: int, stop: int) -> torch.Tensor:
        s = torch.matmul(q_int[:, :, rows], k_int[:, :, start:stop].transpose(-1, -2))  # exact: |sum| < 2**24
        return s * (score_scale * (q_scale[:, :, rows, None] * k_scale[:, :, None, start:stop]))

    def block_pv(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:  # P in (0, 448], in e4m3; summed in fp32
        blocks, length = p.shape[2], p.shape[-1]
        return torch.matmul(to_e4m3(p), v8[:, :, start:stop].reshape(b, h, blocks, length, d))

    acc, denom, m = online_softmax(scores, block_pv, (b, h, n_q, d), n_k, K_BLOCK, causal=causal, mask=mask,
                                   device=q.device, max_offset=S_FP8_OFFSET, with_max=True)
    out = (acc / torch.where(denom > 0, denom, torch.ones_like(denom)) * v_scale).to(out_dtype)
    if return_lse:
        return out, ((m + torch.log2(denom)) / LOG2E)[..., 0]
    return out
