"""04 says where the candidate's prefill ran at each point (its server's counters) and judges its kernel path against
the bare kernel from the server's own measurement at start (issue 35: sage_attn worth enabling)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sagecheck import backend_stats, plots  # noqa: E402
from sagecheck import results as R  # noqa: E402
from sagecheck.metrics import throughput as T  # noqa: E402
from sagecheck.params import Params, NotebookParams  # noqa: E402
from sagecheck.report import recommendation as rec  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


# the H200 measurement of 2026-12-05 (benchmarks/RESULTS.md): one layer, 32/8 heads of 128, bf16, ms
H200 = {"lengths": [256, 512, 1024, 2048, 4096, 8192, 16384],
        "kernel_ms": [0.76, 0.75, 0.72, 0.73, 0.78, 1.35, 3.42],
        "kernel_alone_ms": [0.28, 0.26, 0.27, 0.30, 0.46, 0.97, 2.98],
        "triton_ms": [0.07, 0.07, 0.12, 0.27, 0.83, 2.93, 11.36]}


def dispatch(kernel_ms=None, keys=4096, **measured):
    m = {"mode": "measured", "keys": keys, "source": "measured at start: NVIDIA H200, 32 query / 8 KV heads of 128, "
                                                      "bfloat16, one request of L tokens",
         "timing": "ms per layer, median of 7 CUDA-event timings after 2 warm-ups", **H200, **measured}
    if kernel_ms is not None:
        m["kernel_ms"] = kernel_ms
    return {"rule": f"the kernel from {keys} keys per request ({m['source']})", "measured": m}


def sweep(dispatch_facts, routes=None):
    """An SGLang sweep of 2 lengths x 1 batch; ``routes``: the candidate's prefill_on per length."""
    rows = []
    for n in (128, 8192):
        rows.append({"implementation": "triton", "batch": 1, "input_length": n, "status": "ok"})
        cand = {"implementation": "sage_attn", "batch": 1, "input_length": n, "status": "ok", "prefill_speedup": 1.0 if n == 128 else 1.2,
                "prefill_vs_aa": "no difference" if n == 128 else "faster", "decode_speedup": 1.0, "decode_vs_aa": "no difference",
                "aa_prefill_speedup": 1.0, "aa_decode_speedup": 1.0}
        if routes:
            on = routes[n]
            cand.update({"prefill_on": on, "prefill_batches_kernel": 7 if on == "kernel" else 0,
                         "prefill_batches_triton": 7 if on != "kernel" else 0})
        rows.append(cand)
    served = {"servers": {}, "order": "rotated", "clock": "client", "dispatch": dispatch_facts}
    return T.Sweep(rows, "triton", "sage_attn", [128, 8192], [1], "H200, sage_attn vs triton", "H200", served=served,
                   copy="triton copy")


def test_prefill_route_from_the_counters_change():
    assert backend_stats.prefill_route({"extend_batches_kernel": 6, "decode_graph_replays": 18}) == {
        "on": "kernel", "kernel": 6, "triton": 0, "fallbacks": 0}
    assert backend_stats.prefill_route({"extend_batches_triton": 6})["on"] == "Triton (dispatch rule)"
    assert backend_stats.prefill_route({"extend_batches_triton": 2, "extend_batches_kernel": 4})["on"] == "kernel and Triton"
    assert backend_stats.prefill_route({"fallback:sliding-window layer": 64})["on"] == "the baseline (fallback)"
    # a backend that counts nothing, or a point whose prefill it did not count: no claim
    assert backend_stats.prefill_route({}) is None and backend_stats.prefill_route({"decode_graph_replays": 3}) is None


def test_the_measurement_table_judges_only_where_the_bare_kernel_beats_triton():
    rows = T.dispatch_rows(sweep(dispatch()))
    assert [r["keys_per_request"] for r in rows] == H200["lengths"]
    by = {r["keys_per_request"]: r for r in rows}
    assert by[8192]["path_over_bare_pct"] == pytest.approx((1.35 / 0.97 - 1) * 100)
    assert [r["sent_to"] for r in rows] == ["Triton"] * 4 + ["kernel"] * 3
    assert [r["bare_kernel_beats_triton"] for r in rows] == [False] * 4 + [True] * 3
    check = T.integration_check(rows)
    # 256 keys: 171% over the bare kernel, but the kernel does not pay there; 4096: 70%, the worst of 4096-16384
    assert check["at"] == 4096 and check["value"] == pytest.approx((0.78 / 0.46 - 1) * 100)
    assert check["lengths"] == [4096, 8192, 16384]


