"""The dispatch rule of sage_attn (sagecheck.sglang_plugin.dispatch): the crossover from timings, the route of a batch,
the measurement with timers standing in for the GPU's, and the setting. The measurement on a real GPU: the plugin's
statistics of a real server (tests/test_sglang_gpu.py)."""

from __future__ import annotations

import pytest

from sagecheck.sglang_plugin import dispatch as D
from sagecheck.sglang_plugin.settings import SageAttnUnavailable, Settings


def test_the_crossover_is_where_the_kernel_stays_ahead():
    lengths = [512, 1024, 2048, 4096, 8192]
    assert D.crossover_from(lengths, [3, 3, 3, 3, 3], [1, 2, 3, 4, 5]) == 2048  # equal counts as ahead
    # ahead at 1024 by chance, behind at 2048: the crossover is where it stays ahead
    assert D.crossover_from(lengths, [3, 1, 4, 3, 3], [1, 2, 3, 4, 5]) == 4096
    assert D.crossover_from(lengths, [2, 3, 4, 5, 6], [1, 2, 3, 4, 5]) is None  # never
    assert D.crossover_from(lengths, [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]) == 512  # always


def test_a_batch_goes_to_the_kernel_when_most_of_its_work_is_in_long_requests():
    at_4k = D.Crossover("set", 4096, "test")
    assert D.to_kernel([0], [8192], at_4k) and not D.to_kernel([0], [128], at_4k)
    assert D.to_kernel([4096], [4096], at_4k), "a chunk after a long prefix has as many keys as a long request"
    assert not D.to_kernel([0] * 32, [512] * 32, at_4k), "many short requests are short work each"
    # one 8k request among 16 short ones: 8192²/2 pairs against 16 x 256²/2, the kernel
    assert D.to_kernel([0] * 17, [8192] + [256] * 16, at_4k)
    # a 4096-key request and enough short ones to hold more than half the pairs: Triton
    assert not D.to_kernel([0] * 300, [4096] + [300] * 299, at_4k)
    assert D.to_kernel([0], [1], D.Crossover("kernel", 0, "test"))
    assert not D.to_kernel([0], [100_000], D.Crossover("measured", None, "test")), "never faster: never"


def test_the_measurement_times_each_length_and_keeps_its_timings():
    timed: list[tuple[str, int]] = []

    def timer(kind: str, ms_at):
        def make(n: int):
            timed.append((kind, n))
            return lambda: ms_at(n)
        return make

    # the kernel path's fixed cost 0.5 ms, Triton's quadratic cost twice the kernel's
    timers = D.Timers(timer("kernel", lambda n: 0.5 + (n / 1024) ** 2), timer("triton", lambda n: 0.05 + 2 * (n / 1024) ** 2),
                      timer("alone", lambda n: 0.1 + (n / 1024) ** 2))
    got = D.measure(timers, max_length=8192, where="a test", time=lambda fn: [fn(), fn() + 0.01, fn() - 0.01])
    assert got.lengths == (256, 512, 1024, 2048, 4096, 8192) and 16384 not in [n for _, n in timed]
    assert got.keys == 1024  # 0.5 + 1 <= 0.05 + 2 from 1024 keys on; 512: 0.75 > 0.55
    assert got.kernel_ms[2] == pytest.approx(1.5) and got.triton_ms[2] == pytest.approx(2.05)
    assert got.kernel_alone_ms[0] == pytest.approx(0.1625)
    assert "from 1024 keys per request" in got.describe() and "measured at start: a test" in got.describe()
    assert got.as_dict()["lengths"] == [256, 512, 1024, 2048, 4096, 8192]


def test_the_setting_fixes_the_rule_or_leaves_it_to_the_measurement():
    assert D.from_setting("measured") is None
    assert D.from_setting("kernel").mode == "kernel"
    assert D.from_setting("6000").keys == 6000
    assert Settings.from_env({}).dispatch == "measured"
    assert Settings.from_env({"SAGE_ATTN_DISPATCH": "4096"}).dispatch == "4096"
    for bad in ("fast", "-1", "0", "4k"):
        with pytest.raises(SageAttnUnavailable, match="not a dispatch rule; use measured, kernel or a number"):
            Settings.from_env({"SAGE_ATTN_DISPATCH": bad})


