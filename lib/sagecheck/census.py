"""The census of kernel calls: every call a candidate makes into SageAttention (or into the emulation that stands for
it), with its configuration, counted per process, cheap enough to stay on in every run.

A call is recorded at the kernel's boundary, by :func:`record`: its entry point (``sageattn``, ``sageattn_varlen``, ...),
the kernel it dispatched to, ``is_causal``, the tensor layout, dtype, head dim, query and KV heads, ``sm_scale``
(``None``: the kernel's default, ``head_dim ** -0.5``), whether it was captured into a CUDA graph, and per sequence its
query and key counts, in classes (:data:`CLASS_EDGES`; the key count also by whether it is a multiple of the kernel's
64-key block). A configuration is counted once per call; the sequences of each call by class, and, for a causal call,
those with fewer queries than keys (the kernel's causal mask assumes as many queries as keys: SageAttention's docs,
``is_causal`` only where qo_len == kv_len).

Where the calls come from:

* in an SGLang server process, from sageattention's public functions, wrapped in place by :func:`install` (sagecheck's
  plugin calls it in every scheduler process of a server given a statistics folder, ``SAGE_ATTN_STATS_DIR``, as
  sagecheck starts its candidate, whatever backend serves; a server in production wraps nothing): the module's
  attributes, the ``core`` module's kernels they dispatch to, and every name already bound to one of them in a loaded
  module (a backend that did ``from sageattention import sageattn`` at its import is recorded too), and an import hook
  for a sageattention imported later;
* in process, from the emulations (:mod:`sagecheck.attention.sage_emulated`, :mod:`~sagecheck.attention.sage2_fp8_emulated`),
  which stand for a correct integration of the kernel and record their calls as one makes them (a causal extend over a
  cached prefix with the prefix's rows: as many queries as keys), and from any implementation that calls
  :func:`record` itself (the tests' wrong backends).

Readers diff two :func:`snapshot` s around what they ran (10 does it per code path) and hold each configuration to the
kernel's contract (:func:`violations`).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from sagecheck import cuda_capture

# query and key counts per sequence are counted in these classes (lower edges), the key count also by whether it is a
# multiple of the kernel's key block: a partial last block is where a non-causal kernel's masked-out slots live
CLASS_EDGES = (1, 2, 16, 64, 128, 512, 2048, 8192, 32768)
KEY_BLOCK = 64
SUPPORTED_HEAD_DIMS = (64, 96, 128)  # sageattention's kernels (others are padded by sageattn, refused by its varlen)
SUPPORTED_DTYPES = ("float16", "bfloat16")
SCALE_RTOL = 1e-4
PENDING_CALLS = 100_000  # device calls kept unread at most: beyond, the call that adds one classifies them (waits)


def class_label(index: int) -> str:
    lo = CLASS_EDGES[index]
    if index + 1 < len(CLASS_EDGES):
        hi = CLASS_EDGES[index + 1] - 1
        return str(lo) if hi == lo else f"{lo}-{hi}"
    return f"{lo}+"


def class_of(n: int) -> int:
    index = 0
    for i, edge in enumerate(CLASS_EDGES):
        if n >= edge:
            index = i
    return index


def key_class(n: int) -> str:
    """A key count's class: its range, and ``partial`` where it is no multiple of the 64-key block."""
    return class_label(class_of(n)) + (" partial" if n % KEY_BLOCK else "")