def record(tmp_path, s, on_gpu=True):
    res = R.Results("04_throughput", tmp_path)
    T.record(res, s, NotebookParams(Params(), "04_throughput"), on_gpu)
    return res


def test_an_integration_that_costs_40_percent_fails_and_one_within_5_passes(tmp_path):
    slow = record(tmp_path / "slow", sweep(dispatch()))  # the H200 figures: 70% over at 4096 keys
    v = slow.find("throughput.integration")
    assert v.kind == "speed" and not v.passed and v.threshold == 10.0 and "target set for sagecheck's sage_attn" in v.source
    assert "worst at 4096 keys of 4096, 8192, 16384" in v.detail and "median of 7 CUDA-event timings" in v.detail
    lean = [a * 1.04 for a in H200["kernel_alone_ms"]]
    good = record(tmp_path / "good", sweep(dispatch(kernel_ms=lean)))
    assert good.find("throughput.integration").passed and good.find("throughput.integration").value == pytest.approx(4.0)
    assert good.tables["dispatch"][0]["keys_per_request"] == 256 and good.metrics["dispatch"]["measured"]["keys"] == 4096
    # the failing check reads as what it is in the report's opening, not as inconclusive speed figures
    failures = rec.failures_sentence([slow])
    assert "04_throughput (1: the backend's kernel path spends more time around the kernel" in failures


def test_cpu_timings_and_a_rule_set_by_hand_get_no_verdict(tmp_path):
    cpu = record(tmp_path / "cpu", sweep(dispatch()), on_gpu=False)
    assert cpu.find("throughput.integration") is None and any("no verdict on CPU" in n and "69.57%" in n for n in cpu.notes)
    # the opening says so too, for servers timed in a CPU run (the stand-in's), not only for the in-process emulation
    caveat = "These are CPU timings (this run's device is the CPU; 04 gives them no verdict)"
    assert caveat in rec.speed_sentence(cpu, "sage_attn", "triton", False)
    assert caveat not in rec.speed_sentence(record(tmp_path / "gpu", sweep(dispatch())), "sage_attn", "triton", False)
    by_hand = {"rule": "the kernel from 400 keys per request (SAGE_ATTN_DISPATCH=400)",
               "measured": {"mode": "set", "keys": 400, "source": "SAGE_ATTN_DISPATCH=400"}}
    res = record(tmp_path / "set", sweep(by_hand))
    assert res.find("throughput.integration") is None and T.dispatch_rows(sweep(by_hand)) == []
    assert any("not judged, its server measured nothing" in n for n in res.notes)
    # where the bare kernel never beats Triton's (a small model), nothing is judged either
    never = dispatch(keys=None, kernel_alone_ms=[t * 2 for t in H200["triton_ms"]])
    res = record(tmp_path / "never", sweep(never))
    assert res.find("throughput.integration") is None and any("beat Triton's at no measured length" in n for n in res.notes)


def test_points_on_triton_are_marked_on_the_map_in_the_table_and_in_the_opening(tmp_path):
    s = sweep(dispatch(), routes={128: "Triton (dispatch rule)", 8192: "kernel"})
    notes = T.map_notes(s, "prefill_speedup")
    assert notes.tolist() == [["on Triton", ""]] and T.map_notes(s, "decode_speedup") is None
    fig = plots.heatmap(plots.grid(s.candidate_rows, "prefill_speedup", s.batches, s.lengths), s.batches, s.lengths, "t",
                        "input length", "batch size", notes=notes)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1.00\non Triton", "1.20"]
    (_, prefill_caption, cols), (_, decode_caption, decode_cols) = T.tables(s)[1:3]
    assert cols[:3] == ["input_length", "batch", "prefill_on"] and "prefill_vs_aa" in cols and "decode_speedup" not in cols
    assert ", prefill — " in prefill_caption and ", decode — " in decode_caption and "decode_vs_aa" in decode_cols
    words = T.dispatch_words(s, 10.0)
    assert "the kernel ran every prefill batch at 1 of 2 points (7 batches on the kernel, 7 on Triton's" in words
    assert "measures the integration, not the kernel" in words and "70% longer than the bare kernel at 4096 keys" in words
    res = record(tmp_path, s)
    speed = rec.speed_sentence(res, "sage_attn", "triton", False)
    assert "Its kernel ran the prefill at 1 of 2 points; at the others (input 128 batch 1)" in speed
    # every point on the kernel: nothing to mark, nothing said
    on_kernel = sweep(dispatch(), routes={128: "kernel", 8192: "kernel"})
    assert T.map_notes(on_kernel, "prefill_speedup") is None
    assert "Its kernel ran" not in rec.speed_sentence(record(tmp_path / "k", on_kernel), "sage_attn", "triton", False)


