"""The GPU's SM clock, power and the driver's reasons for holding the clock down, sampled while a timing runs, so that
each timed request can be read with the clock its GPU ran at.

Why: a decode timed right after a power-dense prefill runs at a lower SM clock. On an H100 under its power cap
(2026-12-05, benchmarks/RESULTS.md) the SM clock in the first 16 decode steps after a SageAttention 2 prefill of 8192
tokens was 1590-1830 MHz against 1800-1928 after Triton's, with the same decode kernels on both servers: the decode's
ratio there carries the GPU's power state, and a reviewer cannot tell that from the attention path without the clock
beside it.

:class:`ClockLog` samples every ``interval_s`` (NVML through ``pynvml``, from a thread of this process: no subprocess,
and each sample stamped with this process's ``time.time()``, the clock the timings' windows use) the GPUs the timed
work runs on, given as CUDA ordinals of this process (:func:`nvml_targets` maps them to NVML's devices, which are in
PCI bus order, through ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``). Where it cannot log (no GPU, no NVML, a MIG
instance, an order it cannot map) it says why in ``why_not`` and logs nothing: the figures are context, never guessed.
"""

from __future__ import annotations

import bisect
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

# NVML's clocks event (throttle) reasons that hold the clock down for power or heat (nvml.h); idle (0x1), application
# clocks (0x2), sync boost (0x10) and display clocks (0x100) are not counted
REASONS = {0x4: "software power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
           0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}
POWER_CAP = 0x4
LIMITING = sum(REASONS)
CLOCK_STEP_MHZ = 15  # Hopper's SM clock moves in 15 MHz steps: two medians closer than this are the same clock


@dataclass(frozen=True)
class Sample:
    t: float  # unix seconds (time.time() of this process)
    gpu: int  # NVML index
    sm_mhz: float
    power_w: float | None  # NVML's power reading (averaged over about 1 s on Ampere and later)
    reasons: int  # clocks event reasons, a bit mask


class Reader(Protocol):
    """What :class:`ClockLog` samples: the GPUs it reads and one reading of each."""

    def gpus(self) -> list[dict[str, Any]]: ...  # [{"index", "name", "uuid"}]

    def read(self) -> list[tuple[int, float, float | None, int]]: ...  # [(index, sm MHz, power W, reasons)]

    def close(self) -> None: ...


