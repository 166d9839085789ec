"""The benchmarks' own logic on the CPU, so that a GPU session spends its time measuring, not finding a typo: the census
cost benchmark runs end to end; the overhead benchmark's profile names where a call's time goes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_overhead_profile_ranks_a_calls_parts_by_time():
    overhead = load("backend_overhead")
    x = torch.randn(256, 256)
    prof = overhead.profiled(lambda: (x @ x).sum())
    names = [p["name"] for p in prof["by_host_time"]]
    assert "aten::mm" in names and all(p["ms"] > 0 and p["count"] >= 1 for p in prof["by_host_time"])
    assert prof["runtime_calls"] == {} and prof["by_device_time"] == []  # no GPU here: no device time, no CUDA call


def test_the_census_cost_benchmark_runs_and_a_call_costs_microseconds(tmp_path, monkeypatch):
    from sagecheck import census

    fresh = census.Census()  # the benchmark's calls land in a census of their own, not this process's
    monkeypatch.setattr(census, "CENSUS", fresh)
    monkeypatch.setattr(census, "snapshot", fresh.snapshot)
    bench = load("census_overhead")
    out = tmp_path / "census.json"
    assert bench.main(["--calls", "200", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["us_per_call"]
    assert set(got) == {"bare no-op", "padded call (sageattn, NHD)", "packed call (sageattn_varlen)",
                        "packed call, census paused"}
    # recording costs something, pausing almost nothing; well under a millisecond either way on any machine
    assert got["bare no-op"] < got["packed call, census paused"] < got["packed call (sageattn_varlen)"] < 1000
    assert {e["config"]["entry"] for e in fresh.snapshot().values()} == {"sageattn", "sageattn_varlen"}


def test_the_ttft_gap_benchmark_runs_its_variants_on_the_stand_in(tmp_path, monkeypatch):
    """benchmarks/ttft_gap.py against stand-in servers: each variant timed at each length, the speedups paired with the
    baseline's repeats, and the variant with every batch on Triton by the rule counted so by its own server."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "standin"), str(ROOT / "lib"),
                                                      os.environ.get("PYTHONPATH", "")]))
    gap = load("ttft_gap")
    out = tmp_path / "gap.json"
    assert gap.main(["--params", str(ROOT / "tests" / "params_sglang.yaml"), "--out", str(out), "--lengths", "16,48,16",
                     "--repeats", "3", "--warmup", "1", "--decode-tokens", "3",
                     "--variants", "triton,sage_attn_all_triton,sage_attn_no_stats", "--profile", "2", "--profile-tokens", "3", "--steps", "6", "--step-prompts", "2",
                     "--decode-after-s", "0.2"]) == 0
    got = json.loads(out.read_text())
    assert got["errors"] == {} and set(got["lengths"]) == {"16", "48", "16 (again)"}
    for rows in got["lengths"].values():
        assert set(rows) == {"triton", "sage_attn_all_triton", "sage_attn_no_stats"}
        assert all(len(r["ttft_ms_by_repeat"]) == 3 and 0 < r["prefill_ms"][1] <= r["prefill_ms"][0] <= r["prefill_ms"][2]
                   for r in rows.values())
        assert "prefill_speedup" not in rows["triton"] and rows["sage_attn_no_stats"]["prefill_speedup"][0] > 0
        assert rows["sage_attn_all_triton"]["prefill_batches"] == {"kernel": 0, "triton": 4}  # 1 warm-up + 3 repeats
        assert "prefill_batches" not in rows["sage_attn_no_stats"]  # no statistics folder: nothing counted
    # --steps: each server's decode step by step at each length (once per distinct length), paired with triton's;
    # --decode-after-s: again, each timed request 0.2 s after its prompt's prefill
    assert set(got["steps"]) == {"16", "48", "16 after 0.2 s", "48 after 0.2 s"}
    # its own clock log beside the steps: the stand-in's servers run on the CPU, so it says why it has none
    assert got["steps_clocks"]["logged"] is False and got["steps_clocks"]["samples"] == []
    assert got["steps_clocks"]["why_not"] == "the run is on the CPU, not a GPU"
    steps = got["steps"]["48"]
    assert steps["tokens"] == 6 and len(steps["requests"]) == 3 * 3 and steps["after_s"] is None
    later = got["steps"]["48 after 0.2 s"]
    assert later["after_s"] == 0.2 and len(later["requests"]) == 3 * 3
    # each server's timed requests follow a one-token request and the pause: at least 0.2 s between two of them
    starts = sorted(q["started_unix_s"] for q in later["requests"])
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.2
    assert all(len(q["token_ms"]) == 7 and q["token_ms"] == sorted(q["token_ms"]) and q["started_unix_s"] > 0
               for q in steps["requests"])
    assert set(steps["summary"]["triton"]) == {"steps 1-4", "steps 5-6"}
    for name in ("sage_attn_all_triton", "sage_attn_no_stats"):
        seg = steps["summary"][name]["steps 1-4"]
        assert 0 < seg["ms_per_step"][1] <= seg["ms_per_step"][0] <= seg["ms_per_step"][2] and seg["speedup"][0] > 0
    assert "speedup" not in steps["summary"]["triton"]["steps 1-4"]
    # --step-prompts 2: repeats 0 and 2 decode prompt 0, repeat 1 prompt 1, on every server; medians per prompt
    assert [q["prompt"] for q in steps["requests"] if q["server"] == "triton"] == [0, 1, 0]
    for name, row in steps["by_prompt"].items():
        mine = [q for q in steps["requests"] if q["server"] == name]
        one = [sum(b - a for a, b in zip(q["token_ms"], q["token_ms"][1:])) / 6 for q in mine if q["prompt"] == 1]
        assert len(row) == 2 and row[1] == pytest.approx(one[0], rel=1e-6)
    # --profile: each server's two profiled requests (at the first length) in a trace, each variant set against triton's
    assert set(got["profile"]) == {"sage_attn_all_triton", "sage_attn_no_stats"}
    for rep in got["profile"].values():
        assert rep["requests"] == [2, 2] and rep["labels"][0] == "triton"
        ops = rep["categories"]["cpu_op"]
        assert all(side["calls"] > 0 and side["us"] > 0 for side in ops)  # the stand-in's forwards, on both sides
        assert rep["top"] and all(r["category"] == "cpu_op" for r in rep["top"])
    assert len(list((tmp_path / "gap-logs" / "profiles" / "triton").glob("triton-TP-0.trace.json.gz"))) == 1