def test_the_measurement_is_drawn_with_its_crossover():
    xs, ys, marks = T.dispatch_curves(sweep(dispatch()))
    assert set(ys) == {"sage_attn's kernel path", "the bare kernel", "Triton's extend kernel"}
    assert marks == {"crossover: the kernel from 4096 keys": 4096}
    fig = plots.lines(xs, ys, "keys per request", "ms per layer", "t", logy=True, marks=marks)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "crossover: the kernel from 4096 keys" in labels and len(labels) == 4
    assert T.dispatch_caption(sweep(dispatch())).startswith("The sage_attn server's measurement for its dispatch rule (measured at start: NVIDIA H200")
    assert "prefix_sent_to" not in T.dispatch_rows(sweep(dispatch()))[0]  # no prefix measured: no prefix columns


def test_the_prefix_measurement_is_tabled_drawn_and_routed():
    """A server that also timed requests whose first half is cached (the split's path): its rows, curves and mark."""
    # the plugin's facts (its Crossover.as_dict): the timings and, per length, where its rule sends such a request
    prefix = dispatch(prefix_measured=True, prefix_keys=16384, prefix_kernel_ms=[1.6, 1.6, 1.7, 1.8, 2.0, 3.8, 6.0],
                      prefix_triton_ms=[0.1, 0.1, 0.1, 0.2, 0.6, 2.4, 8.5], routes=["Triton"] * 4 + ["kernel"] * 3,
                      prefix_routes=["Triton"] * 6 + ["kernel"])
    rows = T.dispatch_rows(sweep(prefix))
    assert [r["prefix_sent_to"] for r in rows] == ["Triton"] * 6 + ["kernel"]
    assert [r["sent_to"] for r in rows] == ["Triton"] * 4 + ["kernel"] * 3  # the cold route keeps its own crossover
    assert rows[5]["prefix_kernel_path_ms"] == 3.8 and rows[5]["prefix_triton_ms"] == 2.4
    xs, ys, marks = T.dispatch_curves(sweep(prefix))
    assert ys["sage_attn's kernel path, first half cached"][-1] == 6.0 and len(xs["Triton's extend kernel, first half cached"]) == 7
    assert marks == {"crossover: the kernel from 4096 keys": 4096, "over a cached prefix: from 16384 keys": 16384}
    fig = plots.lines(xs, ys, "keys per request", "ms per layer", "t", logy=True, marks=marks)
    legend = fig.axes[0].get_legend()
    assert len(legend.get_texts()) == 7 and legend.get_bbox_to_anchor().x0 > fig.axes[0].bbox.x1  # beside the lines
    assert "prefix_*: both paths for a request" in T.dispatch_caption(sweep(prefix))


