"""Metrics against independent computations."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from pathlib import Path
import torch

from sagecheck.data import corpus
from sagecheck.metrics import drift, logits as L, perplexity as ppl
from sagecheck.metrics.timing import Stopwatch, gc_paused, paired_ratio, random_prompts, time_callable


@pytest.mark.parametrize("n, window, stride", [(1000, 256, 128), (1000, 256, 256), (257, 256, 100), (50, 256, 64)])
def test_every_token_is_scored_exactly_once(n, window, stride):
    windows = ppl.sliding_windows(n, window, stride)
    scored = []
    for w in windows:
        assert w.length <= window and 0 < w.n_scored < w.length
        scored += list(range(w.end - w.n_scored, w.end))
    assert scored == list(range(1, n)) or (stride == window and len(set(scored)) == len(scored))


def test_perplexity_equals_a_plain_loop_with_labels(builtin):
    """The notebook's code against the Hugging Face guide's loop (model(..., labels=...)), to 1e-6 relative."""
    tok, model = builtin.tokenizer, builtin.model
    ids = tok(corpus.builtin_heldout().text).input_ids[:3000]
    window, stride = 512, 200
    with builtin.backend("sdpa") as b:
        ours = ppl.score_windows(ids, ppl.sliding_windows(len(ids), window, stride), b.token_logprobs)
        x = torch.tensor([ids])
        nll_sum, n_tokens, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            trg = end - prev_end
            inp = x[:, begin:end]
            labels = inp.clone()
            labels[:, :-trg] = -100
            with torch.inference_mode():
                loss = model(input_ids=inp, labels=labels).loss
            valid = int((labels[:, 1:] != -100).sum())
            nll_sum += float(loss) * valid
            n_tokens += valid
            prev_end = end
            if end == len(ids):
                break
    assert ours.total_tokens == n_tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-6)


def test_word_perplexity_and_bits_per_byte_definitions():
    s = ppl.WindowScores(np.array([10.0, 20.0]), np.array([5, 5]))
    assert s.perplexity == pytest.approx(math.exp(3.0))
    assert s.word_perplexity(6) == pytest.approx(math.exp(5.0))
    assert s.bits_per_byte(30) == pytest.approx(1.0 / math.log(2))


def test_paired_bootstrap_brackets_the_delta():
    rng = np.random.default_rng(0)
    counts = np.full(200, 100)
    base = ppl.WindowScores(rng.uniform(300, 400, 200), counts)
    same = ppl.paired_bootstrap_delta_pct(base, base, 300)
    assert same["delta_pct"] == 0 and same["ci_low_pct"] == 0 and same["ci_high_pct"] == 0
    cand = ppl.WindowScores(base.nll * 1.01 + rng.normal(0, 0.5, 200), counts)
    d = ppl.paired_bootstrap_delta_pct(base, cand, 500)
    assert d["ci_low_pct"] < d["delta_pct"] < d["ci_high_pct"]
    assert d["ci_low_pct"] > 0  # a systematic 1% NLL increase is resolved by the pairing


def test_identical_distributions_give_zero_kl_full_agreement():
    logp = torch.log_softmax(torch.randn(50, 300), dim=-1)
    s = L.summarize(L.compare_logprobs(logp, logp.clone()))
    assert s["kl_mean"] == 0 and s["kl_max"] == 0
    assert s["top1_agreement"] == 1 and s["top5_agreement"] == 1
    assert s["max_abs_logit_diff"] == 0 and s["cosine_min"] == pytest.approx(1, abs=1e-12)


def test_kl_against_a_direct_formula():
    a = torch.log_softmax(torch.randn(7, 40, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(7, 40, dtype=torch.float64), -1)
    ours = L.compare_logprobs(a, b)["kl"]
    direct = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(ours, direct.numpy(), rtol=1e-10)


def test_topk_comparison_of_identical_lists():
    vals = np.log(np.array([[0.5, 0.3, 0.1]]))
    idx = np.array([[4, 2, 9]])
    s = L.compare_topk(vals, idx, vals, idx)
    assert s["kl"][0] == 0 and s["top1"][0] and s["max_abs"][0] == 0


def test_first_divergence():
    assert L.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert L.first_divergence([1, 2, 3], [1, 5, 3]) == 1


def test_drift_of_identical_tensors():
    x = torch.randn(2, 16, 32)
    s = drift.error_stats(x, x.clone())
    assert s["rel_l2"] == 0 and s["max_abs"] == 0 and s["sqnr_db"] == math.inf
    assert s["cosine"] == pytest.approx(1, abs=1e-12)
    noisy = drift.error_stats(x, x + 0.01 * torch.randn_like(x))
    assert 0.005 < noisy["rel_l2"] < 0.02 and 35 < noisy["sqnr_db"] < 45


def test_drift_measure_on_the_builtin_model(builtin):
    ids = builtin.tokenizer("Something is rotten in the state of Denmark. " * 8).input_ids
    recs = drift.measure(builtin, "sdpa", "sdpa", ids, ["compounded", "isolated"], buckets=2)
    layers = builtin.model.config.num_hidden_layers
    assert {r["kind"] for r in recs} == {"attention", "hidden", "final"}
    assert len([r for r in recs if r["mode"] == "compounded" and r["bucket"] == "all"]) == 2 * layers + 1
    # two float32 passes on a CPU may differ in rounding (tests/test_pipeline.py's A/A note): nothing beyond that
    assert all(r["rel_l2"] <= 1e-5 and r["cosine"] == pytest.approx(1, abs=1e-9) for r in recs)
    emu = drift.measure(builtin, "sdpa", "sage-emulated", ids, ["compounded"], buckets=2)
    assert all(0 < r["rel_l2"] < 0.1 for r in emu)


def test_timing_helper_against_an_independent_clock():
    """Known work (a 30 ms sleep) timed by the helper and, inside the work, by time.monotonic."""
    spans = []

    def work():
        t = time.monotonic()
        time.sleep(0.03)
        spans.append((time.monotonic() - t) * 1e3)

    t0 = time.monotonic()
    s = time_callable(work, torch.device("cpu"), repeats=6, warmup=1)
    total = (time.monotonic() - t0) * 1e3
    assert s.clock == "cpu-monotonic" and s.values.size == 6
    assert 29.5 < s.median < 45
    assert s.values.sum() <= total  # the helper's samples fit inside the whole call
    timed = np.asarray(spans[1:])  # the warm-up run is not a sample
    assert np.all(s.values >= timed) and np.all(s.values - timed < 2.0)  # same runs, within 2 ms of overhead
    with Stopwatch(torch.device("cpu")) as sw:
        time.sleep(0.01)
    assert 9.5 < sw.ms < 30
    r = paired_ratio(s, s)
    assert r.median == 1.0


def test_timed_regions_run_with_the_garbage_collector_paused():
    import gc

    states = []
    time_callable(lambda: states.append(gc.isenabled()), torch.device("cpu"), repeats=3, warmup=1)
    assert states == [True, False, False, False]  # warm-up untouched, every timed repeat paused
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()


def test_position_ranges_short_long_and_the_stand_in():
    kl = np.arange(1, 100, dtype=float)  # prediction of token i + 1
    loss = np.ones(99)
    rows, note = L.position_ranges(kl, loss, [10, 20], [50, 80])
    short, long = rows
    assert (short["positions"], short["n"], short["kl_mean"]) == ("10-19", 10, pytest.approx(np.mean(range(9, 19)) + 1))
    assert long["positions"] == "50-79" and long["loss_delta_mean"] == 1 and note == ""
    rows, note = L.position_ranges(kl, loss, [10, 20], [500, 800])
    assert rows[1]["positions"] == "75-99" and "last quarter" in note


def test_memory_peak_deltas():
    from sagecheck.metrics.memory import peak_deltas

    base = {"status": "ok", "input_length": 8, "batch": 1, "peak_allocated": 100, "peak_reserved": 200, "activations_peak": 2**30}
    cand = {**base, "implementation": "sage", "peak_allocated": 110, "activations_peak": 2 * 2**30}
    rows = [{**base, "implementation": "sdpa"}, cand, {**base, "batch": 4, "implementation": "sdpa"}]
    (d,) = peak_deltas(rows, "sdpa", "sage")
    assert d["peak_delta_pct"] == pytest.approx(10) and d["reserved_delta_pct"] == 0 and d["activations_delta_GiB"] == 1


def test_throughput_sweep_rows_stability_and_progress_log(builtin, tmp_path):
    from sagecheck.metrics import throughput as T

    log = tmp_path / "logs" / "progress.log"
    rows, stability = T.sweep(builtin, ("sdpa", "sage-emulated"), [16, 24], [1, 2], decode_tokens=2, repeats=2, warmup=0,
                              seed=0, progress_log=log)
    assert len(rows) == 2 * 2 * 2 and all(r["status"] == "ok" for r in rows)
    cand = [r for r in rows if r["implementation"] == "sage-emulated"]
    assert all(r["prefill_speedup"] > 0 and r["decode_tok_s_total"] > 0 and r["point_wall_s"] > 0 for r in cand)
    assert (stability["batch"], stability["input_length"]) == (2, 24)  # the largest point is the one repeated
    assert {"sdpa:decode", "sage-emulated:prefill"} <= set(stability) and math.isfinite(stability["max_diff_pct"])
    assert stability["verdict_diff_pct"] == stability["max_diff_pct"]  # no GPU busy time on the CPU: judged on elapsed time
    assert set(stability["basis"].values()) == {"elapsed time"}
    lines = log.read_text().splitlines()
    assert len(lines) == 6 and "batch 2 length 24 again" in lines[-2] and "largest difference" in lines[-1]
    _, none = T.sweep(builtin, ("sdpa", "sdpa"), [16], [1], 1, 1, 0, 0, repeat_point=False)
    assert none == {}


def test_sweep_profiles_only_after_every_timed_repeat(monkeypatch):
    """Once the profiler has run, kernel launches cost the host more: no timed repeat may follow a profiled one."""
    from types import SimpleNamespace

    from sagecheck.metrics import throughput as T
    from sagecheck.metrics.timing import Samples

    calls = []

    def timed(engine, impls, batch, length, *a, **k):
        calls.append(("timed", batch, length))
        s = {"prefill": Samples(np.array([10.0, 10.0]), "cuda-events"), "decode": Samples(np.array([40.0, 40.0]), "cuda-events")}
        return {"status": "ok", "samples": {i: dict(s) for i in impls}}

    def profiled(engine, impls, batch, length, *a, **k):
        calls.append(("profiled", batch, length))
        s = {"prefill_gpu": Samples(np.array([9.9]), "cuda-kernel-time"), "decode_gpu": Samples(np.array([10.0]), "cuda-kernel-time")}
        return {"samples": {i: dict(s) for i in impls}}

    monkeypatch.setattr(T, "measure_point", timed)
    monkeypatch.setattr(T, "profile_point", profiled)
    gpu_engine = SimpleNamespace(device=torch.device("cuda"))
    for mode, n_profiled in (("repeated", 2), ("all", 4 + 1), ("off", 0)):
        calls.clear()
        rows, stability = T.sweep(gpu_engine, ("a", "b"), [16, 32], [1, 2], 4, 2, 0, 0, kernel_time=mode)
        kinds = [c[0] for c in calls]
        assert kinds == ["timed"] * 5 + ["profiled"] * n_profiled, mode  # 4 points, the largest again, then profiling
        if mode != "off":
            assert calls[-1] == ("profiled", 2, 32) and calls[-2] == ("profiled", 2, 32)  # the repeated point, both times
            assert stability["judged"] == ["a:prefill", "a:decode_gpu", "b:prefill", "b:decode_gpu"]  # prefill idle 1%, decode idle 75%
        assert ("decode_gpu_busy_pct" in rows[-1]) == (mode != "off")


def test_busy_time_is_the_union_of_device_intervals():
    from sagecheck.metrics.timing import busy_ms

    assert busy_ms([]) == 0
    assert busy_ms([(0, 1000), (500, 1500), (3000, 4000), (3100, 3200)]) == pytest.approx(2.5)  # overlaps once


def test_repeat_agreement_judges_host_bound_decode_on_gpu_time():
    from sagecheck.metrics import throughput as T
    from sagecheck.metrics.timing import Samples

    def point(prefill, decode, prefill_gpu, decode_gpu):
        s = {"prefill": Samples(np.array(prefill), "cuda-events"), "decode": Samples(np.array(decode), "cuda-events"),
             "prefill_gpu": Samples(np.array([prefill_gpu]), "cuda-kernel-time"),
             "decode_gpu": Samples(np.array([decode_gpu]), "cuda-kernel-time")}
        return {"status": "ok", "samples": {"a": s, "b": s}}

    first = point([100.0, 100, 100], [500.0, 500, 500], 99.0, 150.0)  # decode: GPU busy 30% of the elapsed time
    again = point([101.0, 101, 101], [550.0, 550, 550], 99.5, 150.75)
    agree = T.repeat_agreement(first, again, ("a", "b"))
    assert agree["max_diff_pct"] == pytest.approx(10.0)  # elapsed decode moved by 10%
    assert agree["a:decode_gpu"] == pytest.approx(0.5) and agree["verdict_diff_pct"] == pytest.approx(1.0)  # prefill 1%
    assert agree["basis"]["a:decode"].startswith("GPU busy time") and agree["basis"]["a:prefill"].startswith("elapsed")
    assert agree["judged"] == ["a:prefill", "a:decode_gpu", "b:prefill", "b:decode_gpu"]
    assert agree["medians_ms"]["a:decode"] == [500.0, 550.0] and agree["medians_ms"]["b:decode_gpu"] == [150.0, 150.75]
    near_knee = point([100.0] * 3, [500.0] * 3, 99.0, 480.0)  # decode: GPU idle 4% of the elapsed time
    near_knee_again = point([100.0] * 3, [540.0] * 3, 99.0, 481.0)  # the host slowed: elapsed +8%, busy +0.2%
    assert T.repeat_agreement(near_knee, near_knee_again, ("a", "b"))["verdict_diff_pct"] == pytest.approx(100 / 480)
    assert T.repeat_agreement(near_knee, near_knee_again, ("a", "b"), tolerance_pct=5)["verdict_diff_pct"] == pytest.approx(8.0)
    table = {r["figure"]: r for r in T.stability_rows(agree)}
    assert table["a:decode GPU busy time"]["judged"] == "yes" and table["a:decode elapsed"]["judged"] == ""
    assert table["a:decode elapsed"]["diff_pct"] == pytest.approx(10.0) and table["a:decode elapsed"]["again_ms"] == 550.0
    plain = {"status": "ok", "samples": {k: {"prefill": v["prefill"], "decode": v["decode"]} for k, v in first["samples"].items()}}
    plain_again = {"status": "ok", "samples": {k: {"prefill": v["prefill"], "decode": v["decode"]} for k, v in again["samples"].items()}}
    assert T.repeat_agreement(plain, plain_again, ("a", "b"))["verdict_diff_pct"] == pytest.approx(10.0)  # no kernel time: elapsed
    rows = T.point_records(first, ("a", "b"), 1, 16, 4)
    assert rows[1]["decode_gpu_busy_pct"] == pytest.approx(30.0) and rows[1]["decode_kernel_speedup"] == 1.0


def test_a_timed_repeat_leaves_no_cyclic_garbage(builtin):
    """measure_point pauses the collector for a whole point; that is safe only while a repeat frees all it makes."""
    import gc

    from sagecheck.metrics import throughput as T

    prompts = random_prompts(builtin.model_config().vocab_size, 2, 24, 0, builtin.device)
    for impl in ("sdpa", "sage-emulated"):
        with builtin.backend(impl) as backend:
            T._one_repeat(backend, prompts, 3, builtin.device)  # warm: first calls build caches that live on
            gc.collect()
            gc.disable()
            try:
                T._one_repeat(backend, prompts, 3, builtin.device)
                assert gc.collect() == 0
            finally:
                gc.enable()


def test_per_window_perplexity_delta_against_each_windows_own_perplexity():
    base = ppl.WindowScores(np.array([10.0, 20.0, 5.0]), np.array([4, 8, 2]))
    cand = ppl.WindowScores(np.array([10.4, 19.0, 5.0]), np.array([4, 8, 2]))
    expected = [100 * (math.exp(c / n) / math.exp(b / n) - 1) for b, c, n in zip(base.nll, cand.nll, base.count)]
    assert ppl.per_window_delta_pct(base, cand) == pytest.approx(expected)
    assert ppl.per_window_delta_pct(base, base) == pytest.approx([0, 0, 0])


def test_kernel_agreement_flags_shapes_and_takes_the_smallest_ratio():
    from sagecheck.metrics.kernel import agreement

    rows = [
        {"shape": "a", "sage_status": "ok", "sage_vs_emulated_rel_l2": 5e-4, "sage_vs_ref_rel_l2": 1e-2, "sage_inputs_unchanged": True},
        {"shape": "b", "sage_status": "ok", "sage_vs_emulated_rel_l2": 1e-3, "sage_vs_ref_rel_l2": 8e-3, "sage_inputs_unchanged": True},
        {"shape": "c", "sage_status": "ok", "sage_vs_emulated_rel_l2": 0.0, "sage_vs_ref_rel_l2": 0.0, "sage_inputs_unchanged": True},
        {"shape": "d", "sage_status": "ok", "sage_vs_emulated_rel_l2": 0.6, "sage_vs_ref_rel_l2": 0.6, "sage_inputs_unchanged": False},
        {"shape": "e", "sage_status": "unsupported: chunked causal"},
        {"shape": "f"},  # no kernel at this shape
    ]
    a = agreement(rows, threshold=1e-2)
    assert [r["shape"] for r in a["flagged"]] == ["d"] and [r["shape"] for r in a["unsupported"]] == ["e"]
    assert a["agree_ratio_min"] == pytest.approx(8.0)  # shape b; c (exact) has no ratio
    assert a["inputs_unchanged"] is False and len(a["ran"]) == 4
    assert agreement(rows[2:3], 1e-2)["agree_ratio_min"] == math.inf


def test_kv_cache_check_and_sglang_server_deltas():
    from sagecheck.metrics.memory import kv_cache_matches, server_deltas

    rows = [{"status": "ok", "kv_cache": 1000, "kv_cache_expected": 1000},
            {"status": "out of memory"}]
    assert kv_cache_matches(rows)
    assert not kv_cache_matches(rows + [{"status": "ok", "kv_cache": 900, "kv_cache_expected": 1000}])
    assert not kv_cache_matches([{"status": "out of memory"}])  # nothing measured proves nothing
    servers = [{"implementation": "fa3", "status": "ok", "max_total_num_tokens": 200_000, "server_gpu_bytes": 50},
               {"implementation": "sage_attn", "status": "ok", "max_total_num_tokens": 190_000, "server_gpu_bytes": 51}]
    d = server_deltas(servers, "fa3", "sage_attn")
    assert d["capacity_delta_pct"] == pytest.approx(-5.0) and d["server_gpu_delta_pct"] == pytest.approx(2.0)
    assert not d["same_capacity"] and d["capacity_tokens"] == (200_000, 190_000)
    servers[1]["server_gpu_bytes"] = None
    servers[1]["max_total_num_tokens"] = 200_000
    d = server_deltas(servers, "fa3", "sage_attn")
    assert d["server_gpu_delta_pct"] is None and d["same_capacity"]
    assert server_deltas(servers[:1], "fa3", "sage_attn") is None


def test_heatmap_grid_places_records_and_leaves_gaps():
    from sagecheck.plots import grid

    records = [{"batch": 4, "input_length": 128, "v": 1.5}, {"batch": 1, "input_length": 256, "v": 0.5},
               {"batch": 1, "input_length": 128}, {"batch": 8, "input_length": 128, "v": 9.0}]  # no value; batch not shown
    g = grid(records, "v", [1, 4], [128, 256])
    assert g[1, 0] == 1.5 and g[0, 1] == 0.5
    assert np.isnan(g[0, 0]) and np.isnan(g[1, 1])


def test_memory_point_warms_up_before_the_peaks_are_reset(builtin, monkeypatch):
    """One-time allocations must land in resident_before, not in the first point's activations."""
    from sagecheck.metrics import memory as M

    events = []
    real_backend = builtin.backend

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def prefill(self, prompts):
            events.append(("prefill", tuple(prompts.shape)))
            return self.inner.prefill(prompts)

        def decode_step(self, tokens, cache):
            events.append(("decode", tuple(tokens.shape)))
            return self.inner.decode_step(tokens, cache)

    class Ctx:
        def __init__(self, impl):
            self.cm = real_backend(impl)

        def __enter__(self):
            return Recording(self.cm.__enter__())

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    monkeypatch.setattr(builtin, "backend", Ctx)
    monkeypatch.setattr(M, "reset_peaks", lambda device: events.append(("reset",)))
    monkeypatch.setattr(M, "allocator_peaks", lambda device: {"peak_allocated": 10, "peak_reserved": 20, "allocated_now": 1})
    row = M.measure_point(builtin, "sdpa", 2, 32, 3, 0)
    assert events[:3] == [("prefill", (1, 16)), ("decode", (1,)), ("reset",)]
    assert events[3] == ("prefill", (2, 32)) and events.count(("decode", (2,))) == 3
    # the measured cache is the point's, not the warm-up's: 2 (k, v) x 4 layers x batch 2 x 2 kv heads x 35 tokens x 64 x 4 bytes
    assert row["status"] == "ok" and row["kv_cache"] == 2 * 4 * 2 * 2 * (32 + 3) * 64 * 4


