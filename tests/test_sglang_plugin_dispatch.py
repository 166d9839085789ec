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