def test_a_copy_server_that_did_not_start_is_said_and_its_points_are_judged_on_their_own_intervals(tmp_path):
    """The 2026-12-05 H100 run: the 8B preset's A/A copy ran out of memory at start. The opening must not say that the
    A/A control failed by a measured figure, nor call a 1.19x [1.16-1.22] point 'no measurable difference'."""
    s = sweep(dispatch())
    oom = ("the SGLang server (--attention-backend triton) exited with code -9 before it was ready: "
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 448.00 MiB.")
    s.served["servers"] = {"triton copy": {"role": "baseline_copy", "error": oom}}
    for r in s.rows:
        if r["implementation"] == "sage_attn":
            fast = r["input_length"] == 8192
            r.update(prefill_vs_aa="no A/A control", decode_vs_aa="no A/A control", aa_prefill_speedup=None,
                     aa_decode_speedup=None, prefill_speedup=1.19 if fast else 0.76,
                     prefill_speedup_p10=1.16 if fast else 0.71, prefill_speedup_p90=1.22 if fast else 0.88,
                     decode_speedup_p10=0.97, decode_speedup_p90=1.03)
    res = record(tmp_path, s)
    aa = res.find("throughput.aa.prefill")
    assert not aa.passed and aa.value is None and "did not start" in aa.detail and "OutOfMemoryError" in aa.detail
    speed = rec.speed_sentence(res, "sage_attn", "triton", False)
    assert "prefill: faster at 1 of 2 points, slower at 1" in speed and "best 1.19x at input 8192" in speed
    assert "The A/A control did not run: its copy server did not start (the SGLang server" in speed
    assert "judged by its own 10-90% interval against 1" in speed and "The A/A control failed" not in speed
    # a copy that served and measured a difference is still a failed control, in the words with its figure
    measured = record(tmp_path / "measured", sweep(dispatch()))
    for v in measured.verdicts:
        if v.id.startswith("throughput.aa."):
            v.value, v.passed = 5.0, False
    assert "The A/A control failed (the baseline against its own copy differs by 5 %" in rec.speed_sentence(
        measured, "sage_attn", "triton", False)


def test_the_integration_is_judged_on_the_gpu_time_where_the_server_measured_it(tmp_path):
    """A server that also timed both calls on the GPU alone (dispatch.device_ms): the verdict reads the GPU's time, the
    host-inclusive reading stays in its detail and in the words; a path that adds 40% on the GPU still fails; a length
    the server could not time so sends the verdict back to the host-inclusive figures."""
    gpu_timing = "GPU time with the host ahead: median of 7 CUDA-event timings after 2 warm-ups"
    bare = [0.20, 0.20, 0.21, 0.25, 0.42, 0.95, 2.95]
    lean = dispatch(kernel_device_ms=[b * 1.05 for b in bare], kernel_alone_device_ms=bare, device_timing=gpu_timing)
    rows = T.dispatch_rows(sweep(lean))
    assert rows[4]["path_over_bare_gpu_pct"] == pytest.approx(5.0) and rows[4]["bare_kernel_gpu_ms"] == 0.42
    res = record(tmp_path / "lean", sweep(lean))
    v = res.find("throughput.integration")
    assert v.passed and v.value == pytest.approx(5.0) and "on the GPU's own time" in v.source
    assert gpu_timing in v.detail and "with the host's time in it" in v.detail and "69.57% at 4096 keys" in v.detail
    words = T.dispatch_words(sweep(lean), 10.0)
    assert "5% longer than the bare kernel at" in words and "on the GPU" in words and "70% at 4096 keys" in words
    assert "*_gpu_*: the kernel path and the bare kernel on the GPU alone" in T.dispatch_caption(sweep(lean))
    assert "the device to itself" not in T.dispatch_caption(sweep(lean))
    assert "taken before the other servers were launched, the device to itself" in T.dispatch_caption(
        sweep({**lean, "measured_alone_s": 31.5}))
    heavy = [b * (1.4 if n == 8192 else 1.02) for b, n in zip(bare, H200["lengths"])]
    slow = record(tmp_path / "slow", sweep(dispatch(kernel_device_ms=heavy, kernel_alone_device_ms=bare,
                                                    device_timing=gpu_timing)))
    v = slow.find("throughput.integration")
    assert not v.passed and v.value == pytest.approx(40.0) and "worst at 8192 keys" in v.detail
    untimed = [b * 1.05 for b in bare]
    untimed[5] = None  # 8192 keys: the call waited for the GPU, so it has no GPU-alone time
    partly = T.integration_check(T.dispatch_rows(sweep(dispatch(kernel_device_ms=untimed, kernel_alone_device_ms=bare,
                                                                device_timing=gpu_timing))))
    assert partly["basis"] == "host and GPU" and partly["value"] == pytest.approx((0.78 / 0.46 - 1) * 100)
    assert partly["untimed_on_gpu"] == [{"keys": 8192, "calls": ["the kernel path"]}]
    # a kernel that synchronizes in every call (1.0.6's sageattn_varlen): neither call has a GPU-alone time, and the
    # verdict and the words say why it reads the host-inclusive figures
    synced = dispatch(kernel_device_ms=[None] * len(bare), kernel_alone_device_ms=[None] * len(bare), device_timing=gpu_timing)
    v = record(tmp_path / "synced", sweep(synced)).find("throughput.integration")
    why = ("not on the GPU's own time: the kernel path and the bare kernel could not be timed on the GPU alone at 4096, "
           "8192, 16384 keys")
    assert why in v.detail and why in T.dispatch_words(sweep(synced), 10.0)
    assert "not on the GPU's own time" not in T.dispatch_words(sweep(lean), 10.0)  # timed on the GPU: nothing to explain
    old_server = T.integration_check(T.dispatch_rows(sweep(dispatch())))  # a server that never tried the GPU alone
    assert old_server["untimed_on_gpu"] == [] and T.untimed_words(old_server) == ""
