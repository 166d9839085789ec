"""Attention implementations on the CPU: the emulation's error band, GQA, causal, decode, determinism."""

from __future__ import annotations

import pytest
import torch

from sagecheck import attention
from sagecheck.attention.baseline import reference
from sagecheck.attention.sage_emulated import BLOCK_K, BLOCK_Q, quantize_per_block


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(b=1, h=8, hk=2, nq=256, nk=256, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, hk, nk, d, generator=g) + torch.randn(1, hk, 1, d, generator=g)
    v = torch.randn(b, hk, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_emulation_error_band_and_sdpa_far_below(dtype, causal):
    q, k, v = inputs(nq=300, nk=300, dtype=dtype)
    ref = reference(q, k, v, causal=causal)
    emu = rel(attention.get("sage-emulated")(q, k, v, causal=causal), ref)
    assert 3e-3 < emu < 3e-2, emu  # around 1e-2: INT8 Q, K per block and fp16 P
    sdpa32 = rel(attention.get("sdpa")(q.float(), k.float(), v.float(), causal=causal), ref)
    assert sdpa32 < 1e-5
    assert sdpa32 < emu / 1000


@pytest.mark.parametrize("shape", [
    dict(h=8, hk=2, nq=200, nk=200),  # GQA, prefill
    dict(h=8, hk=8, nq=1, nk=333),  # decode: one query over a cache
    dict(h=8, hk=2, nq=7, nk=150),  # a chunk of queries over a longer cache
    dict(h=4, hk=1, nq=17, nk=17, d=128),
])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_causal_decode_agree_with_sdpa(shape, causal):
    q, k, v = inputs(**shape)
    base = attention.get("sdpa")(q, k, v, causal=causal)
    ref = reference(q, k, v, causal=causal)
    assert rel(base, ref) < 1e-5
    assert rel(attention.get("eager")(q, k, v, causal=causal), ref) < 1e-5
    assert rel(attention.get("sage-emulated")(q, k, v, causal=causal), base) < 3e-2


def test_bottom_right_causal_alignment():
    q, k, v = inputs(h=2, hk=2, nq=3, nk=10)
    out = attention.get("sdpa")(q, k, v, causal=True)
    # the last query sees every key: the same as non-causal for that row
    full = attention.get("sdpa")(q[:, :, -1:], k, v, causal=False)
    torch.testing.assert_close(out[:, :, -1:], full)
    # the first query (position 7) must not see keys 8 and 9
    trunc = attention.get("sdpa")(q[:, :, :1], k[:, :, :8], v[:, :, :8], causal=False)
    torch.testing.assert_close(out[:, :, :1], trunc)


def test_emulation_is_deterministic_and_leaves_inputs_alone():
    q, k, v = inputs(nq=130, nk=130, dtype=torch.float16)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    a = attention.get("sage-emulated")(q, k, v, causal=True)
    b = attention.get("sage-emulated")(q, k, v, causal=True)
    assert torch.equal(a, b)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_keys_past_the_end_never_take_part():
    """With n_k not a multiple of the 64-key block, the error stays in the band (the kernel's padding leak is not emulated)."""
    q, k, v = inputs(nq=1, nk=65, h=4, hk=4)
    err = rel(attention.get("sage-emulated")(q, k, v), reference(q, k, v))
    assert err < 3e-2
    # an explicit mask that removes the last key equals attention over 64 keys, up to rounding
    keep = torch.ones(1, 1, 1, 65, dtype=torch.bool)
    keep[..., -1] = False
    masked = attention.get("sdpa")(q, k, v, mask=keep)
    torch.testing.assert_close(masked, attention.get("sdpa")(q, k[:, :, :64], v[:, :, :64]))


def test_quantization_mirrors_the_kernel():
    x = torch.tensor([[[[0.5, -0.5, 1.0, -127.0], [63.25, 0.0, -0.25, 2.0]]]])
    qi, scale = quantize_per_block(x, block=2)
    assert scale.shape == (1, 1, 1)
    assert float(scale) == pytest.approx(1.0)
    # round half away from zero, then truncation: 0.5 -> 1, -0.5 -> -1, -0.25 -> 0
    assert qi.flatten().tolist() == [1.0, -1.0, 1.0, -127.0, 63.0, 0.0, 0.0, 2.0]
    y = torch.randn(1, 2, 300, 64)
    qi, scale = quantize_per_block(y, BLOCK_Q)
    assert scale.shape == (1, 2, 3)  # ceil(300 / 128) blocks, the last one partial
    assert qi.abs().max() <= 127 and torch.equal(qi, qi.round())
    assert BLOCK_K == 64


def test_sage_without_cuda_names_the_cpu_alternative():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(attention.AttentionUnavailable, match="sage-emulated"):
        attention.get("sage")
    ok, why = attention.available("sage")
    assert not ok and "sage-emulated" in why


def test_unknown_implementation():
    with pytest.raises(KeyError, match="Unknown attention implementation .flash9.. Available: sdpa, eager, sage"):
        attention.get("flash9")


def test_noisy_control_is_wrong_by_design():
    q, k, v = inputs()
    err = rel(attention.get("sdpa-noisy")(q, k, v), attention.get("sdpa")(q, k, v))
    assert 0.1 < err < 0.3


def test_causal_emulation_skips_only_rows_the_block_cannot_change():
    """Causal blocks skip the query rows before their first key; the same attention with the causal mask given as an
    explicit keep-mask (nothing skipped) is identical to the bit."""
    from sagecheck.attention.baseline import causal_keep_mask

    torch.manual_seed(3)
    for n_q, n_k in ((300, 300), (128, 1000), (17, 17)):
        q, k, v = torch.randn(1, 4, n_q, 64), torch.randn(1, 2, n_k, 64) + 1, torch.randn(1, 2, n_k, 64)
        skipped = attention.get("sage-emulated")(q, k, v, causal=True)
        full = attention.get("sage-emulated")(q, k, v, mask=causal_keep_mask(n_q, n_k, q.device))
        assert torch.equal(skipped, full)


def block_by_block(scores, block_pv, shape, n_k, block, *, causal, mask, device, max_offset=0.0, with_max=False):
    """The kernel's loop as written: one key block after the other; causal blocks skip the query rows before their first
    key (which they cannot change)."""
    b, h, n_q, d = shape
    positions = torch.arange(n_q)[:, None] + (n_k - n_q)
    m = torch.full((b, h, n_q, 1), float("-inf"))
    denom, acc = torch.zeros(b, h, n_q, 1), torch.zeros(b, h, n_q, d)
    for start in range(0, n_k, block):
        stop = min(n_k, start + block)
        rq = slice(max(0, start - (n_k - n_q)) if causal else 0, n_q)
        s = scores(rq, start, stop)
        keep = torch.arange(start, stop)[None, :] <= positions[rq] if causal else torch.ones(1, stop - start, dtype=torch.bool)
        if mask is not None:
            keep = keep & (mask[..., rq, start:stop] if mask.shape[-2] == n_q else mask[..., start:stop])
        s = s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m[:, :, rq], s.amax(dim=-1, keepdim=True) - max_offset)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp2(s - m_safe)
        m_old = m[:, :, rq]
        alpha = torch.exp2(torch.where(torch.isfinite(m_old), m_old - m_safe, torch.full_like(m_old, float("-inf"))))
        denom[:, :, rq] = denom[:, :, rq] * alpha + p.sum(dim=-1, keepdim=True)
        acc[:, :, rq] = acc[:, :, rq] * alpha + block_pv(p[:, :, None], start, stop)[:, :, 0]
        m[:, :, rq] = m_new
    return (acc, denom, m) if with_max else (acc, denom)


