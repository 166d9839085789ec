"""The baseline implementations (``sdpa``, ``eager``), the fp64 reference and shared shape logic."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[int, int, int, int, int, int]:
    """Validate ``[batch, heads, seq, dim]`` inputs; returns (b, h, h_kv, n_q, n_k, d)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n_q, d = q.shape
    bk, h_kv, n_k, dk = k.shape
    if k.shape != v.shape or bk != b or dk != d:
        raise ValueError(f"k and v must be [{b}, h_kv, n_k, {d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if causal and n_q > n_k:
        raise ValueError(f"causal attention needs n_q <= n_k; got n_q={n_q}, n_k={n_k}")
    return b, h, h_kv, n_q, n_k, d


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each kv head for its group of query heads."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_keep_mask(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal keep-mask ``[n_q, n_k]``: query i sits at position n_k - n_q + i."""
    rows = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    cols = torch.arange(n_k, device=device)[None, :]
    return cols <= rows


def keep_mask(n_q: int, n_k: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The combined boolean keep-mask, or None when every key takes part."""
    keep = causal_keep_mask(n_q, n_k, device) if causal else None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = attend); got {mask.dtype}")
        keep = mask if keep is None else (mask & keep)
    return keep


def sdpa(q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention, with bottom-right causal alignment and GQA."""
    b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
    k, v = expand_kv(k, h), expand_kv(v, h)
    if mask is None and (not causal or n_q == n_k):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and n_q > 1, scale=scale)
    keep = keep_mask(n_q, n_k, causal, mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return _zero_empty_rows(out, keep)


def _zero_empty_rows(out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Rows that attend to no key (left padding) give 0, not NaN."""
    if keep is None:
        return out
    empty = ~keep.any(dim=-1, keepdim=True)
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


def eager(q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit attention: QK^T in the input dtype, softmax in float32, PV in the input dtype."""
    b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
    scale = d**-0.5 if scale is None else scale
    k, v = expand_kv(k, h), expand_kv(v, h)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = keep_mask(n_q, n_k, causal, mask, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    if keep is not None:
        probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs.to(q.dtype), v)


def reference(
    q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64, block: int = 1024,
) -> torch.Tensor:
    """Attention in ``dtype`` (fp64 by default), computed in query blocks to bound memory. Returns ``dtype``."""
    b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
    scale = d**-0.5 if scale is None else scale
    k = expand_kv(k, h).to(dtype)
    v = expand_kv(v, h).to(dtype)
    out = torch.empty((b, h, n_q, d), dtype=dtype, device=q.device)
    full = keep_mask(n_q, n_k, causal, mask, q.device)
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        scores = torch.matmul(q[:, :, start:stop].to(dtype), k.transpose(-1, -2)) * scale
        if full is not None:
            keep = full[..., start:stop, :]
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        out[:, :, start:stop] = torch.matmul(probs, v)
    return out


NOISE_RELATIVE = 0.2
_noise_calls = 0


def sdpa_noisy(q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A deliberately wrong candidate: sdpa plus Gaussian noise of NOISE_RELATIVE x the output's RMS.

    The report's negative control: every accuracy verdict must fail on it. The noise is
    seeded by the call count, so a run gives the same numbers twice.
    """
    global _noise_calls
    out = sdpa(q, k, v, causal=causal, scale=scale, mask=mask)
    gen = torch.Generator(device=out.device).manual_seed(1_000_003 + _noise_calls)
    _noise_calls += 1
    noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
    rms = out.float().pow(2).mean().sqrt()
    return (out.float() + NOISE_RELATIVE * rms * noise).to(out.dtype)


KV_CACHE_DTYPE = torch.float8_e4m3fn


def kv_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an FP8 (e4m3) KV cache holds it and gives it back: cast to e4m3 with a unit scale (values beyond ±448
    saturate), then back to ``x``'s dtype. SGLang's ``--kv-cache-dtype fp8_e4m3`` stores keys and values so without a
    checkpoint's scales (``MHATokenToKVPool.set_kv_buffer``)."""
    return x.to(KV_CACHE_DTYPE).to(x.dtype)


def sdpa_fp8_kv(q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The accepted-precision control: sdpa over keys and values rounded to e4m3, as every decode step over an FP8 KV
    cache reads them. Deployments run with this precision, so what it loses against the baseline on a model is a loss
    users already accept; an 8-bit attention backend is held to lose no more."""
    return sdpa(q, kv_rounded(k), kv_rounded(v), causal=causal, scale=scale, mask=mask)


def flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool) -> float:
    """FLOPs of one attention call: 4·b·h·n_q·n_k·d (two matmuls), halved when causal."""
    f = 4.0 * batch * heads * n_q * n_k * head_dim
    return f / 2 if causal else f
