"""The sage_attn backend's plain-torch logic (packing, gathering, smoothing, the padding correction) on the CPU,
and the same functions with the real sageattention kernel where a GPU has it (``-m gpu``).

The CPU tests give ``varlen`` a reference kernel with sageattn_varlen's signature and its documented
semantics (top-left causal mask; the non-causal kernel's zero keys up to a multiple of 64 in the
softmax), and check the results against ``sagecheck.attention.baseline.sdpa`` with bottom-right causal
alignment, an independent computation of what each request's attention must be.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sagecheck.attention.baseline import sdpa
from sagecheck.attention.sage_emulated import sage_emulated
from sagecheck.sglang_plugin import batched as B
from sagecheck.sglang_plugin import varlen as V
from sagecheck.sglang_plugin.settings import SageAttnUnavailable, Settings
from sagecheck.sglang_plugin.stats import Stats, describe, expected_heads_per_rank, head_split, read


def reference_kernel(pad_block: int | None = None):
    """sageattn_varlen's contract in float64 (exact arithmetic), optionally with the non-causal kernel's padded keys."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, sm_scale=None, smooth_k=True):
        assert smooth_k is False, "the backend smooths K itself"
        out = torch.empty(q.shape, dtype=q.dtype)
        heads, kv_heads = q.shape[1], k.shape[1]
        for i in range(len(cu_q) - 1):
            qs = q[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)
            ks = k[cu_k[i]:cu_k[i + 1]].double().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            vs = v[cu_k[i]:cu_k[i + 1]].double().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            s = qs @ ks.transpose(-1, -2) * sm_scale
            if is_causal:
                assert qs.shape[1] == ks.shape[1], "the kernel's causal mask is top-left: as many queries as keys"
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            top = s.amax(-1, keepdim=True)
            p = torch.exp(s - top)
            denom = p.sum(-1, keepdim=True)
            if pad_block and not is_causal:
                denom = denom + (-ks.shape[1] % pad_block) * torch.exp(-top)  # zero keys: score 0, value 0
            out[cu_q[i]:cu_q[i + 1]] = ((p @ vs) / denom).transpose(0, 1).to(q.dtype)
        return out

    return kernel


def emulated_kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, sm_scale=None, smooth_k=True):
    """SageAttention 1.0.6's arithmetic (sagecheck's emulation) per sequence."""
    out = torch.empty(q.shape, dtype=q.dtype)
    for i in range(len(cu_q) - 1):
        sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        o = sage_emulated(q[sl_q].transpose(0, 1)[None], k[sl_k].transpose(0, 1)[None], v[sl_k].transpose(0, 1)[None],
                          causal=is_causal, scale=sm_scale, smooth_k=smooth_k)
        out[sl_q] = o[0].transpose(0, 1)
    return out


def request_attention(q, k, v, scale):
    """One request, bottom-right causal: [n_q, H, d] over [n_k, H_kv, d] (the independent reference)."""
    out = sdpa(q.transpose(0, 1)[None].double(), k.transpose(0, 1)[None].double(), v.transpose(0, 1)[None].double(),
               causal=True, scale=scale)
    return out[0].transpose(0, 1)


