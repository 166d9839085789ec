"""The emulation of SageAttention 2's Hopper kernel (``sage2-fp8-emulated``), checked step by step against independent
re-derivations of thu-ml/SageAttention's code (d1a57a5), against float64, and against deliberately wrong variants of
its own arithmetic that a kernel with the same defect would show in 08."""

from __future__ import annotations

import pytest
import torch

from sagecheck import attention
from sagecheck.attention import sage2_fp8_emulated as E
from sagecheck.attention.baseline import expand_kv, reference
from sagecheck.metrics.drift import error_stats
from sagecheck.metrics.kernel import Shape, make_inputs


def _program_id_groups(n: int, blk: int, per_block: int, rows_of) -> list[int]:
    """Each token's scale index as the Triton quant kernels assign it: program ``pid`` covers the rows ``rows_of``
    gives for its block ``pid // per_block`` and lane ``pid % per_block`` and stores its scale at index ``pid``."""
    group = [-1] * n
    for pid in range(-(-n // blk) * per_block):
        for row in rows_of(pid // per_block, pid % per_block):
            if row < n:
                group[row] = pid
    return group


def test_token_groups_are_the_quant_kernels_program_ids():
    n = 300  # not a multiple of any block
    # quant_query_per_thread_int8_kernel, BLK = WARPQ = 16: offs_n = off_blk * 16 + arange(0, 2) * 8 + off_tld
    q = _program_id_groups(n, 16, 8, lambda blk, tld: [blk * 16 + i * 8 + tld for i in range(2)])
    # quant_key_per_thread_int8_kernel, BLK = WARPK = 128: rows off_blk * 128 + i * 8 + off_tld * 2 (+ 1)
    k = _program_id_groups(n, 128, 4, lambda blk, tld: [blk * 128 + i * 8 + tld * 2 + j for i in range(16) for j in (0, 1)])
    assert E.query_groups(n).tolist() == q and E.key_groups(n).tolist() == k
    assert -1 not in q and -1 not in k


def test_per_group_quantization_against_a_loop():
    x = torch.randn(1, 2, 40, 8) * torch.linspace(0.1, 5, 40)[None, None, :, None]
    groups = E.query_groups(40)
    got, token_scale = E.quantize_per_group(x, groups)
    for h in range(2):
        for g in groups.unique().tolist():
            rows = (groups == g).nonzero().flatten()
            scale = float(x[0, h, rows].abs().max()) / 127 + 1e-7
            assert token_scale[0, h, rows].tolist() == pytest.approx([scale] * len(rows), rel=1e-6)
            for r in rows.tolist():
                for c in range(8):
                    v = float(x[0, h, r, c]) / scale
                    assert got[0, h, r, c] == int(v + (0.5 if v >= 0 else -0.5))  # round half away, then truncate
    assert got.abs().max() <= 127


def test_fp8_conversion_rounds_to_nearest_and_saturates():
    values = torch.tensor([448.0, 500.0, 0.3, 2**-10, 2**-9, -1000.0, 1.0625, 1.1875])
    assert E.to_e4m3(values).tolist() == [448.0, 448.0, 0.3125, 0.0, 2**-9, -448.0, 1.0, 1.25]  # ties to even


def _dense_scheme(q, k, v, scale=None):
    """The same arithmetic for one key block (n_k <= 128), written out without the online softmax: smoothing, per-group
    INT8, FP8 probabilities under the 448 offset, FP8 V per channel."""
    d = q.shape[-1]
    k = k - k.mean(dim=2, keepdim=True)
    qi, qs = E.quantize_per_group(q.float(), E.query_groups(q.shape[2]))
    ki, ks = E.quantize_per_group(k.float(), E.key_groups(k.shape[2]))
    h = q.shape[1]
    ki, ks = expand_kv(ki, h), expand_kv(ks, h)
    s = (qi @ ki.transpose(-1, -2)) * (torch.tensor((scale or d**-0.5) * E.LOG2E) * (qs[..., :, None] * ks[..., None, :]))
    p = torch.exp2(s - (s.amax(-1, keepdim=True) - E.S_FP8_OFFSET))
    vmax = v.float().abs().amax(dim=2, keepdim=True)
    v8 = expand_kv(E.to_e4m3(v.float() * (448.0 / vmax)), h)
    return (E.to_e4m3(p) @ v8) / p.sum(-1, keepdim=True) * expand_kv(vmax / 448.0, h)


def test_one_key_block_equals_the_scheme_written_out():
    q, k, v = make_inputs(Shape(2, 4, 2, 100, 100, 64, False, "float16"), torch.device("cpu"), 3)
    got = E.sage2_fp8_emulated(q, k, v).float()
    want = _dense_scheme(q, k, v).float()
    assert error_stats(want, got)["rel_l2"] < 1e-3  # measured 2.1e-4: the fp16 rounding of the output and the order of sums
    assert error_stats(reference(q, k, v), got)["rel_l2"] > 10 * error_stats(want, got)["rel_l2"]


@pytest.mark.parametrize("causal", [False, True])
def test_its_error_against_float64_is_the_kernels(causal):
    """On 08's inputs at d=128, 1024 tokens, the real kernel measured 0.036 (median over 08's shapes on an H200,
    2026-12-01; the design note's probe 0.037): the emulation lands there, about three times the error of 1.0.6's
    scheme (0.0125 measured, and its emulation here)."""
    q, k, v = make_inputs(Shape(1, 4, 2, 1024, 1024, 128, causal, "float16"), torch.device("cpu"), 0)
    ref = reference(q, k, v, causal=causal)
    sa2 = error_stats(ref, E.sage2_fp8_emulated(q, k, v, causal=causal))["rel_l2"]
    v1 = error_stats(ref, attention.get("sage-emulated")(q, k, v, causal=causal))["rel_l2"]
    assert 0.03 < sa2 < 0.045 and 2.5 < sa2 / v1 < 3.5, (sa2, v1)


def _wrong(monkeypatch, what: str) -> None:
    if what == "no 448 offset: probabilities in (0, 1], small ones flushed":
        monkeypatch.setattr(E, "S_FP8_OFFSET", 0.0)
    elif what == "one Q scale per 64-token block instead of per thread":
        monkeypatch.setattr(E, "query_groups", lambda n, device=None: torch.arange(n, device=device) // 64)
    elif what == "P and V in e5m2 instead of e4m3":
        monkeypatch.setattr(E, "to_e4m3", lambda x: x.clamp(-448, 448).to(torch.float8_e5m2).to(torch.float32))


@pytest.mark.parametrize("what", ["no 448 offset: probabilities in (0, 1], small ones flushed",
                                  "one Q scale per 64-token block instead of per thread", "P and V in e5m2 instead of e4m3"])
def test_a_kernel_with_another_arithmetic_is_flagged_by_08(monkeypatch, what):
    """08 flags a shape where the kernel and its emulation differ by more than kernel_vs_emulation_max (0.005): each
    of these departures from the kernel's arithmetic differs from the emulation by several times that."""
    from sagecheck.params import Params

    threshold = Params().kernel.kernel_vs_emulation_max
    q, k, v = make_inputs(Shape(1, 4, 2, 512, 512, 128, False, "float16"), torch.device("cpu"), 1)
    right = E.sage2_fp8_emulated(q, k, v)
    _wrong(monkeypatch, what)
    assert error_stats(right, E.sage2_fp8_emulated(q, k, v))["rel_l2"] > 4 * threshold


def test_masks_grouped_heads_and_the_callers_tensors():
    q, k, v = make_inputs(Shape(1, 8, 2, 200, 200, 64, True, "bfloat16"), torch.device("cpu"), 5)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    causal = E.sage2_fp8_emulated(q, k, v, causal=True)
    keep = torch.ones(200, 200, dtype=torch.bool).tril()
    assert torch.equal(causal, E.sage2_fp8_emulated(q, k, v, mask=keep))
    assert causal.dtype == torch.bfloat16 and torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    # a query shorter than the keys sits bottom-right (measured: 0.037 from float64 aligned so, 0.99 from top-left)
    tail = E.sage2_fp8_emulated(q[:, :, -16:], k, v, causal=True)
    assert error_stats(reference(q[:, :, -16:], k, v, causal=True), tail)["rel_l2"] < 0.05
    top_left = reference(q[:, :, -16:], k, v, mask=torch.ones(16, 200, dtype=torch.bool).tril())
    assert error_stats(top_left, tail)["rel_l2"] > 0.5
    # 130 keys: the two past the first 128-key block take part, and no padding enters the softmax (measured: 0.038
    # from float64; with 126 zero keys in the softmax, as 1.0.6's non-causal kernel pads, 0.52)
    n = 130
    full = E.sage2_fp8_emulated(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    assert error_stats(reference(q[:, :, :n], k[:, :, :n], v[:, :, :n]), full)["rel_l2"] < 0.05


def test_it_is_a_candidate_like_the_others():
    assert "sage2-fp8-emulated" in attention.names() and not attention.is_baseline("sage2-fp8-emulated")
    assert "sageattn_qk_int8_pv_fp8_cuda_sm90" in attention.info("sage2_fp8_emulated")["variant"]
