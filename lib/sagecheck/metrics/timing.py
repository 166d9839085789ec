"""Timing: CUDA events on a GPU, a monotonic clock on the CPU; warm-up, repeats, median and spread."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

NO_CONTROL = "no A/A control"  # a served point's class where the A/A control's copy did not serve (serving.classify)

if TYPE_CHECKING:  # torch is imported where it is used: the report reads these modules' results without it
    import torch


@dataclass
class Samples:
    """Repeated measurements of one quantity (milliseconds, or a ratio)."""

    values: np.ndarray
    clock: str  # "cuda-events" or "cpu-monotonic"

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.values, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.values, 90))

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self.values, [25, 75])
        return float(q3 - q1)

    @property
    def spread_pct(self) -> float:
        """Interquartile range relative to the median, in percent."""
        return 100.0 * self.iqr / self.median if self.median else float("nan")


class Stopwatch:
    """Elapsed milliseconds of a region: CUDA events on a CUDA device, else a monotonic clock.

    CUDA work is asynchronous: the events are recorded on the current stream and the
    reading waits for the end event, so the figure is the device time of the region.
    """

    def __init__(self, device: torch.device) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.clock = "cuda-events" if self.cuda else "cpu-monotonic"

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = float(self._start.elapsed_time(self._end))
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


@contextlib.contextmanager
def gc_paused():
    """Collect garbage now, then keep the cyclic collector off for the timed region.

    A full collection of the heap that torch and transformers build is not free, and would land on whichever
    repeat happens to trigger it. ``timeit`` pauses the collector for the same reason.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_callable(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 2) -> Samples:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; one sample per run (ms)."""
    import torch

    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    values = []
    clock = "cpu-monotonic"
    with gc_paused():
        for _ in range(repeats):
            with Stopwatch(device) as sw:
                fn()
            values.append(sw.ms)
            clock = sw.clock
    return Samples(np.asarray(values, dtype=np.float64), clock)


def paired_ratio(numerator: Samples, denominator: Samples) -> Samples:
    """Per-repeat ratios of two interleaved series (e.g. baseline time / candidate time = speedup)."""
    n = min(numerator.values.size, denominator.values.size)
    return Samples(numerator.values[:n] / denominator.values[:n], numerator.clock)


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start_us, end_us) intervals, in ms: time during which something ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _is_annotation(event: Any) -> bool:
    """A user range mirrored on the GPU's timeline, not work (its span would cover the gaps).

    The accessors differ between torch versions (torch 2.11's events have no activity_type).
    """
    flag = getattr(event, "is_user_annotation", None)
    if flag is not None and flag():
        return True
    kind = getattr(event, "activity_type", None)
    return kind is not None and "annotation" in str(kind()).lower()


def gpu_busy_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Time the GPU spent running what ``fn`` launched (kernels, copies), gaps between launches left out.

    Read from the profiler's device activity (CUPTI): the union of the intervals of the
    device events, so streams that overlap are not counted twice. Where the host cannot
    launch work as fast as the GPU runs it (an eager decode loop, one Python step per
    token) the wall-clock time measures the host; this figure is the device's share of it,
    a lower bound of what the work costs once launches are hidden (CUDA graphs).
    """
    import torch

    if torch.device(device).type != "cuda":
        raise ValueError("GPU busy time needs a CUDA device")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    # the raw events: prof.events() would build Python objects for every kernel (seconds per call)
    spans = [(e.start_ns() / 1e3, e.end_ns() / 1e3) for e in prof.profiler.kineto_results.events()
             if e.device_type() == DeviceType.CUDA and not _is_annotation(e)]
    if not spans:
        raise RuntimeError("the profiler recorded no GPU activity")
    return busy_ms(spans)


# --------------------------------------------------------------------------- what both speed sweeps share


def random_prompts(vocab_size: int, batch: int, length: int, seed: int, device: torch.device, low: int = 16) -> torch.Tensor:
    """Seeded random token ids (never all zeros; special ids below ``low`` avoided)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + length)
    return torch.randint(low, vocab_size, (batch, length), generator=gen).to(device)


def timing_row(batch: int, length: int, implementation: str, prefill: Samples, decode: Samples, decode_steps: int,
               prefill_gpu: Samples | None = None, decode_gpu: Samples | None = None) -> dict[str, Any]:
    """One table row: TTFT, prefill tokens/s, decode tokens/s per sequence and in total, with spreads.

    With the GPU's busy times: the decode step's kernel time and the share of the decode's
    elapsed time that the GPU was busy (low: the host's launches set the pace).
    """
    row = {
        "batch": batch, "input_length": length, "implementation": implementation, "status": "ok",
        "ttft_ms": prefill.median, "ttft_ms_p10": prefill.p10, "ttft_ms_p90": prefill.p90,
        "prefill_tok_s": batch * length / (prefill.median / 1e3),
        "decode_ms_per_token": decode.median / decode_steps,
        "decode_tok_s_per_seq": decode_steps / (decode.median / 1e3),
        "decode_tok_s_total": batch * decode_steps / (decode.median / 1e3),
        "prefill_spread_pct": prefill.spread_pct, "decode_spread_pct": decode.spread_pct,
        "repeats": int(prefill.values.size), "clock": prefill.clock,
    }
    if prefill_gpu is not None:
        row.update({"prefill_gpu_ms": prefill_gpu.median, "prefill_gpu_busy_pct": 100.0 * prefill_gpu.median / prefill.median})
    if decode_gpu is not None:
        row.update({"decode_gpu_ms_per_token": decode_gpu.median / decode_steps,
                    "decode_gpu_busy_pct": 100.0 * decode_gpu.median / decode.median})
    return row


def speedup_fields(base: dict[str, Samples], cand: dict[str, Samples]) -> dict[str, float]:
    """Candidate speedup (baseline time / candidate time, per repeat): median and 10th-90th percentiles.

    Also the speedup in GPU busy time (``*_kernel_speedup``) where both have it.
    """
    out = {}
    for kind in ("prefill", "decode"):
        ratio = paired_ratio(base[kind], cand[kind])
        out.update({f"{kind}_speedup": ratio.median, f"{kind}_speedup_p10": ratio.p10, f"{kind}_speedup_p90": ratio.p90})
        if f"{kind}_gpu" in base and f"{kind}_gpu" in cand:
            out[f"{kind}_kernel_speedup"] = base[f"{kind}_gpu"].median / cand[f"{kind}_gpu"].median
    return out


def progress_logger(path: str | Path | None) -> Callable[[str], None]:
    """A function that appends a timestamped line to ``path`` (nothing where None): a long sweep can be watched, and
    what ran is known if it is cut off."""
    def log(line: str) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    return log