def test_throughput_summary_medians_over_the_points_that_ran():
    from sagecheck.metrics.throughput import summary

    def row(b, n, impl, **kw):
        return {"batch": b, "input_length": n, "implementation": impl, "status": "ok", **kw}

    rows = [row(1, 8, "base", decode_gpu_busy_pct=20.0), row(1, 8, "cand", prefill_speedup=0.8, decode_speedup=0.9,
                                                               decode_kernel_speedup=0.5, decode_gpu_busy_pct=40.0),
            row(2, 8, "base"), row(2, 8, "cand", prefill_speedup=1.0, decode_speedup=0.7),
            row(4, 8, "base"), row(4, 8, "cand", prefill_speedup=1.3, decode_speedup=0.8),
            {"batch": 8, "input_length": 8, "implementation": "base", "status": "out of memory"},
            {"batch": 8, "input_length": 8, "implementation": "cand", "status": "out of memory"}]
    s = summary(rows, "cand")
    assert (s["points"], s["points_not_run"]) == (4, 1)
    assert s["prefill_speedup_median_over_points"] == 1.0 and s["decode_speedup_median_over_points"] == 0.8
    assert s["decode_kernel_speedup_median_over_points"] == 0.5 and s["decode_gpu_busy_pct_median"] == 30.0  # both rows
    nothing = summary(rows[-2:], "cand")
    assert nothing["points_not_run"] == 1 and nothing["prefill_speedup_median_over_points"] is None


