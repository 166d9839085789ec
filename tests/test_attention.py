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