def request_references(q, k, v, kp, vp, prefix, extend, scale):
    """(rows of the request's new tokens, its exact attention over its prefix and new tokens), request after request."""
    qi = ki = 0
    for p, e in zip(prefix, extend):
        want = request_attention(q[qi:qi + e].cpu(), torch.cat([kp[ki:ki + p], k[qi:qi + e]]).cpu(),
                                 torch.cat([vp[ki:ki + p], v[qi:qi + e]]).cpu(), scale)
        yield slice(qi, qi + e), want
        qi, ki = qi + e, ki + p


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_batch(prefix_lens, extend_lens, heads=4, kv_heads=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_new, n_pre = sum(extend_lens), sum(prefix_lens)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    # keys with a common offset, as real keys have: smoothing must remove it
    return (rnd(n_new, heads, d), rnd(n_new, kv_heads, d) + 3, rnd(n_new, kv_heads, d),
            rnd(n_pre, kv_heads, d) + 3, rnd(n_pre, kv_heads, d))


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("prefix, extend", [([0, 0], [3, 5]), ([4, 0, 7], [2, 6, 1]), ([130], [1]), ([0], [1])])
def test_layout_places_prefix_then_new_tokens_per_request(prefix, extend):
    layout = V.ExtendLayout.build(prefix, extend)
    new_pos, prefix_pos, start = [], [], 0
    for p, e in zip(prefix, extend):  # the layout as a loop would write it
        prefix_pos += range(start, start + p)
        new_pos += range(start + p, start + p + e)
        start += p + e
    assert layout.new_pos.tolist() == new_pos and layout.prefix_pos.tolist() == prefix_pos
    assert layout.cu_seqlens.tolist() == [0, *torch.cumsum(torch.tensor(prefix) + torch.tensor(extend), 0).tolist()]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.has_prefix == any(prefix)
    assert layout.max_seqlen == max(p + e for p, e in zip(prefix, extend)) and layout.total == start


def test_layout_refuses_inconsistent_lengths():
    with pytest.raises(ValueError, match="one of each per request"):
        V.ExtendLayout.build([0, 1], [3])
    with pytest.raises(ValueError, match="extend >= 1"):
        V.ExtendLayout.build([5], [0])


def test_keys_are_smoothed_per_sequence_and_head_out_of_place():
    k = torch.randn(10, 2, 8) + torch.arange(2.0)[None, :, None] * 5
    before = k.clone()
    out = V.smooth_keys(k, [4, 6])
    assert torch.equal(k, before)
    for sl in (slice(0, 4), slice(4, 10)):
        assert torch.allclose(out[sl], before[sl] - before[sl].mean(0, keepdim=True), atol=1e-6)
        assert out[sl].mean(0).abs().max() < 1e-5
    # one request: its mean broadcast, bit for bit what the per-row gather gives, K's dtype kept
    one = (torch.randn(300, 2, 8) + 3).bfloat16()
    got = V.smooth_keys(one, [300])
    gathered = one - V.request_means([(one, torch.zeros(300, dtype=torch.long))], torch.tensor([300.0]))[torch.zeros(300, dtype=torch.long)]
    assert got.dtype == torch.bfloat16 and got.shape == one.shape and torch.equal(got, gathered)
    assert torch.equal(got, one - one.mean(0, keepdim=True))  # sageattention's own k.mean(dim=seq), then k - km


# ------------------------------------------------------------------ extend: prefixes handled exactly


@pytest.mark.parametrize("prefix, extend", [([0, 0, 0], [5, 17, 64]), ([9, 0, 70], [4, 12, 1]), ([200], [33])])
def test_extend_equals_each_requests_causal_attention_over_prefix_and_new_tokens(prefix, extend):
    q, k, v, kp, vp = make_batch(prefix, extend)
    layout = V.ExtendLayout.build(prefix, extend)
    inputs = [t.clone() for t in (q, k, v, kp, vp)]
    out = V.extend_attention(reference_kernel(), q, k, v, kp if any(prefix) else None, vp if any(prefix) else None, layout, 0.125)
    for t, t0 in zip((q, k, v, kp, vp), inputs):
        assert torch.equal(t, t0), "the backend changed its inputs (the prefix keys come from SGLang's KV cache)"
    for rows, want in request_references(q, k, v, kp, vp, prefix, extend, 0.125):
        assert torch.allclose(out[rows].double(), want, atol=1e-5), rows


def test_extend_with_a_prefix_is_not_the_attention_without_it():
    """The control: dropping the prefix (what a kernel fed only the new tokens computes) gives another answer."""
    q, k, v, kp, vp = make_batch([40], [8])
    with_prefix = V.extend_attention(reference_kernel(), q, k, v, kp, vp, V.ExtendLayout.build([40], [8]), 0.125)
    without = V.extend_attention(reference_kernel(), q, k, v, None, None, V.ExtendLayout.build([0], [8]), 0.125)
    assert rel_l2(with_prefix, without) > 0.1


def test_extend_refuses_missing_prefix_keys():
    q, k, v, kp, vp = make_batch([5], [3])
    with pytest.raises(ValueError, match="5 prefix keys expected"):
        V.extend_attention(reference_kernel(), q, k, v, kp[:2], vp[:2], V.ExtendLayout.build([5], [3]), 0.125)


def test_extend_through_the_emulated_kernel_stays_close_to_the_exact_attention():
    prefix, extend = [70, 0], [60, 150]
    q, k, v, kp, vp = make_batch(prefix, extend, dtype=torch.float16)
    layout = V.ExtendLayout.build(prefix, extend)
    sage = V.extend_attention(emulated_kernel, q, k, v, kp, vp, layout, 0.125)
    exact = V.extend_attention(reference_kernel(), q, k, v, kp, vp, layout, 0.125)
    assert 0 < rel_l2(sage, exact) < 0.03  # INT8 Q/K: close, never identical


# ------------------------------------------------------------------ extend on sageattn: batched, padded per group


def reference_batched_kernel(causal_mask: bool = True):
    """sageattn's contract in float64: NHD tensors ``[batch, tokens, heads, d]``, GQA, causal only with as many queries
    as keys. ``causal_mask=False`` is the control: a kernel that lets every row see every key (padding included)."""

    def kernel(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
        assert tensor_layout == "NHD" and smooth_k is False, "the backend passes NHD and smooths K itself"
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert not is_causal or q.shape[1] == k.shape[1], "sageattn's causal mask needs as many queries as keys"
        rep = q.shape[2] // k.shape[2]
        qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
        kd, vd = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)
        s = qd @ kd.transpose(-1, -2) * sm_scale
        if is_causal and causal_mask:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1).matmul(vd).transpose(1, 2).to(q.dtype)

    return kernel