def nvml_targets(ordinals: Sequence[int], devices: Sequence[tuple[str, str]],
                 env: Mapping[str, str] = os.environ) -> tuple[list[int] | None, str | None]:
    """The NVML indices of this process's CUDA devices ``ordinals``, or None and why they cannot be told.

    ``devices``: NVML's (name, uuid) per index (PCI bus order). ``CUDA_VISIBLE_DEVICES`` entries are ordinals, UUIDs or
    UUID prefixes (CUDA's rules); CUDA numbers the devices fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which
    is PCI bus order where every GPU is the same model (ties go by bus), and not known otherwise."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    entries = None if visible is None else [e.strip() for e in visible.split(",") if e.strip()]
    pci_order = env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or len({name for name, _ in devices}) <= 1
    out = []
    for o in ordinals:
        entry = str(o) if entries is None else (entries[o] if o < len(entries) else None)
        if entry is None:
            return None, f"CUDA device {o} is not among CUDA_VISIBLE_DEVICES={visible}"
        if entry.startswith("MIG-"):
            return None, f"CUDA device {o} is a MIG instance ({entry}): NVML's clocks are the whole GPU's"
        if entry.startswith("GPU-"):
            match = [i for i, (_, uuid) in enumerate(devices) if uuid.startswith(entry)]
            if len(match) != 1:
                return None, f"CUDA_VISIBLE_DEVICES entry {entry} matches {len(match)} of NVML's GPUs"
            out.append(match[0])
            continue
        if not entry.isdigit():
            return None, f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a GPU UUID"
        if int(entry) >= len(devices):
            return None, f"CUDA device {entry} is not among NVML's {len(devices)} GPUs"
        if not pci_order:
            return None, ("CUDA numbers these GPUs (of different models) fastest first, NVML by PCI bus: set "
                          "CUDA_DEVICE_ORDER=PCI_BUS_ID or name the GPUs by UUID in CUDA_VISIBLE_DEVICES")
        out.append(int(entry))
    return sorted(set(out)), None


class NvmlReader:
    """:class:`Reader` over NVML (``pynvml``, from nvidia-ml-py)."""

    def __init__(self, ordinals: Sequence[int]) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        try:
            devices = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                devices.append((_text(pynvml.nvmlDeviceGetName(h)), _text(pynvml.nvmlDeviceGetUUID(h))))
            targets, why = nvml_targets(ordinals, devices)
            if targets is None:
                raise LookupError(why)
            self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in targets]
            self._gpus = [{"index": i, "name": devices[i][0], "uuid": devices[i][1], **limits(pynvml, h)}
                          for i, h in self._handles]
            self._reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        except BaseException:
            pynvml.nvmlShutdown()
            raise

    def gpus(self) -> list[dict[str, Any]]:
        return self._gpus

    def read(self) -> list[tuple[int, float, float | None, int]]:
        nv, out = self.nv, []
        for i, h in self._handles:
            try:
                power = nv.nvmlDeviceGetPowerUsage(h) / 1e3
            except nv.NVMLError:
                power = None
            out.append((i, float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)), power, int(self._reasons(h))))
        return out

    def close(self) -> None:
        self.nv.nvmlShutdown()


def limits(nv: Any, handle: Any) -> dict[str, float | None]:
    """The GPU's power limit in force and its default (W), and its highest SM clock (MHz): a GPU capped below its
    default limit holds a power-dense kernel, and the work after it, at lower clocks. None where NVML does not say."""
    def ask(fn: str, *args: Any, scale: float = 1.0) -> float | None:
        try:
            return getattr(nv, fn)(handle, *args) / scale
        except Exception:
            return None

    return {"power_limit_w": ask("nvmlDeviceGetEnforcedPowerLimit", scale=1e3),
            "power_limit_default_w": ask("nvmlDeviceGetPowerManagementDefaultLimit", scale=1e3),
            "sm_clock_max_mhz": ask("nvmlDeviceGetMaxClockInfo", getattr(nv, "NVML_CLOCK_SM", 1))}


def gpu_limits(ordinal: int) -> dict[str, Any]:
    """:func:`limits` of this process's CUDA device ``ordinal`` (its NVML GPU); {} where NVML or the mapping is not
    available."""
    try:
        reader = NvmlReader([ordinal])
    except Exception:
        return {}
    try:
        (gpu,) = reader.gpus()
        return {k: gpu[k] for k in ("power_limit_w", "power_limit_default_w", "sm_clock_max_mhz")}
    finally:
        reader.close()


def limit_words(gpu: Mapping[str, Any]) -> str:
    """'power limit 500 W of 700 W default, SM clock up to 1980 MHz' (the parts NVML gave)."""
    parts = []
    if gpu.get("power_limit_w") is not None:
        default = gpu.get("power_limit_default_w")
        parts.append(f"power limit {gpu['power_limit_w']:.0f} W"
                     + (f" of {default:.0f} W default" if default is not None and default != gpu["power_limit_w"]
                        else " (its default)" if default is not None else ""))
    if gpu.get("sm_clock_max_mhz") is not None:
        parts.append(f"SM clock up to {gpu['sm_clock_max_mhz']:.0f} MHz")
    return ", ".join(parts)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class ClockLog:
    """Samples the GPUs of ``ordinals`` every ``interval_s`` from a thread while it is open (``with ClockLog(...)``).

    ``ordinals`` None: there is nothing to log, for the reason ``why_none``. ``reader``: a :class:`Reader` in place of
    NVML (tests). A reading that fails ends the log there, with why in ``why_not``; the samples before it stay."""

    def __init__(self, ordinals: Sequence[int] | None, why_none: str = "", interval_s: float = 0.05,
                 reader: Reader | None = None) -> None:
        self.ordinals = None if ordinals is None else list(ordinals)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.gpus: list[dict[str, Any]] = []
        self.why_not: str | None = None
        if ordinals is None:
            self.why_not = why_none or "no GPU to log"
        self._reader = reader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ClockLog":
        if self.ordinals is None:
            return self
        try:
            if self._reader is None:
                self._reader = NvmlReader(self.ordinals)
            self.gpus = self._reader.gpus()
        except LookupError as e:
            self.why_not = str(e)
            return self
        except Exception as e:  # no pynvml, no driver: NVML's own words
            self.why_not = f"NVML not available ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            return self
        self._thread = threading.Thread(target=self._run, name="sagecheck-gpu-clocks", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.time()
            try:
                readings = self._reader.read()
            except Exception as e:
                self.why_not = f"NVML stopped answering after {len(self.samples)} samples ({type(e).__name__}: {e})"
                return
            t = (t0 + time.time()) / 2
            self.samples.extend(Sample(t, i, sm, power, reasons) for i, sm, power, reasons in readings)
            self._stop.wait(max(0.0, self.interval_s - (time.time() - t0)))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._reader is not None and self.ordinals is not None and self.gpus:
            self._reader.close()

    @property
    def logging(self) -> bool:
        return self._thread is not None

    def facts(self) -> dict[str, Any]:
        """What was logged, for the results: whether, why not, the GPUs, the interval and the number of samples."""
        return {"logged": self._thread is not None, "why_not": self.why_not, "gpus": self.gpus,
                "interval_ms": round(self.interval_s * 1e3), "samples": len(self.samples), "source": "NVML (pynvml)"}

    def phase_fields(self, windows: Sequence[tuple[str, float, float, float]], label: str) -> dict[str, Any]:
        """A timing row's clock fields for ``label``: the samples of its requests' prefills (start to first token) and
        decodes (first token to end), ``windows`` being (label, start, first token, end) per timed request; {} where
        nothing was logged. ``{phase}_sm_mhz_by_repeat``: the median SM clock of each of the label's windows in the
        order given (its timed repeats in run order, as ``ttft_ms_by_repeat``), None for a window no sample fell in;
        whether a lower clock held in every repeat or in a few is told from them (:func:`paired_clock_gaps`)."""
        if not self.logging:
            return {}
        out: dict[str, Any] = {}
        own = [w for w in windows if w[0] == label]
        samples = list(self.samples)  # in time order: one thread appends them
        for phase, part in (("prefill", lambda w: (w[1], w[2])), ("decode", lambda w: (w[2], w[3]))):
            each = samples_by_window(samples, [part(w) for w in own])
            st = clock_stats([s for window in each for s in window])
            out[f"{phase}_clock_samples"] = st["samples"] if st else 0
            if st:
                out.update({f"{phase}_sm_mhz": st["sm_median_mhz"], f"{phase}_sm_min_mhz": st["sm_min_mhz"],
                            f"{phase}_clock_limited_pct": st["limited_pct"],
                            f"{phase}_sm_mhz_by_repeat": [statistics.median(s.sm_mhz for s in window) if window else None
                                                          for window in each]})
        return out


def samples_by_window(samples: Sequence[Sample], windows: Iterable[tuple[float, float]]) -> list[list[Sample]]:
    """Per window of ``windows`` ((start, end) unix seconds, end excluded), the ``samples`` (in time order) taken
    within it."""
    times = [s.t for s in samples]
    return [list(samples[bisect.bisect_left(times, a):bisect.bisect_left(times, b)]) for a, b in windows]


def samples_within(samples: Sequence[Sample], windows: Iterable[tuple[float, float]]) -> list[Sample]:
    """The ``samples`` (in time order) taken within any of ``windows`` ((start, end) unix seconds, end excluded)."""
    return [s for window in samples_by_window(samples, windows) for s in window]


def clock_stats(samples: Sequence[Sample]) -> dict[str, Any] | None:
    """Median and minimum SM clock (MHz), median power (W), the share of samples (%) the driver held the clock down for
    power or heat (:data:`LIMITING`) and under the software power cap alone, and how many samples; None for none."""
    if not samples:
        return None
    powers = [s.power_w for s in samples if s.power_w is not None]
    return {"sm_median_mhz": statistics.median(s.sm_mhz for s in samples),
            "sm_min_mhz": min(s.sm_mhz for s in samples),
            "power_median_w": statistics.median(powers) if powers else None,
            "limited_pct": 100.0 * sum(bool(s.reasons & LIMITING) for s in samples) / len(samples),
            "power_capped_pct": 100.0 * sum(bool(s.reasons & POWER_CAP) for s in samples) / len(samples),
            "samples": len(samples)}


def paired_clock_gaps(first: Sequence[float | None] | None,
                      second: Sequence[float | None] | None) -> list[float] | None:
    """``first - second`` (MHz) repeat by repeat, where both have a clock (per-repeat medians of two implementations
    timed in the same repeats: ``*_sm_mhz_by_repeat``); None where either has none or their repeats differ in number."""
    if not first or not second or len(first) != len(second):
        return None
    return [a - b for a, b in zip(first, second) if a is not None and b is not None]


def sign_test_p(more: int, fewer: int) -> float:
    """One-sided sign test: the probability of ``more`` or more of ``more + fewer`` paired differences falling on one
    side when each side is as likely (ties left out before; scipy's exact binomial test, as 09's McNemar); 1.0 for no
    pairs."""
    from scipy import stats

    if more + fewer == 0:
        return 1.0
    return float(stats.binomtest(more, more + fewer, 0.5, alternative="greater").pvalue)


def reason_words(mask: int) -> str:
    """The limiting reasons set in ``mask``, in words ('' for none)."""
    return ", ".join(words for bit, words in REASONS.items() if mask & bit)