@pytest.mark.parametrize("segment_elements", [0, None])  # one block at a time; the default (decode steps: several)
@pytest.mark.parametrize("name", ["sage-emulated", "sage2-fp8-emulated"])
def test_online_softmax_is_the_block_loop_to_the_bit(monkeypatch, name, segment_elements):
    """The emulations' online softmax (several blocks per segment, causal rows skipped) gives what the plain block loop
    gives, bit for bit: decode steps, prefills, a chunk over a longer cache, partial last blocks, a boolean mask, GQA."""
    import importlib

    from sagecheck.attention import blockwise

    module = importlib.import_module(attention.ATTENTION.entry(name).target.partition(":")[0])
    if segment_elements is not None:
        monkeypatch.setattr(blockwise, "SEGMENT_ELEMENTS", segment_elements)
    compared = []

    def both(*args, **kwargs):
        fast = blockwise.online_softmax(*args, **kwargs)
        plain = block_by_block(*args, **kwargs)
        compared.append(all(torch.equal(x, y) for x, y in zip(fast, plain)))
        return fast

    monkeypatch.setattr(module, "online_softmax", both)
    g = torch.Generator().manual_seed(5)
    fn = attention.get(name)
    for b, nq, nk, causal in ((1, 1, 2000, False), (3, 1, 128, False), (4, 1, 128, False), (4, 1, 1000, False), (1, 300, 300, True), (2, 128, 1000, True), (1, 200, 200, False)):
        q, k, v = (torch.randn(b, hh, n, 64, generator=g).half() for hh, n in ((8, nq), (2, nk), (2, nk)))
        fn(q, k, v, causal=causal)
    mask = torch.rand(40, 130, generator=g) > 0.3
    mask[3] = False
    q, k, v = (torch.randn(2, 8, n, 64, generator=g).half() for n in (40, 130, 130))
    fn(q, k, v, mask=mask)
    assert compared and all(compared), compared


def test_the_fp8_kv_control_rounds_keys_and_values_as_an_e4m3_cache_holds_them():
    """e4m3 keeps 3 mantissa bits and saturates at 448 (a unit scale, as SGLang stores a cache without checkpoint
    scales): written out by hand, not by the cast under test."""
    from sagecheck.attention.baseline import kv_rounded, sdpa_fp8_kv

    x = torch.tensor([1.0, 1.0625, 1.07, 3.3, -0.0209, 300.0, 500.0, -1e4])
    assert kv_rounded(x).tolist() == [1.0, 1.0, 1.125, 3.25, -11 * 2**-9, 288.0, 448.0, -448.0]  # 0.0209: steps of 2**-9
    q, k, v = (torch.randn(1, 4, 9, 16) for _ in range(3))
    out = sdpa_fp8_kv(q, k[:, :2], v[:, :2], causal=True)
    assert torch.equal(out, attention.get("sdpa")(q, kv_rounded(k[:, :2]), kv_rounded(v[:, :2]), causal=True))
    assert not torch.equal(out, attention.get("sdpa")(q, k[:, :2], v[:, :2], causal=True))