def sage2_emulated_batched(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
    """SageAttention 2's sm90 arithmetic (sagecheck's emulation) behind sageattn's NHD signature."""
    from sagecheck.attention.sage2_fp8_emulated import sage2_fp8_emulated

    assert tensor_layout == "NHD"
    out = sage2_fp8_emulated(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal, scale=sm_scale,
                             smooth_k=smooth_k)
    return out.transpose(1, 2)


def batched_extend(kernel, q, k, v, kp, vp, layout, scale, max_padded_work=B.MAX_PADDED_WORK):
    groups = B.plan(layout.seq_lens, q.device, max_padded_work=max_padded_work)
    return V.extend_with(lambda qa, ka, va: B.causal_attention(kernel, qa, ka, va, layout.seq_lens, groups, scale),
                         q, k, v, kp if layout.has_prefix else None, vp if layout.has_prefix else None, layout)


@pytest.mark.parametrize("prefix, extend", [([0, 0, 0], [5, 17, 64]), ([9, 0, 70], [4, 12, 1]), ([200], [33]),
                                            ([0, 0, 0, 0], [16, 16, 16, 16]), ([3, 3], [40, 1])])
@pytest.mark.parametrize("max_padded_work", [B.MAX_PADDED_WORK, 100.0])  # grouped, and one call padded to the longest
def test_batched_extend_equals_each_requests_causal_attention(prefix, extend, max_padded_work):
    q, k, v, kp, vp = make_batch(prefix, extend)
    layout = V.ExtendLayout.build(prefix, extend)
    inputs = [t.clone() for t in (q, k, v, kp, vp)]
    out = batched_extend(reference_batched_kernel(), q, k, v, kp, vp, layout, 0.125, max_padded_work)
    for t, t0 in zip((q, k, v, kp, vp), inputs):
        assert torch.equal(t, t0), "the backend changed its inputs (the prefix keys come from SGLang's KV cache)"
    for rows, want in request_references(q, k, v, kp, vp, prefix, extend, 0.125):
        assert torch.allclose(out[rows].double(), want, atol=1e-5), rows


def test_batched_padding_would_show_where_a_row_could_see_it():
    """The control: the same padded call without the causal mask lets short requests' rows see padded keys (and later
    tokens), and the comparison above would fail."""
    prefix, extend = [0, 0], [40, 9]
    q, k, v, kp, vp = make_batch(prefix, extend)
    layout = V.ExtendLayout.build(prefix, extend)
    right = batched_extend(reference_batched_kernel(), q, k, v, kp, vp, layout, 0.125, 100.0)
    leaky = batched_extend(reference_batched_kernel(causal_mask=False), q, k, v, kp, vp, layout, 0.125, 100.0)
    assert (right - leaky).abs().max() > 0.1


def test_groups_bound_the_padded_work_and_cover_every_request_once():
    lens = [1000, 990, 700, 12, 10, 9, 1, 650]
    groups = B.group_by_length(lens)
    assert sorted(r for g in groups for r in g) == list(range(len(lens)))
    for g in groups:
        longest = max(lens[r] for r in g)
        assert len(g) * longest ** 2 <= (1 + B.MAX_PADDED_WORK) * sum(lens[r] ** 2 for r in g)
    # by hand: 3·1000² <= 1.25·(1000² + 990² + 700²), 4·1000² > 1.25·(... + 650²); 2·12² <= 1.25·(12² + 10²), 3·12² > ...
    assert groups == [[0, 1, 2], [7], [3, 4], [5], [6]]
    assert not any(0 in g and 3 in g for g in groups), "a 1000-token and a 12-token request share no call"
    assert B.group_by_length(lens, max_padded_work=1e9) == [list(range(len(lens)))]


def test_equal_lengths_run_as_one_call_on_views_without_padding():
    groups = B.plan([64, 64, 64])
    assert len(groups) == 1 and groups[0].packed_range == (0, 192) and groups[0].padded_tokens == 0
    mixed = B.plan([64, 50, 64])
    assert [(g.count, g.length, g.packed_range) for g in mixed] == [(3, 64, None)] and mixed[0].padded_tokens == 14
    assert B.describe_plan(mixed) == {"calls": 1, "padded_tokens": 14}
    with pytest.raises(ValueError, match="at least one token"):
        B.plan([5, 0])


def test_batched_extend_through_the_sage2_emulation_stays_close_to_the_exact_attention():
    prefix, extend = [70, 0, 0], [60, 150, 140]
    q, k, v, kp, vp = make_batch(prefix, extend, dtype=torch.float16)
    layout = V.ExtendLayout.build(prefix, extend)
    sage2 = batched_extend(sage2_emulated_batched, q, k, v, kp, vp, layout, 0.125)
    exact = batched_extend(reference_batched_kernel(), q, k, v, kp, vp, layout, 0.125)
    # FP8 P·V: about three times 1.0.6's error (0.037 against 0.013 for the kernels on random inputs)
    assert 0.01 < rel_l2(sage2, exact) < 0.06


# ------------------------------------------------------------------ decode: the padding factor divided out


def decode_batch(seq_lens, heads=4, kv_heads=2, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    q = torch.randn(len(seq_lens), heads, d, generator=g) * 2
    k = torch.randn(total, kv_heads, d, generator=g) + 1
    v = torch.randn(total, kv_heads, d, generator=g)
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(seq_lens), 0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("seq_lens", [[65, 1, 200], [64, 128], [7]])
def test_decode_divides_out_the_kernels_padded_keys(seq_lens):
    q, k, v, cu = decode_batch(seq_lens)
    kernel = reference_kernel(pad_block=V.KEY_BLOCK)
    out = V.decode_attention(kernel, q, k, v, cu, seq_lens, 0.125)
    for i, n in enumerate(seq_lens):
        want = request_attention(q[i:i + 1], k[cu[i]:cu[i + 1]], v[cu[i]:cu[i + 1]], 0.125)
        assert rel_l2(out[i:i + 1], want) < 2e-3, n  # float16 inside: inputs rounded to 11 bits
    # the control: one plain call of the same kernel is off wherever a sequence is not a multiple of 64 keys
    raw = kernel(q, V.smooth_keys(k, seq_lens), v, torch.arange(len(seq_lens) + 1, dtype=torch.int32), cu, 1, max(seq_lens),
                 is_causal=False, sm_scale=0.125, smooth_k=False)
    off = [rel_l2(raw[i], out[i]) > 0.01 for i in range(len(seq_lens))]
    assert off == [n % V.KEY_BLOCK != 0 for n in seq_lens]


def test_decode_keeps_bfloat16_and_does_not_touch_the_cache():
    q, k, v, cu = decode_batch([33, 90])
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    k0, v0 = k.clone(), v.clone()
    out = V.decode_attention(reference_kernel(pad_block=64), q, k, v, cu, [33, 90], 0.125)
    assert out.dtype == torch.bfloat16 and torch.equal(k, k0) and torch.equal(v, v0)


# ------------------------------------------------------------------ settings and statistics


def test_settings_from_the_environment(tmp_path):
    assert Settings.from_env({}) == Settings("triton", None)
    assert Settings.from_env({"SAGE_ATTN_DECODE": "sage", "SAGE_ATTN_STATS_DIR": str(tmp_path)}) == Settings("sage", tmp_path)
    with pytest.raises(SageAttnUnavailable, match="SAGE_ATTN_DECODE='fast' is not a decode mode; use one of triton, sage"):
        Settings.from_env({"SAGE_ATTN_DECODE": "fast"})
    assert Settings.from_env({}).prefill == "auto" and Settings.from_env({"SAGE_ATTN_PREFILL": "varlen"}).prefill == "varlen"
    assert [Settings(prefill="auto").prefill_path(g) for g in (1, 2, None)] == ["varlen", "batched", "varlen"]
    assert Settings(prefill="batched").prefill_path(1) == "batched" and Settings(prefill="varlen").prefill_path(2) == "varlen"
    with pytest.raises(SageAttnUnavailable, match="SAGE_ATTN_PREFILL='padded' is not a prefill mode; use one of auto, varlen, batched"):
        Settings.from_env({"SAGE_ATTN_PREFILL": "padded"})


def test_extend_lengths_are_plain_ints_whatever_sglang_hands_over():
    from types import SimpleNamespace as NS

    capture = NS(extend_prefix_lens_cpu=torch.tensor([0, 3]), extend_seq_lens_cpu=[torch.tensor(5), torch.tensor(2)],
                 extend_prefix_lens=None, extend_seq_lens=None)
    device_only = NS(extend_prefix_lens_cpu=None, extend_seq_lens_cpu=None,
                     extend_prefix_lens=torch.tensor([4]), extend_seq_lens=torch.tensor([9]))
    for batch, want in ((capture, ([0, 3], [5, 2])), (device_only, ([4], [9]))):
        got = V.extend_lengths(batch)
        assert got == want and all(type(n) is int for part in got for n in part)


def test_statistics_count_tensors_as_numbers_and_stay_writable(tmp_path):
    s = Stats(tmp_path, {"tp_rank": 0})
    s.count("extend_tokens_kernel", torch.tensor(7))
    s.write()
    assert read(tmp_path)["counts"] == {"extend_tokens_kernel": 7}


def test_preflight_refuses_from_the_arguments_alone_before_any_model_loads(monkeypatch):
    from types import SimpleNamespace as NS

    from sagecheck.sglang_plugin.preflight import after_check_server_args, preflight

    graphs_on = NS(attention_backend="sage_attn", cuda_graph_config=NS(decode=NS(backend="full")))
    graphs_off = NS(attention_backend="sage_attn", cuda_graph_config=NS(decode=NS(backend="disabled")))
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails
    preflight(NS(attention_backend="triton", prefill_attention_backend=None))  # not ours: nothing checked
    with pytest.raises(SageAttnUnavailable, match="sageattention package cannot be imported.*--attention-backend triton"):
        after_check_server_args(None, graphs_off)
    monkeypatch.setenv("SAGE_ATTN_DECODE", "sage")
    with pytest.raises(SageAttnUnavailable, match="--disable-cuda-graph"):
        preflight(graphs_on)
    with pytest.raises(SageAttnUnavailable, match="--disable-cuda-graph"):  # prefill/decode split: also ours
        preflight(NS(attention_backend="triton", decode_attention_backend="sage_attn", disable_cuda_graph=False))
    monkeypatch.setenv("SAGE_ATTN_DECODE", "fast")
    with pytest.raises(SageAttnUnavailable, match="not a decode mode"):
        preflight(graphs_off)


def test_statistics_of_two_ranks_are_merged(tmp_path):
    for rank, batches in ((0, 3), (1, 2)):  # rank 1's file was last written one batch earlier
        s = Stats(tmp_path, {"tp_rank": rank, "tp_size": 2, "decode": "triton", "kernel": "k", "q_heads_per_rank": 16,
                             "kv_heads_per_rank": 4})
        s.count("extend_batches_kernel", batches)
        s.count("fallback:forward mode mixed")
        s.write()
    merged = read(tmp_path)
    # every rank runs every batch: the server ran 3 batches, not 3 + 2
    assert merged["counts"] == {"extend_batches_kernel": 3, "fallback:forward mode mixed": 1}
    assert merged["counts_by_rank"]["1"]["extend_batches_kernel"] == 2
    assert [r["tp_rank"] for r in merged["ranks"]] == [0, 1]
    text = describe(merged)
    assert "3 prefill batches on the kernel" in text and "1 forward mode mixed" in text and "2 rank(s), 16 query / 4 KV heads" in text
    assert read(tmp_path / "none") is None and "not known" in describe(None)


def test_head_split_per_rank(tmp_path):
    def server(tp, q, kv, ranks=None):
        folder = tmp_path / f"tp{tp}-{q}-{kv}-{ranks}"
        for rank in ranks if ranks is not None else range(tp):
            Stats(folder, {"tp_rank": rank, "tp_size": tp, "q_heads_per_rank": q, "kv_heads_per_rank": kv}).write()
        return read(folder)

    assert expected_heads_per_rank(32, 8, 2) == (16, 4)
    assert expected_heads_per_rank(32, 8, 16) == (2, 1)  # fewer KV heads than ranks: each rank holds a copy of one
    ok = head_split(server(2, 16, 4), 32, 8, 2)
    assert ok["passed"] and "rank 0: 16/4 of tp 2; rank 1: 16/4 of tp 2" == ok["reported"] and "2 rank(s), 16 query / 4 KV" in ok["expected"]
    assert head_split(server(1, 32, 8), 32, 8, 1)["passed"]
    assert not head_split(server(2, 32, 8), 32, 8, 2)["passed"]  # every rank holding all heads: not split
    assert not head_split(server(2, 16, 4, ranks=[0]), 32, 8, 2)["passed"]  # a rank missing
    assert not head_split(server(1, 32, 8), 32, 8, 2)["passed"]  # asked for tp 2, ran tp 1
    missing = head_split(None, 32, 8, 2)
    assert not missing["passed"] and missing["reported"] == "no statistics written"


# ------------------------------------------------------------------ the real kernel (GPU)


def _sageattn_varlen():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        from sageattention import sageattn_varlen
    except ImportError:
        pytest.skip("sageattention is not installed")
    return sageattn_varlen


@pytest.mark.gpu
def test_gpu_the_real_kernel_counts_padded_keys_and_the_backend_corrects_it():
    kernel = _sageattn_varlen()
    seq_lens = [65, 64, 300, 1]
    q, k, v, cu = (t.cuda() for t in decode_batch(seq_lens, heads=8, kv_heads=2, d=128))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    k0 = k.clone()
    out = V.decode_attention(kernel, q, k, v, cu, seq_lens, 128 ** -0.5)
    assert torch.equal(k, k0)
    errors = []
    for i, n in enumerate(seq_lens):
        want = request_attention(q[i:i + 1].cpu(), k[cu[i]:cu[i + 1]].cpu(), v[cu[i]:cu[i + 1]].cpu(), 128 ** -0.5)
        errors.append(rel_l2(out[i:i + 1].cpu(), want))
    raw = kernel(q.half(), V.smooth_keys(k.half(), seq_lens), v.half(), torch.arange(5, dtype=torch.int32, device="cuda"), cu, 1,
                 max(seq_lens), is_causal=False, sm_scale=128 ** -0.5, smooth_k=False)
    raw_errors = [rel_l2(raw[i:i + 1].cpu(), out[i:i + 1].cpu()) for i in range(len(seq_lens))]
    print(f"decode rel. L2 vs exact per request {errors}; uncorrected kernel vs corrected {raw_errors}")
    assert max(errors) < 0.04  # 8-bit Q·K on random data: 0.013-0.024 measured on the H100
    from sagecheck.environment import sageattention_package

    if sageattention_package()["generation"] == 1:
        assert raw_errors[0] > 0.05 and raw_errors[1] < 0.01  # 65 keys: 63 padded; 64 keys: none
    else:  # SageAttention 2's varlen kernel masks the padding (H200: 0.0018 at 65 keys); the correction must then cost nothing
        assert max(raw_errors) < 0.01


@pytest.mark.gpu
def test_gpu_extend_with_prefixes_on_the_real_kernel():
    kernel = _sageattn_varlen()
    prefix, extend = [0, 300, 1000], [512, 77, 129]
    q, k, v, kp, vp = (t.cuda() for t in make_batch(prefix, extend, heads=8, kv_heads=2, d=128, dtype=torch.bfloat16))
    kp0 = kp.clone()
    layout = V.ExtendLayout.build(prefix, extend, "cuda")
    out = V.extend_attention(kernel, q, k, v, kp, vp, layout, 128 ** -0.5)
    emu = V.extend_attention(emulated_kernel, q.cpu(), k.cpu(), v.cpu(), kp.cpu(), vp.cpu(), V.ExtendLayout.build(prefix, extend), 128 ** -0.5)
    assert torch.equal(kp, kp0)
    errors = [rel_l2(out[rows].cpu(), want) for rows, want in request_references(q, k, v, kp, vp, prefix, extend, 128 ** -0.5)]
    kernel_vs_emulation = rel_l2(out.cpu(), emu)
    print(f"extend rel. L2 vs exact per request {errors}; kernel vs emulation {kernel_vs_emulation:.2e}")
    assert max(errors) < 0.03 and kernel_vs_emulation < min(errors) and not math.isnan(kernel_vs_emulation)


@pytest.mark.gpu
def test_gpu_batched_extend_with_prefixes_on_sageattn():
    """sageattn (SageAttention 2 on Hopper: its FP8 kernel; 1.0.6: its Triton kernel) on the padded groups."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        from sageattention import sageattn
    except ImportError:
        pytest.skip("sageattention is not installed")
    prefix, extend = [0, 300, 1000, 0], [512, 77, 129, 500]
    q, k, v, kp, vp = (t.cuda() for t in make_batch(prefix, extend, heads=8, kv_heads=2, d=128, dtype=torch.bfloat16))
    kp0 = kp.clone()
    layout = V.ExtendLayout.build(prefix, extend, "cuda")
    side = torch.cuda.Stream()  # as SGLang runs its forward: not on the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = batched_extend(B.on_default_stream(sageattn), q, k, v, kp, vp, layout, 128 ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(kp, kp0)
    errors = [rel_l2(out[rows].cpu(), want) for rows, want in request_references(q, k, v, kp, vp, prefix, extend, 128 ** -0.5)]
    print(f"batched extend rel. L2 vs exact per request {errors} in {len(B.plan(layout.seq_lens))} calls")
    # the FP8 kernel's error against float64 in 08 on the H200: 0.036 median, 0.039 worst; 1.0.6's about 0.012
    assert max(errors) < 0.06 and not any(math.isnan(x) for x in errors)