def test_a_trace_difference_is_summed_per_request_and_its_gpu_time_counted_once_where_kernels_overlap(tmp_path):
    """trace_diff on two hand-made traces of 2 requests: the figures per request, worked out by hand."""
    import gzip

    diff = load("trace_diff")

    def trace(path, events):
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": events}, f)
        return path

    base = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 50, "dur": 10},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 5, "dur": 20},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 55, "dur": 20},
            {"ph": "i", "cat": "cpu_op", "name": "marker", "ts": 1}]  # an instant event: no duration, not counted
    other = base[:4] + [{"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 30, "dur": 300},
                        {"ph": "X", "cat": "kernel", "name": "quant", "ts": 15, "dur": 20},  # overlaps gemm by 10
                        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 100, "dur": 4}]
    # two decode steps back to back, then a prefill: windows 900 and 1100 us, one period of 1500 us
    steps = [{"ph": "X", "cat": "gpu_user_annotation", "name": "step[DECODE bs=1]", "ts": 1000, "dur": 900},
             {"ph": "X", "cat": "gpu_user_annotation", "name": "step[DECODE bs=1]", "ts": 2500, "dur": 1100},
             {"ph": "X", "cat": "gpu_user_annotation", "name": "step[EXTEND bs=1 toks=128]", "ts": 5000, "dur": 300},
             {"ph": "X", "cat": "user_annotation", "name": "step[DECODE bs=1]", "ts": 900, "dur": 50}]  # host side
    assert diff.step_timing(steps) == {"DECODE": {"steps": 2, "gpu_window_us": 1000.0, "period_us": 1500.0},
                                       "EXTEND": {"steps": 1, "gpu_window_us": 300.0, "period_us": None}}
    a = diff.summary(diff.load(trace(tmp_path / "a.trace.json.gz", base)), 2)
    b = diff.summary(diff.load(trace(tmp_path / "b.trace.json.gz", other)), 2)
    assert a["gpu_busy_us"] == 20 and b["gpu_busy_us"] == (30 + 20 + 4) / 2  # [5, 35) and [55, 75) and [100, 104)
    assert a["categories"]["cpu_op"] == {"calls": 1, "us": 10}
    rep = diff.report(a, b, ("base", "other"), top=3)
    assert [(r["name"], r["extra_us"]) for r in rep["top"]] == [("cudaStreamSynchronize", 150), ("quant", 10),
                                                              ("Memcpy HtoD", 2)]
    assert rep["top"][0]["base_calls"] == 0 and rep["top"][0]["other_calls"] == 0.5
    assert "| cuda_runtime | cudaStreamSynchronize | 0.0 | 0.5 | 0 | 150 | +150 |" in diff.markdown(rep)
    with_steps = diff.report({**a, "steps": diff.step_timing(steps)}, b, ("base", "other"))
    assert "| DECODE | 2 | 0 | 1000 |  | 1500 |  |" in diff.markdown(with_steps)
    with pytest.raises(ValueError, match="requests must be at least 1"):
        diff.summary([], 0)


def test_the_merge_makes_fewer_calls_than_the_forms_before_it():
    """benchmarks/merge_calls.py on the merge as the split makes it: 9 top-level aten calls on torch 2.13 (a sigmoid
    share and one lerp), where the exp(l - logaddexp) weights made 14 and the max-subtracted form 22; a return to
    either fails here. Asked for the union's log-sum-exp too, one call more."""
    merge_calls = load("merge_calls")
    got = merge_calls.count(256, 4, 16)
    assert 0 < got["top_level_calls"] <= 9 < 14 and got["all_calls"] >= got["top_level_calls"]
    assert merge_calls.count(256, 4, 16, with_lse=True)["top_level_calls"] == got["top_level_calls"] + 1