def test_results_refuse_fields_without_a_name():
    import pandas as pd

    from sagecheck.results import Results

    r = Results("08_kernel", Path("unused"))
    ratio = pd.Series([1.5, 0.9], index=pd.Index([128, 256], name="seq_len"))
    with pytest.raises(ValueError, match="fields without a name"):
        r.metric("sage_over_sdpa_tops", ratio.reset_index().to_dict(orient="records"))  # column "0"
    r.metric("sage_over_sdpa_tops", ratio.rename("sage_over_sdpa").reset_index().to_dict(orient="records"))
    assert r.metrics["sage_over_sdpa_tops"] == [{"seq_len": 128, "sage_over_sdpa": 1.5}, {"seq_len": 256, "sage_over_sdpa": 0.9}]


def test_heatmap_colour_scale_covers_at_least_the_minimum_span():
    import matplotlib.pyplot as plt

    from sagecheck import plots

    near_one = [[1.01, 0.99], [1.0, float("nan")]]
    fig = plots.heatmap(near_one, [1, 2], [128, 512], "t", "x", "y", min_span=0.1)
    assert fig.axes[0].collections[0].get_clim() == pytest.approx((0.9, 1.1))
    wide = plots.heatmap([[1.5, 0.7]], [1], [128, 512], "t", "x", "y", min_span=0.1)
    assert wide.axes[0].collections[0].get_clim() == pytest.approx((0.5, 1.5))  # the data's own span where larger
    # every cell says its value (the empty one "n/a"), each in a colour readable on its cell
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == sorted(["1.01", "0.99", "1.00", "n/a"])
    plt.close("all")