class _Counts:
    """One configuration's counters, host integers. A call whose per-sequence counts are device tensors (a packed call's
    ``cu_seqlens`` differences) is kept as it is, with the stream it ran on, and classified later in bulk
    (:func:`classify_pending`) by whoever reads the census: the call itself launches nothing and waits for nothing."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.calls = 0
        self.captured = 0
        self.host = {"sequences": 0, "causal_short_q": 0}
        self.k_classes: dict[str, int] = {}
        self.q_classes: dict[str, int] = {}
        self.pending: list[tuple[Any, Any, Any]] = []  # device calls not classified yet: q and k lengths, stream

    def add_host(self, q_lens: Sequence[int], k_lens: Sequence[int], causal: bool) -> None:
        self.host["sequences"] += len(q_lens)
        for nq, nk in zip(q_lens, k_lens):
            self.q_classes[class_label(class_of(nq))] = self.q_classes.get(class_label(class_of(nq)), 0) + 1
            self.k_classes[key_class(nk)] = self.k_classes.get(key_class(nk), 0) + 1
            if causal and nq < nk:
                self.host["causal_short_q"] += 1

    def add_device(self, q_lens: Any, k_lens: Any) -> None:
        """A call's counts on a device (their causal flag is the configuration's): kept for :func:`classify_pending`."""
        import torch

        self.host["sequences"] += q_lens.numel()
        stream = torch.cuda.current_stream(q_lens.device) if q_lens.is_cuda else None
        self.pending.append((q_lens, k_lens, stream))

    def add_classified(self, counts: dict[str, Any]) -> None:
        """Classes of device calls, from :func:`classify_pending`."""
        self.host["causal_short_q"] += counts["causal_short_q"]
        for field in ("q_classes", "k_classes"):
            mine = getattr(self, field)
            for label, n in counts[field].items():
                mine[label] = mine.get(label, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "calls": self.calls, "captured": self.captured, **self.host,
                "q_classes": dict(self.q_classes), "k_classes": dict(self.k_classes)}


def classify_pending(pending: list[tuple[Any, Any, Any]], causal: bool) -> dict[str, Any]:
    """Device calls' sequences by class, in one go: after the reading thread's stream has waited for the streams the
    calls ran on (a server's forward runs on a stream of its own), so that no count is read before it is made, the
    counts are gathered on the device and copied to the host once, and classified there by a dozen tensor operations
    whatever the number of calls (on the CPU: no kernel that deterministic mode would refuse)."""
    import torch

    first = pending[0][0]
    if first.is_cuda:  # before anything reads them
        here = torch.cuda.current_stream(first.device)
        for stream in {s for _, _, s in pending if s is not None}:
            here.wait_stream(stream)
    q_lens = torch.cat([q.reshape(-1) for q, _, _ in pending]).to(torch.int64).cpu()
    k_lens = torch.cat([k.reshape(-1) for _, k, _ in pending]).to(torch.int64).cpu()
    n = len(CLASS_EDGES)
    edges = torch.tensor(CLASS_EDGES)
    q_idx = (torch.bucketize(q_lens, edges, right=True) - 1).clamp_min(0)
    k_idx = (torch.bucketize(k_lens, edges, right=True) - 1).clamp_min(0)
    partial = (k_lens % KEY_BLOCK != 0).to(torch.int64)
    short = (q_lens < k_lens).sum() if causal else torch.zeros((), dtype=torch.int64)
    counts = torch.cat([torch.bincount(q_idx, minlength=n), torch.bincount(2 * k_idx + partial, minlength=2 * n),
                        short.reshape(1)]).tolist()
    q_classes = {class_label(i): counts[i] for i in range(n) if counts[i]}
    k_classes = {class_label(i) + (" partial" if p else ""): counts[n + 2 * i + p] for i in range(n) for p in (0, 1)
                 if counts[n + 2 * i + p]}
    return {"causal_short_q": counts[-1], "q_classes": q_classes, "k_classes": k_classes}


class Census:
    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}
        self._by_args: dict[tuple, _Counts] = {}  # the same configurations by the arguments of record()
        self._lock = threading.Lock()
        self._depth = threading.local()
        self.version = 0  # bumped by every call: a writer writes only what changed

    def record(self, entry: str, kernel: str, *, causal: bool, sm_scale: float | None, head_dim: int, q_heads: int,
               kv_heads: int, dtype: str, layout: str, q_lens: Any, k_lens: Any, emulated: bool = False,
               captured: bool = False, ref: str | None = None) -> None:
        """One kernel call. ``q_lens``/``k_lens``: per sequence, host integers or a device tensor each; ``ref``: where
        the kernel can be called again (``module:function``), for replaying its configurations."""
        if getattr(self._depth, "paused", False):
            return
        # the configuration's JSON key is made once per configuration; a call looks it up by a tuple (a few µs a call)
        fast = (entry, kernel, bool(causal), layout, dtype, int(head_dim), int(q_heads), int(kv_heads), sm_scale,
                bool(emulated), ref)
        full = None
        with self._lock:
            self.version += 1
            counts = self._by_args.get(fast)
            if counts is None:
                config = {"entry": entry, "kernel": kernel, "causal": bool(causal), "layout": layout, "dtype": dtype,
                          "head_dim": int(head_dim), "q_heads": int(q_heads), "kv_heads": int(kv_heads),
                          "sm_scale": None if sm_scale is None else float(f"{float(sm_scale):.6g}"), "emulated": bool(emulated),
                          "ref": ref or f"sageattention:{kernel}"}
                key = json.dumps(config, sort_keys=True)
                counts = self._counts.get(key)
                if counts is None:
                    counts = self._counts[key] = _Counts(config)
                self._by_args[fast] = counts
            counts.calls += 1
            if captured:  # a graph being captured: its replays run no Python, and no counter may be created in it
                counts.captured += 1
            elif isinstance(q_lens, (list, tuple)):
                counts.add_host(q_lens, k_lens, causal)
            else:
                counts.add_device(q_lens, k_lens)
                if len(counts.pending) >= PENDING_CALLS:  # nobody reads this census: keep its memory bounded
                    full = counts
        if full is not None:
            self._read_pending([full])

    def snapshot(self) -> dict[str, Any]:
        """Every configuration's counts so far. Device calls not classified yet are taken out under the lock and
        classified outside it (a wait for the device that never holds up a call being recorded), then added; while a
        CUDA graph is being captured they stay unread (:mod:`sagecheck.cuda_capture`: device work then would break the
        capture), so their sequences are missing from the classes until a later snapshot (:meth:`has_pending`)."""
        self._read_pending()
        with self._lock:
            return {key: c.as_dict() for key, c in self._counts.items()}

    def _read_pending(self, only: list[_Counts] | None = None) -> None:
        """Classify the device calls waiting in ``only`` (default: every configuration), unless a CUDA graph is being
        captured. Locks in one order only: the capture lock, then the census's (a call being recorded holds the
        census's alone)."""
        with cuda_capture.outside_capture() as free:
            if not free:
                return
            with self._lock:
                taken = [(c, c.pending) for c in (self._counts.values() if only is None else only) if c.pending]
                for c, _ in taken:
                    c.pending = []
            for c, pending in taken:
                classified = classify_pending(pending, c.config["causal"])
                with self._lock:
                    c.add_classified(classified)
            del taken  # the device tensors freed before a capture may begin

    def has_pending(self) -> bool:
        """Whether device calls wait to be classified (a snapshot taken during a capture left them)."""
        with self._lock:
            return any(c.pending for c in self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._by_args.clear()

    def is_paused(self) -> bool:
        return getattr(self._depth, "paused", False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No call of this thread is recorded inside (work that stands for no kernel call: a stand-in server
        recomputing a cached prefix a real server would read from its cache)."""
        before = getattr(self._depth, "paused", False)
        self._depth.paused = True
        try:
            yield
        finally:
            self._depth.paused = before

    @contextmanager
    def outermost(self) -> Iterator[bool]:
        """True for the outermost recorded call of this thread: an entry point calls its kernel, also wrapped; the
        kernel is recorded as the entry point's dispatch, not as a call of its own."""
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        try:
            yield depth == 0
        finally:
            self._depth.n = depth


CENSUS = Census()
record = CENSUS.record
snapshot = CENSUS.snapshot


def record_attention(entry: str, kernel: str, ref: str, q: Any, k: Any, *, causal: bool, scale: float | None,
                     emulated: bool = True, integration: bool = True) -> None:
    """A call on ``[batch, heads, seq, head_dim]`` tensors (the emulations' and the in-process kernels'). With
    ``integration``, the call as a correct integration makes it: a causal extend over a cached prefix computed with the
    prefix's rows, as many queries as keys (sagecheck's sage_attn does so); without, the call as it was made."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    rows = n_k if (integration and causal and n_q < n_k) else n_q
    record(entry, kernel, causal=causal, sm_scale=scale, head_dim=d, q_heads=h, kv_heads=k.shape[1],
           dtype=str(q.dtype).removeprefix("torch."), layout="HND", q_lens=[rows] * b, k_lens=[n_k] * b, emulated=emulated,
           ref=ref)


# --------------------------------------------------------------------------- reading: differences and the contract


def difference(after: dict[str, Any] | None, before: dict[str, Any] | None) -> dict[str, Any]:
    """What was recorded between two snapshots (configurations with no new call left out)."""
    after, before = after or {}, before or {}
    out = {}
    for key, a in after.items():
        b = before.get(key, {})
        calls = a.get("calls", 0) - b.get("calls", 0)
        if calls <= 0:
            continue
        entry = {"config": a["config"], "calls": calls}
        for field in ("captured", "sequences", "causal_short_q"):
            entry[field] = a.get(field, 0) - b.get(field, 0)
        for field in ("q_classes", "k_classes"):
            entry[field] = {c: n - b.get(field, {}).get(c, 0) for c, n in a.get(field, {}).items()
                            if n - b.get(field, {}).get(c, 0) > 0}
        out[key] = entry
    return out


def total(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Differences taken one after the other (several steps of one path), added up."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, e in (part or {}).items():
            have = out.setdefault(key, {"config": e["config"], "calls": 0, "captured": 0, "sequences": 0, "causal_short_q": 0,
                                        "q_classes": {}, "k_classes": {}})
            for field in ("calls", "captured", "sequences", "causal_short_q"):
                have[field] += e.get(field, 0)
            for field in ("q_classes", "k_classes"):
                for c, n in e.get(field, {}).items():
                    have[field][c] = have[field].get(c, 0) + n
    return out


def merge(censuses: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' censuses as one (the ranks of one server: each runs every batch on its share of the heads,
    so their configurations differ by heads; the same configuration on two ranks counts its largest)."""
    out: dict[str, Any] = {}
    for census in censuses:
        for key, entry in (census or {}).items():
            have = out.get(key)
            if have is None or entry.get("calls", 0) > have.get("calls", 0):
                out[key] = entry
    return out


def expected_scale(head_dim: int, model_config: Any = None) -> float:
    """The softmax scale the model uses: ``query_pre_attn_scalar ** -0.5`` where the config sets one, else
    ``head_dim ** -0.5``."""
    scalar = getattr(model_config, "query_pre_attn_scalar", None) if model_config is not None else None
    return float(scalar) ** -0.5 if scalar else float(head_dim) ** -0.5


def violations(entry: dict[str, Any], model_config: Any = None) -> list[str]:
    """How one configuration's calls break the kernel's contract, in words (empty: none)."""
    c = entry["config"]
    out = []
    if c["causal"] and entry.get("causal_short_q"):
        out.append(f"causal with fewer queries than keys in {entry['causal_short_q']} sequence(s) (the kernel's causal "
                   "mask assumes as many queries as keys)")
    scale = c["sm_scale"] if c["sm_scale"] is not None else c["head_dim"] ** -0.5
    want = expected_scale(c["head_dim"], model_config)
    if abs(scale - want) > SCALE_RTOL * want:
        out.append(f"sm_scale {scale:.6g}, the model's is {want:.6g}")
    if c["head_dim"] not in SUPPORTED_HEAD_DIMS:
        out.append(f"head dim {c['head_dim']} (the kernel supports {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    if not c.get("emulated") and c["dtype"] not in SUPPORTED_DTYPES:
        out.append(f"dtype {c['dtype']} (the kernel takes {' or '.join(SUPPORTED_DTYPES)})")
    return out


def calls(census: dict[str, Any]) -> int:
    return sum(e.get("calls", 0) for e in (census or {}).values())


def label(config: dict[str, Any]) -> str:
    """A configuration in a few words, for tables."""
    kind = "causal" if config["causal"] else "non-causal"
    gqa = config["q_heads"] // max(1, config["kv_heads"])
    return (f"{config['entry']} -> {config['kernel']}: {kind}, d={config['head_dim']}, {config['q_heads']}/{config['kv_heads']} "
            f"heads (GQA {gqa}), {config['dtype']}, {config['layout']}")


def start_writer(path: Any, interval_s: float) -> None:
    """Write this process's census to ``path`` every ``interval_s`` while it changes or holds device calls not yet
    classified (a daemon thread; a server process's census is read from there,
    :func:`sagecheck.backend_stats.read_census`). The thread does device work (:meth:`Census.snapshot`), so CUDA graph
    captures are tracked from here on, and it does none while one is underway (:mod:`sagecheck.cuda_capture`)."""
    import os
    import sys
    import time
    from pathlib import Path

    path = Path(path)
    cuda_capture.track()

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "written_at": time.time(), "census": snapshot()}, sort_keys=True))
        os.replace(tmp, path)

    def loop() -> None:
        last = None
        while True:
            time.sleep(interval_s)
            try:
                now = CENSUS.version
                if now != last or CENSUS.has_pending():
                    write()
                    last = now
            except Exception as e:  # noqa: BLE001 - the census must never take a server down, nor stop being written
                print(f"sagecheck census: could not write {path}: {e}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, name="sagecheck-census", daemon=True).start()


# --------------------------------------------------------------------------- SageAttention's functions, wrapped in place

ENTRY_POINTS = ("sageattn", "sageattn_varlen", "sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp16_cuda",
                "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp8_cuda_sm90")
_WRAPPED = "__sagecheck_census__"


def _shape_facts(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Heads, head dim, dtype, layout and per-sequence counts of a sageattention call, from its arguments."""
    q, k = (args + (None, None))[:2] if len(args) >= 2 else (kwargs.get("q"), kwargs.get("k"))
    q = q if q is not None else kwargs.get("q")
    k = k if k is not None else kwargs.get("k")
    is_causal = bool(kwargs.get("is_causal", args[7] if name == "sageattn_varlen" and len(args) > 7 else
                                args[4] if name != "sageattn_varlen" and len(args) > 4 else False))
    sm_scale = kwargs.get("sm_scale")
    if name == "sageattn_varlen":  # q, k, v [tokens, heads, d]; cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        cu_q = kwargs.get("cu_seqlens_q", args[3] if len(args) > 3 else None)
        cu_k = kwargs.get("cu_seqlens_k", args[4] if len(args) > 4 else None)
        q_lens, k_lens = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        return {"layout": "varlen", "q_heads": q.shape[1], "kv_heads": k.shape[1], "head_dim": q.shape[2],
                "dtype": str(q.dtype).removeprefix("torch."), "q_lens": q_lens, "k_lens": k_lens, "causal": is_causal,
                "sm_scale": sm_scale, "on_cuda": q.is_cuda}
    layout = kwargs.get("tensor_layout", args[3] if len(args) > 3 and isinstance(args[3], str) else "HND")
    b = q.shape[0]
    if layout == "HND":
        heads, kv_heads, n_q, n_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    else:
        heads, kv_heads, n_q, n_k = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    return {"layout": layout, "q_heads": heads, "kv_heads": kv_heads, "head_dim": q.shape[-1],
            "dtype": str(q.dtype).removeprefix("torch."), "q_lens": [n_q] * b, "k_lens": [n_k] * b, "causal": is_causal,
            "sm_scale": sm_scale, "on_cuda": q.is_cuda}


def wrapped(name: str, fn: Any) -> Any:
    """``fn`` (sageattention's ``name``) recording each call; the outermost call of a thread is the entry point, the
    innermost wrapped function it reached is the kernel it dispatched to."""
    if getattr(fn, _WRAPPED, False):
        return fn
    import functools

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with CENSUS.outermost() as outer:
            if not outer:
                _dispatched.name = name
                return fn(*args, **kwargs)
            _dispatched.name = name
            out = fn(*args, **kwargs)
            if CENSUS.is_paused():
                return out
            try:
                import torch

                facts = _shape_facts(name, args, kwargs)
                captured = bool(facts["on_cuda"] and torch.cuda.is_current_stream_capturing())
                del facts["on_cuda"]
                CENSUS.record(name, _dispatched.name, captured=captured, **facts)
            except Exception:  # noqa: BLE001 - the census never breaks a call
                pass
            return out

    setattr(call, _WRAPPED, True)
    return call


_dispatched = threading.local()


def install() -> int:
    """Wrap sageattention's entry points and kernels where they are bound (the package, its ``core`` module, any loaded
    module holding one by name), and wrap a sageattention imported later; returns how many bindings were wrapped."""
    import sys

    _install_import_hook()
    if "sageattention" not in sys.modules:
        return 0
    originals: dict[int, tuple[str, Any]] = {}
    for modname in ("sageattention", "sageattention.core"):
        mod = sys.modules.get(modname)
        for name in ENTRY_POINTS:
            fn = getattr(mod, name, None) if mod is not None else None
            if callable(fn) and not getattr(fn, _WRAPPED, False):
                originals[id(fn)] = (name, fn)
    count = 0
    replacements = {i: wrapped(name, fn) for i, (name, fn) in originals.items()}
    for mod in list(sys.modules.values()):
        namespace = getattr(mod, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if callable(value) and id(value) in replacements:
                namespace[attr] = replacements[id(value)]
                count += 1
    return count


class _Finder:
    """Wraps sageattention's functions as soon as the package (or its core) finishes importing."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in ("sageattention", "sageattention.core"):
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            install()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install_import_hook() -> None:
    import sys

    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