def test_steps_by_clock_sets_each_decode_step_against_the_clock_logged_then(tmp_path, capsys):
    """benchmarks/steps_by_clock.py on a hand-made clock log and ttft_gap requests: the GPU at 1600 MHz under its power
    cap for the first second, 1950 MHz after; triton's steps of 10 ms at 1950, sage_attn's of 11 ms at 1600 and of
    10.2 ms at 1950: 1.02 at the same clock, and the phases' clocks as laid out."""
    import datetime as dt

    sbc = load("steps_by_clock")
    t0 = 1_796_000_000.0
    rows = ["timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], temperature.gpu, "
            "clocks_event_reasons.active"]
    for i in range(60):  # every 50 ms for 3 s
        t = t0 + i * 0.05
        when = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        sm, reasons = (1600, "0x0000000000000004") if i < 20 else (1950, "0x0000000000000000")
        rows.append(f"{when}, {sm} MHz, 2619 MHz, {500 if i < 20 else 450}.00 W, 40, {reasons}")
    rows.append("2026/12/05 18:53")  # a last line cut off by the logger's end
    clocks = tmp_path / "clocks.csv"
    clocks.write_text("\n".join(rows) + "\n")

    def request(server, start, first_ms, step_ms, steps=8):
        return {"server": server, "prompt": 0, "started_unix_s": start,
                "token_ms": [first_ms + i * step_ms for i in range(steps + 1)]}

    reqs = [request("sage_attn", t0, 100.0, 11.0),  # prefill [t0, t0 + 0.1), steps until t0 + 0.188: at 1600
            request("triton", t0 + 1.5, 100.0, 10.0), request("sage_attn", t0 + 2.2, 100.0, 10.2)]  # at 1950
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"steps": {"8192": {"requests": reqs}, "8192 after 2 s": {"requests": reqs[1:]}}}))
    samples = sbc.read_clocks(clocks)
    assert len(samples) == 60 and samples[0].sm_mhz == 1600 and samples[-1].reasons == 0
    bins = sbc.by_clock(sbc.step_clocks(reqs, samples), 60)
    assert set(bins) == {1560, 1920}
    assert bins[1560] == {"sage_attn": {"median_ms": pytest.approx(11.0), "steps": 8}}
    assert bins[1920]["triton"] == {"median_ms": pytest.approx(10.0), "steps": 8}
    assert bins[1920]["sage_attn"]["median_ms"] == pytest.approx(10.2)
    equal = sbc.at_equal_clock(bins)
    assert equal == {"sage_attn": {"bin_mhz": 1920, "steps": 8, "ratio": pytest.approx(1.02)}}
    phases = sbc.phase_clocks(reqs, samples)
    prefill = phases["sage_attn"]["prefill"]  # samples at t0 and t0 + 0.05 (first request), 2.2 and 2.25 s (second)
    assert prefill["samples"] == 4 and prefill["sm_min_mhz"] == 1600 and prefill["power_capped"] == 0.5
    assert phases["triton"]["steps 1-4"]["sm_median_mhz"] == 1950 and phases["triton"]["steps 1-4"]["power_capped"] == 0
    out = tmp_path / "by_clock.json"
    assert sbc.main([str(gap), str(clocks), "--json", str(out)]) == 0  # every set of steps in the file
    printed = capsys.readouterr().out
    assert "## decode steps: 8192\n" in printed and "## decode steps: 8192 after 2 s\n" in printed
    assert printed.count("sage_attn: 1.0200 at 1920-1979 MHz (8 steps)") == 2  # the later set lacks the 1600 MHz request
    got = json.loads(out.read_text())
    assert got["8192"]["at_equal_clock"]["sage_attn"]["bin_mhz"] == 1920
    assert "1560" in got["8192"]["by_clock"] and "1560" not in got["8192 after 2 s"]["by_clock"]
    assert sbc.main([str(gap), str(clocks), "--length", "8192 after 2 s"]) == 0
    assert "## decode steps: 8192\n" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no decode steps at length 512"):
        sbc.main([str(gap), str(clocks), "--length", "512"])
    # the same samples as ttft_gap.py logs them itself (NVML, this process's clock): the same tables, without the CSV
    own = [[x.t, 0, x.sm_mhz, x.power_w, x.reasons] for x in samples]
    gap.write_text(json.dumps({"steps": {"8192": {"requests": reqs}, "8192 after 2 s": {"requests": reqs[1:]}},
                               "steps_clocks": {"logged": True, "samples": own[::-1]}}))  # any order
    assert sbc.main([str(gap), str(clocks)]) == 0
    from_csv = capsys.readouterr().out
    assert sbc.main([str(gap)]) == 0 and capsys.readouterr().out == from_csv == printed
    gap.write_text(json.dumps({"steps": {"8192": {"requests": reqs}},
                               "steps_clocks": {"logged": False, "why_not": "the run is on the CPU, not a GPU"}}))
    with pytest.raises(SystemExit, match=r"no clock samples in .*gap.json \(the run is on the CPU, not a GPU\)"):
        sbc.main([str(gap)])