def test_a_series_of_one_point_is_a_table_not_a_figure(capsys):
    from sagecheck import plots

    assert plots.lines({"sdpa": [128]}, {"sdpa": [3.5]}, "sequence length", "TOPS", "one point") is None
    fig = plots.lines({"a": [1, 2]}, {"a": [0.5, 0.6]}, "x", "accuracy", "t", ylim=(0, 1.05))
    assert fig.axes[0].get_ylim() == (0, 1.05)


def test_sglangs_startup_split_is_flagged_where_servers_starting_together_moved_it():
    from sagecheck.metrics.memory import startup_split_disturbed

    # as measured on the H100 (three 8B servers started side by side)
    seen = [{"status": "ok", "weights_GB": 15.67, "cuda_graphs_GB": -0.72}, {"status": "ok", "weights_GB": 15.02, "cuda_graphs_GB": 0.12}]
    why = startup_split_disturbed(seen)
    assert "CUDA graphs -0.72 vs 0.12 GB" in why and "weights 15.67 vs 15.02 GB" in why
    clean = [{"status": "ok", "weights_GB": 15.02, "cuda_graphs_GB": 0.26}, {"status": "ok", "weights_GB": 15.02, "cuda_graphs_GB": 0.12}]
    assert startup_split_disturbed(clean) is None
    assert startup_split_disturbed([{"status": "server error"}]) is None