def test_requests_over_a_cached_prefix_follow_their_own_measured_crossover():
    """The H100 of 2026-12-05: a cold request of 8192 keys ran faster on the kernel path, a chunk of 4096 after a
    cached 4096 slower (the split's gathers and merge). Where the prefix path is measured, a prefix extend needs its
    own crossover; a cold request keeps the cold one."""
    timers = D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096),  # cold: the kernel from 4096 keys
                      kernel_path_prefix=lambda n: (lambda: 2.0), triton_prefix=lambda n: (lambda: n / 8192))
    got = D.measure(timers, max_length=16384, where="a test", time=lambda fn: [fn()])
    assert got.keys == 4096 and got.prefix_measured and got.prefix_keys == 16384
    assert got.prefix_kernel_ms == (2.0,) * 7 and got.prefix_triton_ms[-1] == pytest.approx(2.0)
    assert D.to_kernel([0], [8192], got), "a cold request of 8192 keys: the kernel"
    assert not D.to_kernel([4096], [4096], got), "a chunk of 4096 after 4096: Triton, by the prefix crossover"
    assert D.to_kernel([8192], [8192], got)
    # a batch mostly of cold long work stays on the kernel though one request has a short cached prefix
    assert D.to_kernel([0, 100], [8192, 100], got)
    assert "the kernel from 4096 keys per request, over a cached prefix from 16384 keys" in got.describe()
    # the facts the report reads carry the rule's answer per measured length, for a cold request and a half-cached one
    facts = got.as_dict()
    assert facts["routes"] == ["Triton"] * 4 + ["kernel"] * 3 and facts["prefix_routes"] == ["Triton"] * 6 + ["kernel"]
    assert "prefix_routes" not in D.measure(D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096)), 16384, "t",
                                            time=lambda fn: [fn()]).as_dict()
    never = D.measure(D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096), kernel_path_prefix=lambda n: (lambda: 9.0),
                               triton_prefix=lambda n: (lambda: 0.1)), 16384, "a test", time=lambda fn: [fn()])
    assert never.prefix_keys is None and not D.to_kernel([8192], [8192], never) and "extends over a cached prefix on Triton" in never.describe()
    # a crossover set by hand or a measurement without the prefix timers: prefix extends follow the one crossover
    assert D.to_kernel([4096], [4096], D.Crossover("set", 4096, "test"))
    neither = D.measure(D.Timers(lambda n: (lambda: 9.0), lambda n: (lambda: 0.1), kernel_path_prefix=lambda n: (lambda: 9.0),
                                 triton_prefix=lambda n: (lambda: 0.1)), 16384, "a test", time=lambda fn: [fn()])
    assert neither.describe().startswith("every extend batch on Triton: the kernel was slower at every measured length, "
                                         "with a cached prefix or without")
    assert not D.to_kernel([0, 4096], [16384, 4096], neither)
    cold_only = D.measure(D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096)), 16384, "a test", time=lambda fn: [fn()])
    assert not cold_only.prefix_measured and D.to_kernel([4096], [4096], cold_only)


def test_a_failed_prefix_measurement_leaves_the_cold_crossover_and_says_why():
    def broken(n):
        raise RuntimeError("no prefix buffer\nsecond line")

    got = D.measure(D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096), kernel_path_prefix=broken,
                             triton_prefix=lambda n: (lambda: 1.0)), 16384, "a test", time=lambda fn: [fn()])
    assert got.keys == 4096 and not got.prefix_measured and got.prefix_kernel_ms == ()
    assert got.error == "the prefix measurement failed: RuntimeError: no prefix buffer"
    assert got.describe() == "the kernel from 4096 keys per request (measured at start: a test; the prefix measurement " \
                             "failed: RuntimeError: no prefix buffer)"
    assert D.to_kernel([4096], [4096], got)  # the cold rule for every request, as before the prefix measurement


def test_device_timings_are_kept_beside_the_route_timings_and_a_call_that_waits_is_not_timed():
    """``device_time`` (the GPU's own time, dispatch.device_ms) times the kernel path and the bare kernel again; the
    route keeps ``time``'s figures. A length whose call could not be timed on the GPU alone (None) stays None."""
    timers = D.Timers(lambda n: (lambda: 1.0), lambda n: (lambda: n / 4096), lambda n: (lambda: 0.5))
    gpu = {1.0: 0.55, 0.5: 0.5}

    def device_time(fn):
        ms = fn()
        return [None] if ms == 1.0 and gpu.get("waits") else [gpu[ms]]

    got = D.measure(timers, max_length=1024, where="a test", time=lambda fn: [fn()], device_time=device_time)
    assert got.kernel_device_ms == (0.55, 0.55, 0.55) and got.kernel_alone_device_ms == (0.5, 0.5, 0.5)
    assert got.kernel_ms == (1.0, 1.0, 1.0) and got.keys is None, "the route is the host-inclusive timing's"
    assert "host ahead" in got.device_timing and got.as_dict()["kernel_device_ms"] == [0.55, 0.55, 0.55]
    gpu["waits"] = True
    assert D.measure(timers, 1024, "a test", time=lambda fn: [fn()], device_time=device_time).kernel_device_ms == (None,) * 3
    # without a bare-kernel timer there is nothing to set the path against: no device timings, none said
    bare_less = D.Timers(timers.kernel_path, timers.triton)
    got = D.measure(bare_less, 1024, "a test", time=lambda fn: [fn()], device_time=device_time)
    assert got.kernel_device_ms == () and got.device_timing == ""
    assert D.median_or_none([1.0, None, 2.0]) is None and D.median_or_none([1.0, 3.0, 2.0]) == 2.0


@pytest.mark.gpu
def test_device_ms_times_the_gpu_alone_and_refuses_a_call_that_waits_for_it():
    """On a GPU: a call whose host work (2 ms of sleep) outlasts its GPU work reads its GPU time in device_ms, not the
    host's 2 ms that cuda_ms reads; a GPU-bound matmul reads alike in both; a call that synchronizes is not timed."""
    import time

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def host_bound():
        time.sleep(0.002)
        x.add_(0)

    host, gpu = D.median_or_none(D.cuda_ms(host_bound)), D.median_or_none(D.device_ms(host_bound))
    assert host >= 1.9 and gpu is not None and gpu < 0.5, (host, gpu)
    matmul = lambda: x @ x  # noqa: E731 - ~0.2 ms of GPU work, launched in microseconds
    a, b = D.median_or_none(D.cuda_ms(matmul)), D.median_or_none(D.device_ms(matmul))
    assert b is not None and abs(a - b) / a < 0.25, (a, b)
    waits = lambda: x.sum().item()  # noqa: E731
    assert D.device_ms(waits, warmup=1, repeats=2) == (None, None)
