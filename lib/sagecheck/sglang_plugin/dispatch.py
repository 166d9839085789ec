"""Which extend batches go to the kernel: only where it pays on this GPU, from a measurement made at start.

sageattention's kernels win on long sequences and lose on short ones: on an H200, SageAttention 2's FP8 kernel is
1.23x SDPA at 16k keys and 0.35x at 1k (benchmarks/RESULTS.md, 08), and a short prefill pays the integration's fixed
cost (smoothing, quantization launches) in every layer. So ``sage_attn`` sends each extend batch either to the kernel or
to the Triton backend's extend kernel (the baseline's own), by a crossover measured when the server starts, on its
GPU, at its model's shapes (:func:`measure`): one request of ``L`` tokens, causal, this rank's heads, head dim and
dtype; the backend's whole kernel path (smoothing, padding, the calls) against Triton's extend, for ``L`` in
:data:`LENGTHS` up to the context length. The crossover is the shortest length from which the kernel path is at
least as fast at every longer measured length (:func:`crossover_from`); none if it never is.

An extend over a cached prefix (a chunked prefill's later chunks, a radix-cache hit) runs another path: the split
of :mod:`.split` with SageAttention 2, which gathers the prefix's keys and merges two calls, and costs more per key
than a cold request. On an H200 (2026-12-05, benchmarks/RESULTS.md) the candidate's start-up measurement put cold
requests on the kernel from 4096 keys and half-cached ones from 8192 (1.37 ms per layer against Triton's 0.58 at 4096
keys). So where the backend's timers can, the same measurement times requests of ``L`` keys
whose first half is a cached prefix (:attr:`Timers.kernel_path_prefix`, :attr:`Timers.triton_prefix`), and those
requests have a crossover of their own (``prefix_keys``; none where the kernel path never caught up).

**The rule, per batch** (:func:`to_kernel`): a request's cost grows with its query-key pairs (``p·e + e(e+1)/2``
for ``p`` cached and ``e`` new tokens), and whether the kernel beats Triton on it with its key count ``p + e``. The
batch goes to the kernel when at least half of its pairs are in requests of at least their crossover's key count
(the prefix crossover for a request with a cached prefix, where it was measured). One batch is one route: every layer
of it runs the same kernel (a request is never half on each).

``SAGE_ATTN_DISPATCH`` (:mod:`.settings`): ``measured`` (default) as above; ``kernel``: every extend batch on the
kernel (what 10's verification of every path needs, and the backend before this rule); a number ``N``: the kernel
from ``N`` keys per request (a crossover measured elsewhere). The crossover, the timings it came from and, per path,
how many batches went where are in the statistics (:mod:`.stats`).

Cost: a batch's route depends on its composition, so a request may run on the kernel in one batch and on Triton in
another (different rounding; 10's batch-invariance path is judged with ``kernel``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Any, Callable, Sequence

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
WARMUP, REPEATS = 2, 7
KERNEL_SHARE = 0.5  # the share of a batch's query-key pairs that must be in long requests


@dataclass(frozen=True)
class Crossover:
    """The dispatch rule's one number and where it came from. ``keys``: the kernel from this many keys per request;
    None with ``mode`` ``measured``: the kernel was slower at every measured length (every batch on Triton)."""

    mode: str  # measured, kernel, set
    keys: int | None
    source: str
    lengths: tuple[int, ...] = ()
    kernel_ms: tuple[float, ...] = ()
    triton_ms: tuple[float, ...] = ()
    kernel_alone_ms: tuple[float, ...] = ()
    error: str = ""
    timing: str = ""  # how each figure was timed
    # requests whose first half is a cached prefix, where measured: their own crossover and timings
    prefix_measured: bool = False
    prefix_keys: int | None = None
    prefix_kernel_ms: tuple[float, ...] = ()
    prefix_triton_ms: tuple[float, ...] = ()
    # the kernel path and the bare kernel on the GPU alone (device_ms; None where a call could not be timed so)
    kernel_device_ms: tuple[float | None, ...] = ()
    kernel_alone_device_ms: tuple[float | None, ...] = ()
    device_timing: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The facts, and where :func:`to_kernel` sends one request of each measured length (``routes``) and, where
        measured, one of as many keys whose first half is cached (``prefix_routes``): the rule's own answer, which the
        report reads instead of applying the rule again."""
        facts = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

        def route(prefix: int, new: int) -> str:
            return "kernel" if to_kernel([prefix], [new], self) else "Triton"

        facts["routes"] = [route(0, n) for n in self.lengths]
        if self.prefix_measured:
            facts["prefix_routes"] = [route(n // 2, n - n // 2) for n in self.lengths]
        return facts

    def keys_for(self, prefix: int) -> int | None:
        """The key count from which a request with ``prefix`` cached tokens goes to the kernel (None: never)."""
        return self.prefix_keys if prefix and self.prefix_measured else self.keys

    def describe(self) -> str:
        if self.mode == "kernel":
            return f"every extend batch on the kernel ({self.source})"
        if self.prefix_measured:
            cold, prefix = self.keys, self.prefix_keys
            if cold is None and prefix is None:
                return (f"every extend batch on Triton: the kernel was slower at every measured length, with a cached "
                        f"prefix or without ({self.source})")
            if prefix is None:
                return (f"the kernel from {cold} keys per request without a cached prefix; extends over a cached prefix "
                        f"on Triton (slower at every measured length) ({self.source})")
            if cold is None:
                return (f"the kernel only over a cached prefix, from {prefix} keys (without one, slower at every "
                        f"measured length) ({self.source})")
            return f"the kernel from {cold} keys per request, over a cached prefix from {prefix} keys ({self.source})"
        said = f"; {self.error}" if self.error and self.mode == "measured" else ""  # the prefix part that failed
        if self.keys is None:
            return f"every extend batch on Triton: the kernel was slower at every measured length ({self.source}{said})"
        return f"the kernel from {self.keys} keys per request ({self.source}{said})"


def crossover_from(lengths: Sequence[int], kernel_ms: Sequence[float], triton_ms: Sequence[float]) -> int | None:
    """The shortest measured length from which the kernel is at least as fast as Triton at every longer one."""
    best = None
    for length, k, t in sorted(zip(lengths, kernel_ms, triton_ms), reverse=True):
        if k > t:
            break
        best = length
    return best


def to_kernel(prefix_lens: Sequence[int], extend_lens: Sequence[int], crossover: Crossover) -> bool:
    """Whether an extend batch runs on the kernel (module docstring)."""
    if crossover.mode == "kernel":
        return True
    total = long = 0
    for p, e in zip(prefix_lens, extend_lens):
        pairs = p * e + e * (e + 1) // 2
        total += pairs
        limit = crossover.keys_for(p)
        if limit is not None and p + e >= limit:
            long += pairs
    return total > 0 and long >= KERNEL_SHARE * total


def cuda_ms(fn: Callable[[], Any], warmup: int = WARMUP, repeats: int = REPEATS) -> tuple[float, ...]:
    """Each of ``repeats`` calls of ``fn`` timed by CUDA events on the current stream, in ms, after ``warmup``."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return tuple(times)


HOLD_MS = 5.0  # how long device_ms holds the GPU back before each timed call (doubled once where too short)


def device_ms(fn: Callable[[], Any], warmup: int = WARMUP, repeats: int = REPEATS,
              hold_ms: float = HOLD_MS) -> tuple[float | None, ...]:
    """Each of ``repeats`` calls of ``fn`` timed on the GPU alone, in ms: the GPU's own time, with the host ahead.

    :func:`cuda_ms` times a call from the host's launch of its first kernel, so that where a call's host work (Python,
    launches) outlasts its GPU work, it measures the host. In a serving forward pass the host runs ahead of the GPU
    (a layer's GEMMs keep it busy while attention is launched), and the attention costs what the GPU spends on it.
    Here a sleep kernel holds the GPU for ``hold_ms`` while the host launches the call between two events, so the
    events time the GPU's work alone. A timing is kept only where the host had launched the whole call before the GPU
    reached its first event (that event had not completed); else the hold is doubled once and the call timed again,
    and where it is still not, the timing is None: ``fn`` waits for the GPU (a host synchronization) or its host work
    outlasts the hold."""
    import torch

    cycles_per_ms = sleep_cycles_per_ms()
    for _ in range(warmup):
        fn()
    times: list[float | None] = []
    for _ in range(repeats):
        timing = None
        for hold in (hold_ms, 2 * hold_ms):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(hold * cycles_per_ms))
            start.record()
            fn()
            end.record()
            ahead = not start.query()  # the GPU was still held when the host had launched the whole call
            end.synchronize()
            if ahead:
                timing = start.elapsed_time(end)
                break
        times.append(timing)
    return tuple(times)


def sleep_cycles_per_ms(cycles: int = 10_000_000) -> float:
    """``torch.cuda._sleep``'s cycles per ms on this GPU, timed (its clock under load, not the nominal rate)."""
    import torch

    torch.cuda._sleep(cycles // 10)  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the timings, None where any is None (a call that could not be timed so is not partly timed)."""
    return None if not values or any(v is None for v in values) else median(values)


def request_inputs(n: int, heads: int, kv_heads: int, d: int, dtype: Any, device: Any) -> tuple[Any, Any, Any]:
    """Q, K, V ``[n, heads, d]`` of one request of ``n`` tokens for the measurement (seeded by ``n``; K off-centre by 1,
    so that smoothing has a mean to remove)."""
    import torch

    g = torch.Generator(device=device).manual_seed(n)
    return (torch.randn(n, heads, d, device=device, dtype=dtype, generator=g),
            torch.randn(n, kv_heads, d, device=device, dtype=dtype, generator=g) + 1,
            torch.randn(n, kv_heads, d, device=device, dtype=dtype, generator=g))


@dataclass
class Timers:
    """What :func:`measure` times at one length ``L`` (each a call that runs one layer's attention of one request of
    ``L`` tokens): the backend's kernel path, Triton's extend, and the kernel alone on inputs prepared beforehand."""

    kernel_path: Callable[[int], Callable[[], Any]]
    triton: Callable[[int], Callable[[], Any]]
    kernel_alone: Callable[[int], Callable[[], Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # one request of L keys whose first L // 2 are a cached prefix: the backend's path and Triton's extend (both or none)
    kernel_path_prefix: Callable[[int], Callable[[], Any]] | None = None
    triton_prefix: Callable[[int], Callable[[], Any]] | None = None


DEVICE_TIMING = (f"GPU time with the host ahead: median of {REPEATS} CUDA-event timings after {WARMUP} warm-ups, the GPU "
                 f"held by a sleep kernel while the host launched the call")
CUDA_TIMING = f"ms per layer, median of {REPEATS} CUDA-event timings after {WARMUP} warm-ups"


def measure(timers: Timers, max_length: int, where: str, lengths: Sequence[int] = LENGTHS,
            time: Callable[[Callable[[], Any]], Sequence[float]] = cuda_ms, timing: str = CUDA_TIMING,
            device_time: Callable[[Callable[[], Any]], Sequence[float | None]] | None = None,
            device_timing: str = DEVICE_TIMING) -> Crossover:
    """The crossover at the lengths up to ``max_length``, timed by ``time`` (median of its repeats; ``timing`` says
    how, for the statistics). With ``device_time`` (:func:`device_ms`) and a bare-kernel timer, the kernel path and the
    bare kernel are also timed on the GPU alone: what the integration adds on the GPU, apart from its host time (the
    route keeps ``time``'s figures, which include the host's)."""
    used = [n for n in lengths if n <= max_length] or [min(lengths)]
    with_prefix = timers.kernel_path_prefix is not None and timers.triton_prefix is not None
    on_device = device_time is not None and timers.kernel_alone is not None
    kernel, triton, alone, prefix_kernel, prefix_triton = [], [], [], [], []
    kernel_device: list[float | None] = []
    alone_device: list[float | None] = []
    prefix_error = ""
    for n in used:
        path = timers.kernel_path(n)  # each call made once per length (its inputs), timed by both clocks
        kernel.append(median(time(path)))
        triton.append(median(time(timers.triton(n))))
        bare = timers.kernel_alone(n) if timers.kernel_alone is not None else None
        if bare is not None:
            alone.append(median(time(bare)))
        if on_device:
            kernel_device.append(median_or_none(device_time(path)))
            alone_device.append(median_or_none(device_time(bare)))
        if with_prefix:
            try:
                prefix_kernel.append(median(time(timers.kernel_path_prefix(n))))
                prefix_triton.append(median(time(timers.triton_prefix(n))))
            except Exception as e:  # noqa: BLE001 - the cold crossover stands; prefixes follow it, said in the facts
                with_prefix, prefix_kernel, prefix_triton = False, [], []
                prefix_error = f"the prefix measurement failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def rounded(xs: list[float | None]) -> tuple[float | None, ...]:
        return tuple(None if x is None else round(x, 4) for x in xs)

    return Crossover("measured", crossover_from(used, kernel, triton), f"measured at start: {where}", tuple(used),
                     rounded(kernel), rounded(triton), rounded(alone), error=prefix_error, timing=timing,
                     prefix_measured=with_prefix,
                     prefix_keys=crossover_from(used, prefix_kernel, prefix_triton) if with_prefix else None,
                     prefix_kernel_ms=rounded(prefix_kernel), prefix_triton_ms=rounded(prefix_triton),
                     kernel_device_ms=rounded(kernel_device), kernel_alone_device_ms=rounded(alone_device),
                     device_timing=device_timing if on_device else "")


def from_setting(setting: str) -> Crossover | None:
    """The crossover a setting fixes (``kernel`` or a number), or None for ``measured``."""
    if setting == "kernel":
        return Crossover("kernel", 0, "SAGE_ATTN_DISPATCH=kernel")
    if setting == "measured":
        return None
    return Crossover("set", int(setting), f"SAGE_ATTN_DISPATCH={setting}")