def test_kernel_accuracy_view_gives_words_where_no_figure_exists():
    from sagecheck.metrics.kernel import accuracy_view, flagged_view, likely_cause

    ran = {"shape": "a", "sdpa_status": "ok", "sdpa_vs_ref_rel_l2": 1e-4, "sage-emulated_status": "ok",
           "sage-emulated_vs_ref_rel_l2": 1e-2, "sage_status": "ok", "sage_vs_ref_rel_l2": 1.1e-2,
           "sage_vs_emulated_rel_l2": 1e-3, "sage_vs_ref_cosine": 0.9999, "sage_vs_ref_max_abs": 0.01, "sage_inputs_unchanged": True}
    refused = {"shape": "b", "sdpa_status": "ok", "sdpa_vs_ref_rel_l2": 1e-4, "sage-emulated_status": "ok",
               "sage-emulated_vs_ref_rel_l2": 1e-2, "sage_status": "unsupported: q and k lengths differ"}
    oom = {"shape": "c", "sdpa_status": "out of memory", "sage-emulated_status": "ok", "sage-emulated_vs_ref_rel_l2": 1e-2,
           "sage_status": "ok", "sage_vs_ref_rel_l2": 1e-2, "sage_inputs_unchanged": False}
    a, b, c = accuracy_view([ran, refused, oom], kernel_ran=True)
    assert a["kernel vs its emulation"] == 1e-3 and a["kernel leaves inputs alone"] == "yes"
    assert b["kernel vs reference"] == b["kernel vs its emulation"] == b["kernel leaves inputs alone"] == "unsupported"
    assert c["sdpa vs reference"] == "out of memory" and c["kernel vs its emulation"] == "n/a" and c["kernel leaves inputs alone"] == "NO"
    assert accuracy_view([{**ran, "sage_status": None}], kernel_ran=True)[0]["kernel vs reference"] == "not run"
    assert "kernel vs reference" not in accuracy_view([refused], kernel_ran=False)[0]  # no kernel: no kernel columns
    assert a["1.0.6 emulation vs reference"] == 1e-2 and a["SA2 FP8 emulation vs reference"] == "not run"
    # a kernel compared with SageAttention 2's emulation: its column, and no 1.0.6 padding story for its flags
    sa2 = {**ran, "emulation": "sage2-fp8-emulated", "sage2-fp8-emulated_status": "ok", "sage2-fp8-emulated_vs_ref_rel_l2": 0.036,
           "sage-emulated_status": "out of memory"}
    assert accuracy_view([sa2], kernel_ran=True)[0]["kernel vs its emulation"] == 1e-3
    shown, _ = flagged_view([{**sa2, "causal": False, "n_k": 17}])
    assert shown[0]["emulation vs reference"] == 0.036 and shown[0]["likely cause"] == "not explained"
    for view in (a, b, c):
        assert not any(isinstance(v, float) and v != v for v in view.values())  # never a nan

    shown, causes = flagged_view([{**ran, "causal": False, "n_k": 17, "sage-emulated_vs_ref_rel_l2": 1e-2}] * 2)
    assert [r["likely cause"] for r in shown] == [next(iter(causes))] * 2 and len(causes) == 1  # each cause explained once
    tag, why = likely_cause({"causal": False, "n_k": 17})
    assert tag.startswith("key padding") and "64-key block" in why
    assert likely_cause({"causal": True, "n_k": 17})[0] == "not explained"


