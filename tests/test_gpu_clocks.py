"""The GPU clock log beside 04's timings (sagecheck.gpu_clocks): which NVML GPU a CUDA device is, the samples of each
timed request's own server or implementation, the figures of a set of samples, and the words 04 says of them."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from sagecheck import gpu_clocks as G

H100 = ("NVIDIA H100 80GB HBM3", "GPU-aaaa-1111")
H100B = ("NVIDIA H100 80GB HBM3", "GPU-bbbb-2222")
L4 = ("NVIDIA L4", "GPU-cccc-3333")


SAME = [H100, H100B, (H100[0], "GPU-dddd-4444")]
MIXED = [H100, H100B, L4]


@pytest.mark.parametrize("devices, env, ordinals, want", [
    (SAME, {}, [0, 1], [0, 1]),  # no CUDA_VISIBLE_DEVICES, GPUs of one model: CUDA's order is the PCI bus order
    (SAME, {"CUDA_VISIBLE_DEVICES": "1"}, [0], [1]),
    (SAME, {"CUDA_VISIBLE_DEVICES": "2, 0"}, [0, 1], [0, 2]),
    (MIXED, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, [0], [1]),  # a UUID prefix, as CUDA takes it; any order then
    (MIXED, {"CUDA_VISIBLE_DEVICES": "GPU-cccc-3333,GPU-aaaa-1111"}, [1], [0]),
    (MIXED, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, [2], [2]),  # mixed models, but CUDA told to count by bus
])
def test_a_cuda_device_is_the_nvml_gpu_its_environment_names(devices, env, ordinals, want):
    assert G.nvml_targets(ordinals, devices, env) == (want, None)


@pytest.mark.parametrize("env, ordinals, why", [
    ({}, [0], "fastest first"),  # GPUs of different models: CUDA's default order is not NVML's
    ({"CUDA_VISIBLE_DEVICES": "0"}, [1], "not among CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "MIG-1234"}, [0], "MIG instance"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-"}, [0], "matches 3 of NVML's GPUs"),
    ({"CUDA_VISIBLE_DEVICES": "7"}, [0], "not among NVML's 3 GPUs"),
    ({"CUDA_VISIBLE_DEVICES": "first"}, [0], "neither an index nor a GPU UUID"),
])
def test_a_cuda_device_it_cannot_tell_is_not_guessed(env, ordinals, why):
    got, words = G.nvml_targets(ordinals, [H100, H100B, L4], env)
    assert got is None and why in words


def test_the_figures_of_a_set_of_samples():
    samples = [G.Sample(0.0, 0, 1980, 120.0, 0x0), G.Sample(0.05, 0, 1590, 510.0, 0x4),
               G.Sample(0.10, 0, 1800, 500.0, 0x4 | 0x1), G.Sample(0.15, 0, 1965, None, 0x1),
               G.Sample(0.20, 0, 1700, 480.0, 0x40)]
    st = G.clock_stats(samples)
    assert st == {"sm_median_mhz": 1800, "sm_min_mhz": 1590, "power_median_w": 490.0, "limited_pct": 60.0,
                  "power_capped_pct": 40.0, "samples": 5}  # idle (0x1) holds nothing down; thermal (0x40) does
    assert G.clock_stats([]) is None
    assert G.reason_words(0x4 | 0x40 | 0x1) == "software power cap, hardware thermal slowdown"


class RunningReader:
    """A GPU whose SM clock is that of whoever runs on it now (``running[0]``), every reading stamped by the log."""

    def __init__(self, clocks: dict[str, float], running: list[str], fail_after: int | None = None) -> None:
        self.clocks, self.running, self.reads, self.fail_after, self.closed = clocks, running, 0, fail_after, False

    def gpus(self):
        return [{"index": 3, "name": "stand-in GPU", "uuid": "GPU-0"}]

    def read(self):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise RuntimeError("GPU is lost")
        who = self.running[0]
        return [(3, self.clocks[who], 400.0, 0x4 if who.startswith("sage_attn") else 0x0)]

    def close(self):
        self.closed = True


class TimedServer:
    """A stand-in server: its prefill and decode take fixed times, during which it is the one running on the GPU."""

    def __init__(self, name: str, running: list[str], prefill_s: float, decode_s: float) -> None:
        self.name, self.running, self.prefill_s, self.decode_s = name, running, prefill_s, decode_s

    def reset_cache(self):
        pass

    def streamed_timing(self, prompts, decode_tokens):
        t0 = time.perf_counter()
        self.running[0] = f"{self.name}:prefill"
        time.sleep(self.prefill_s)
        ttft = (time.perf_counter() - t0) * 1e3
        self.running[0] = f"{self.name}:decode"
        time.sleep(self.decode_s)
        total = (time.perf_counter() - t0) * 1e3
        self.running[0] = "idle"
        return ttft, total


def test_each_timed_request_gets_the_samples_taken_while_it_ran():
    """Three servers take turns; the GPU's clock is that of the one running. Each row's prefill and decode clocks are
    its own server's, none of another's or of the idle time between requests."""
    from sagecheck.metrics.serving import measure_interleaved

    names = ["triton", "sage_attn", "triton copy"]
    clocks = {"idle": 300.0}
    for i, n in enumerate(names):
        clocks[f"{n}:prefill"], clocks[f"{n}:decode"] = 1500.0 + 100 * i, 1800.0 + 60 * i
    running = ["idle"]
    servers = {n: TimedServer(n, running, 0.04, 0.06) for n in names}
    windows = []
    with G.ClockLog([0], reader=RunningReader(clocks, running), interval_s=0.002) as log:
        measure_interleaved(servers, names, [[1, 2]], 4, repeats=6, warmup=1, windows=windows)
    assert len(windows) == 18 and {w[0] for w in windows} == set(names)
    assert all(a < b < c for _, a, b, c in windows)
    assert log.facts()["logged"] and log.facts()["gpus"][0]["index"] == 3 and log.facts()["samples"] > 100
    for n in names:
        f = log.phase_fields(windows, n)
        assert f["prefill_sm_mhz"] == clocks[f"{n}:prefill"] and f["decode_sm_mhz"] == clocks[f"{n}:decode"], (n, f)
        assert f["prefill_clock_samples"] >= 30 and f["decode_clock_samples"] >= 60
        # each timed repeat's own median, in the order run
        assert f["decode_sm_mhz_by_repeat"] == [clocks[f"{n}:decode"]] * 6, f["decode_sm_mhz_by_repeat"]
        assert f["prefill_sm_mhz_by_repeat"] == [clocks[f"{n}:prefill"]] * 6
        # only sage_attn's GPU is held down: no other server's request gets its samples (at a window's edge a sample
        # may be of the moment between its own phases, or of the idle gap, never of another server)
        assert f["decode_clock_limited_pct"] >= 95 if n == "sage_attn" else f["decode_clock_limited_pct"] == 0.0
    assert log._reader.closed


def test_a_clock_log_that_cannot_log_says_why_and_logs_nothing():
    log = G.ClockLog(None, "the run is on the CPU, not a GPU")
    with log:
        pass
    assert log.facts()["logged"] is False and log.facts()["why_not"] == "the run is on the CPU, not a GPU"
    assert log.phase_fields([("a", 0.0, 1.0, 2.0)], "a") == {}

    class Unmappable(RunningReader):
        def gpus(self):
            raise LookupError("CUDA device 0 is a MIG instance (MIG-1): NVML's clocks are the whole GPU's")

    with G.ClockLog([0], reader=Unmappable({}, ["idle"])) as log:
        pass
    assert not log.logging and "MIG instance" in log.facts()["why_not"]


def test_a_gpu_that_stops_answering_ends_the_log_and_keeps_its_samples():
    reader = RunningReader({"idle": 1000.0}, ["idle"], fail_after=5)
    with G.ClockLog([0], reader=reader, interval_s=0.001) as log:
        deadline = time.time() + 5
        while log.why_not is None and time.time() < deadline:
            time.sleep(0.01)
    assert len(log.samples) == 5 and "stopped answering after 5 samples" in log.why_not and "GPU is lost" in log.why_not
    assert log.facts()["logged"] is True


def test_nvml_is_read_as_its_api_gives_it(monkeypatch):
    """The NVML reader against a stand-in of pynvml's API: the GPU of CUDA_VISIBLE_DEVICES, milliwatts to watts, the
    clocks event reasons (the older throttle-reasons call where the newer is missing), and NVML shut down after."""
    calls = []

    class NVMLError(Exception):
        pass

    handles = {i: SimpleNamespace(i=i) for i in range(2)}
    fake = SimpleNamespace(
        NVML_CLOCK_SM=1, NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetName=lambda h: [b"NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"][h.i],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h.i}",
        nvmlDeviceGetClockInfo=lambda h, kind: {1: 1755 + h.i}[kind],
        nvmlDeviceGetPowerUsage=lambda h: 512_500,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x4,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 500_000, nvmlDeviceGetPowerManagementDefaultLimit=lambda h: 700_000,
        nvmlDeviceGetMaxClockInfo=lambda h, kind: {1: 1980}[kind])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    r = G.NvmlReader([0])
    assert r.gpus() == [{"index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "power_limit_w": 500.0,
                         "power_limit_default_w": 700.0, "sm_clock_max_mhz": 1980.0}]
    assert r.read() == [(1, 1756.0, 512.5, 0x4)]
    r.close()
    assert calls == ["init", "shutdown"]
    # 00's record of each GPU: its limits, by the same mapping
    assert G.gpu_limits(0) == {"power_limit_w": 500.0, "power_limit_default_w": 700.0, "sm_clock_max_mhz": 1980.0}
    del fake.nvmlDeviceGetPowerManagementDefaultLimit  # a driver that does not say: None, not a failure
    assert G.gpu_limits(0)["power_limit_default_w"] is None and calls[-2:] == ["init", "shutdown"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-9")
    with G.ClockLog([0]) as log:  # the mapping fails: NVML is shut down again and the log says why
        pass
    assert not log.logging and "MIG instance" in log.why_not and calls[-2:] == ["init", "shutdown"]


def test_without_nvml_the_log_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with G.ClockLog([0]) as log:
        pass
    assert not log.logging and log.why_not.startswith("NVML not available (")
    assert G.gpu_limits(0) == {}


def test_a_gpus_limits_in_words():
    assert G.limit_words({"power_limit_w": 500.0, "power_limit_default_w": 700.0, "sm_clock_max_mhz": 1980.0}) == \
        "power limit 500 W of 700 W default, SM clock up to 1980 MHz"
    assert G.limit_words({"power_limit_w": 700.0, "power_limit_default_w": 700.0}) == "power limit 700 W (its default)"
    assert G.limit_words({"power_limit_w": 700.0, "power_limit_default_w": None}) == "power limit 700 W"
    assert G.limit_words({"name": "x"}) == ""


def rows(cand_mhz, base_mhz, copy_mhz=None, n=8192, repeats=6):
    """One point's rows; a clock is one figure for every repeat, or a list of the repeats' (per-repeat medians)."""
    def row(impl, mhz):
        each = list(mhz) if isinstance(mhz, (list, tuple)) else [mhz] * repeats
        return {"status": "ok", "batch": 1, "input_length": n, "implementation": impl, "decode_sm_mhz": float(np.median(
                [x for x in each if x is not None])), "decode_sm_mhz_by_repeat": each,
                "decode_clock_limited_pct": 100.0, "decode_speedup": 0.98, "decode_clock_samples": 40}
    out = [row("sage_attn", cand_mhz), row("triton", base_mhz)]
    return out + ([row("triton copy", copy_mhz)] if copy_mhz is not None else [])


def sweep(rows_, copy="triton copy", facts=None, baseline="triton", candidate="sage_attn"):
    from sagecheck.metrics.throughput import Sweep

    return Sweep(rows_, baseline, candidate, [8192], [1], "H100, sage_attn vs triton", served={"servers": {}, "order": "a Williams design",
                                                                         "clock": "client wall clock"},
                 copy=copy, gpu_clocks=facts if facts is not None else {
                     "logged": True, "why_not": None, "interval_ms": 50, "samples": 900, "source": "NVML (pynvml)",
                     "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "power_limit_w": 500.0,
                               "power_limit_default_w": 700.0, "sm_clock_max_mhz": 1980.0}]})


def test_04_says_where_the_candidate_decoded_at_a_lower_clock():
    from sagecheck.metrics import throughput as T

    low = sweep(rows(1800, 1965, 1950))
    (flag,) = T.lower_decode_clocks(low)
    assert (flag["candidate_mhz"], flag["baseline_mhz"], flag["copy_mhz"]) == (1800, 1965, 1950)
    words = T.clock_words(low)
    assert "every 50 ms" in words and ("GPU 0 (NVIDIA H100 80GB HBM3, power limit 500 W of 700 W default, SM clock up "
                                       "to 1980 MHz), 900 samples") in words
    assert "lower SM clock than the baseline** at 8192 x 1: 1800 against 1965 MHz (A/A copy 1950)" in words
    assert "decode speedup 0.98" in words
    # one clock step apart, or no further than the A/A copy is from the baseline: the same clock
    assert T.lower_decode_clocks(sweep(rows(1950, 1965, 1965))) == []
    assert T.lower_decode_clocks(sweep(rows(1900, 1965, 1890))) == []
    assert "lower SM clock" not in T.clock_words(sweep(rows(1950, 1965, 1965)))
    assert len(T.lower_decode_clocks(sweep(rows(1900, 1965), copy=None))) == 1  # no copy: two steps suffice
    assert (flag["lower_in_repeats"], flag["paired_repeats"], flag["median_gap_mhz"]) == (6, 6, 165.0)
    assert "lower in 6 of 6 repeats" in words and "sign test, p < 0.05" in words
    assert T.clock_words(sweep(rows(1950, 1965, 1965))).endswith("It was lower at no point.")
    clocked = [t for t in T.tables(low) if t[1].startswith("GPU clocks while each ran")]
    assert len(clocked) == 1 and len(clocked[0][0]) == 3 and "every 50 ms" in clocked[0][1]


def test_a_lower_median_clock_that_swings_from_repeat_to_repeat_is_not_named():
    """Under a power cap the clock swings on every server alike: the H100 run of 2026-12-05 had medians of 1560
    (sage_attn, its prefill on Triton's kernel like the baseline's) against 1650 MHz at 128 x 32. Medians two steps
    apart, but lower in only some repeats, say nothing about the candidate; lower in (nearly) every repeat does."""
    from sagecheck.metrics import throughput as T

    base = [1700, 1690, 1680, 1500, 1490, 1480]
    swinging = [1500, 1490, 1480, 1560, 1550, 1540]  # lower in 3 of 6 repeats (by 200 MHz), higher in 3 (by 60)
    assert np.median(base) - np.median(swinging) == 70 and np.median(np.subtract(base, swinging)) == 70
    assert T.lower_decode_clocks(sweep(rows(swinging, base, base))) == []
    five = [b - 90 for b in base[:5]] + [base[5] + 15]  # lower in 5 of 6: p = 7/64, as likely as not by chance
    assert T.lower_decode_clocks(sweep(rows(five, base, base))) == []
    twelve_base = base * 2
    eleven = [b - 90 for b in twelve_base[:11]] + [twelve_base[11] + 15]  # 11 of 12: p = 13/4096
    (flag,) = T.lower_decode_clocks(sweep(rows(eleven, twelve_base, twelve_base, repeats=12)))
    assert (flag["lower_in_repeats"], flag["paired_repeats"]) == (11, 12) and flag["sign_test_p"] == 13 / 4096
    # repeats with no sample in one of the two windows are left out of the pairs; rows without per-repeat clocks
    # (a run from before they were kept) are not judged
    gaps = [1800, None, 1800, 1800, 1800, 1800, 1800]
    (flag,) = T.lower_decode_clocks(sweep(rows(gaps, [1965] * 7, [1965] * 7)))
    assert flag["paired_repeats"] == 6
    bare = rows(1800, 1965, 1950)
    for r in bare:
        del r["decode_sm_mhz_by_repeat"]
    assert T.lower_decode_clocks(sweep(bare)) == []


def test_the_sign_test_is_the_binomial_tail():
    """Against the tail counted by hand: P(X >= more) for X ~ Binomial(more + fewer, 1/2)."""
    import math

    for more, fewer in ((6, 0), (5, 1), (11, 1), (3, 3), (0, 4), (9, 2)):
        n = more + fewer
        assert G.sign_test_p(more, fewer) == pytest.approx(
            sum(math.comb(n, k) for k in range(more, n + 1)) / 2 ** n, rel=1e-12)
    assert (G.sign_test_p(6, 0), G.sign_test_p(5, 1), G.sign_test_p(11, 1)) == pytest.approx((1 / 64, 7 / 64, 13 / 4096))
    assert G.sign_test_p(0, 0) == 1.0
    assert G.paired_clock_gaps([1965, None, 1950], [1800, 1800, None]) == [165]
    assert G.paired_clock_gaps([1965], [1800, 1800]) is None and G.paired_clock_gaps(None, [1800]) is None


def test_04_says_why_it_logged_no_clocks():
    from sagecheck.metrics import throughput as T

    s = sweep(rows(1800, 1965), facts={"logged": False, "why_not": "the run is on the CPU, not a GPU"})
    assert T.clock_words(s) == "GPU clocks: not logged (the run is on the CPU, not a GPU)."
    assert T.clock_words(sweep(rows(1800, 1965), facts={})) is None


def test_the_sglang_servers_gpus_are_read_from_their_flags():
    from sagecheck.engines.sglang import extra_arg, servers_gpus
    from sagecheck.sources import load

    def gpus(*overrides):
        return servers_gpus(load(None, ["engine=sglang", *overrides]))

    assert gpus() == ([0], "")
    assert gpus("sglang.tp=2", "sglang.extra_args=[--base-gpu-id, '2']") == ([2, 3], "")
    assert gpus("sglang.extra_args=[--base-gpu-id=1]") == ([1], "")
    got, why = gpus("sglang.url=http://elsewhere:30000")
    assert got is None and "given by URL" in why
    assert gpus("device=cpu") == (None, "the run is on the CPU, not a GPU")
    # the flag reader limits() uses too: either spelling, the last one counting (as argparse does), None where absent
    assert extra_arg(["--chunked-prefill-size", "512", "--chunked-prefill-size=1024"], "--chunked-prefill-size") == 1024
    assert extra_arg(["--cuda-graph-max-bs", 4], "--cuda-graph-max-bs") == 4
    assert extra_arg(["--cuda-graph-max-bs-prefill", "2048"], "--cuda-graph-max-bs") is None
    assert extra_arg(["--base-gpu-id"], "--base-gpu-id") is None and extra_arg(None, "--tp") is None


def test_the_in_process_sweep_gives_each_implementation_its_own_clocks(builtin):
    """The built-in model on the CPU, a stand-in GPU whose clock is that of the attention implementation the model
    runs now: each row's clocks are its own implementation's."""
    from sagecheck.metrics import throughput as T

    clocks = {"sdpa": 1965.0, "sage-emulated": 1590.0}
    running = [None]

    class ImplementationReader(RunningReader):
        def read(self):
            return [(0, clocks.get(builtin.current_implementation(), 0.0), 300.0, 0)]

    with G.ClockLog([0], reader=ImplementationReader({}, running), interval_s=0.001) as log:
        rows_, _ = T.sweep(builtin, ("sdpa", "sage-emulated"), [64], [2], decode_tokens=6, repeats=5, warmup=0, seed=0,
                           repeat_point=False, clocks=log)
    for r in rows_:
        assert r["decode_clock_samples"] > 0 and r["decode_sm_mhz"] == clocks[r["implementation"]], r
        assert r["prefill_clock_samples"] > 0 and r["prefill_sm_mhz"] == clocks[r["implementation"]], r
        assert r["decode_sm_mhz_by_repeat"] == [clocks[r["implementation"]]] * 5, r
    # lower in all 5 repeats (p = 1/32): 04 names the point
    (flag,) = T.lower_decode_clocks(sweep([{**r, "decode_speedup": 1.0} for r in rows_], copy=None,
                                                baseline="sdpa", candidate="sage-emulated"))
    assert (flag["candidate_mhz"], flag["baseline_mhz"], flag["lower_in_repeats"]) == (1590.0, 1965.0, 5)


@pytest.mark.gpu
def test_the_gpu_clock_log_reads_this_gpu():
    """On a GPU: NVML's GPU for CUDA device 0 is the one torch names, and its samples are real clocks."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with G.ClockLog([0], interval_s=0.01) as log:
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            x = x @ x / 64
        torch.cuda.synchronize()
        time.sleep(0.1)
    assert log.logging, log.why_not
    assert log.gpus[0]["name"] == torch.cuda.get_device_name(0)
    assert log.gpus[0]["power_limit_w"] > 50 and log.gpus[0]["sm_clock_max_mhz"] > 500
    assert len(log.samples) >= 5 and all(s.sm_mhz > 100 and s.power_w and s.power_w > 10 for s in log.samples)