def test_a_verdicts_detail_is_cut_at_a_word_with_a_mark():
    from sagecheck.results import one_line

    error = ("the SGLang server (--attention-backend sage_attn) exited with code 2 before it was ready: error: argument "
             "--attention-backend: invalid choice: 'sage_attn' (choose from 'triton', 'torch_native', 'flex_attention', 'fa3')")
    cut = one_line(error, 160)
    assert len(cut) <= 160 and cut.endswith(" …") and error.startswith(cut[:-2]) and cut[:-2].split()[-1] in error.split()
    assert one_line("short\nerror") == "short error" and one_line("") == ""


def test_08s_flagged_detail_lists_whole_shapes_and_says_how_many_more():
    from sagecheck.metrics import kernel as K

    flagged = [{"shape": f"b1 h32/8 q{n} k{n} d64 full float16", "sage_vs_emulated_rel_l2": 0.5, "sage_vs_ref_rel_l2": 0.5,
                "sage-emulated_vs_ref_rel_l2": 0.01, "causal": False, "n_k": n} for n in range(1, 31)]
    seen = {}

    class Results:
        def verdict(self, id, kind, name, value, comparison, threshold, detail="", **kw):
            seen[id] = detail

    K._emulation_verdicts(Results(), {"flagged": flagged, "agree_ratio_min": 6.0})
    detail = seen["kernel.vs_emulation"]
    listed = detail.split("; … ")[0].split("likely cause: key padding: n_k not a multiple of 64; ")[1].split("; ")
    assert listed == [f"{r['shape']}: 5.00e-01" for r in flagged[: len(listed)]] and 0 < len(listed) < 30
    assert detail.endswith(f"; … {30 - len(listed)} more in the flagged table")
