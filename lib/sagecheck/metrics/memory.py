"""GPU memory: the torch allocator's peaks, the device's used memory from NVML, and sizes of weights and KV cache;
on an engine of servers, what each server reports and its processes hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sagecheck.engines import ALLOCATOR_MEMORY, SERVER_MEMORY

GiB = 2**30


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: torch.device) -> dict[str, int]:
    """Peak bytes allocated and reserved by torch's CUDA allocator since the last reset."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    return {
        "peak_allocated": int(torch.cuda.max_memory_allocated(device)),
        "peak_reserved": int(torch.cuda.max_memory_reserved(device)),
        "allocated_now": int(torch.cuda.memory_allocated(device)),
    }


def nvml_used(device: torch.device) -> int | None:
    """Bytes in use on the whole device as NVML sees it (all processes, the CUDA context included)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weights_bytes(model: Any) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache (its key and value tensors)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += tensor_bytes(t)
        return total
    for pair in cache:  # legacy tuple of (key, value) per layer
        total += sum(tensor_bytes(t) for t in pair if isinstance(t, torch.Tensor))
    return total


def kv_cache_bytes_expected(config: Any, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """What a full KV cache must hold: 2 x layers x batch x kv_heads x tokens x head_dim x element size."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * tokens * head_dim * element


def measure_point(engine: Any, implementation: str, batch: int, length: int, decode_tokens: int, seed: int) -> dict[str, Any]:
    """Peak GPU memory of prefill + decode at one point, split into weights, KV cache and activations.

    A short prefill and decode step run first, unmeasured: what the libraries allocate once
    and keep (cuBLAS's workspace, kernel caches) is then resident before every point alike
    (in ``resident_before``) instead of counted as activations of the first point measured.
    """
    from sagecheck.metrics.timing import random_prompts

    device = engine.device
    config = engine.model_config()
    prompts = random_prompts(config.vocab_size, batch, length, seed, device)
    weights = weights_bytes(engine.model)
    try:
        with engine.backend(implementation) as backend:
            _, warm_cache = backend.prefill(prompts[:1, :16])
            backend.decode_step(prompts[:1, 0], warm_cache)
            del warm_cache
            reset_peaks(device)
            before = allocator_peaks(device).get("allocated_now", 0)
            logits, cache = backend.prefill(prompts)
            tokens = logits.argmax(-1)
            for _ in range(decode_tokens):
                logits, cache = backend.decode_step(tokens, cache)
                tokens = logits.argmax(-1)
            peaks = allocator_peaks(device)
            used = nvml_used(device)
            kv = kv_cache_bytes(cache)
            del cache, logits
    except torch.cuda.OutOfMemoryError as e:
        reset_peaks(device)
        return {"status": "out of memory", "error": str(e).splitlines()[0][:200]}
    reset_peaks(device)
    return {
        "status": "ok",
        "weights": weights,
        "resident_before": before,
        "kv_cache": kv,
        "kv_cache_expected": kv_cache_bytes_expected(config, batch, length + decode_tokens, engine.dtype),
        "peak_allocated": peaks["peak_allocated"],
        "peak_reserved": peaks["peak_reserved"],
        "activations_peak": peaks["peak_allocated"] - before - kv,
        "nvml_used": used,
    }


def peak_deltas(rows: list[dict[str, Any]], baseline: str, candidate: str) -> list[dict[str, Any]]:
    """Per (length, batch) measured for both: the candidate's peaks relative to the baseline's."""
    by_point: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_point.setdefault((r["input_length"], r["batch"]), {})[r["implementation"]] = r
    out = []
    for (length, batch), pair in by_point.items():
        if baseline in pair and candidate in pair:
            b, c = pair[baseline], pair[candidate]
            out.append({"input_length": length, "batch": batch,
                        "peak_delta_pct": 100 * (c["peak_allocated"] / b["peak_allocated"] - 1),
                        "reserved_delta_pct": 100 * (c["peak_reserved"] / b["peak_reserved"] - 1),
                        "activations_delta_GiB": (c["activations_peak"] - b["activations_peak"]) / 2**30})
    return out


def kv_cache_matches(rows: list[dict[str, Any]], rel_tol: float = 0.02) -> bool:
    """Every measured KV cache holds what the shapes say it must (within ``rel_tol``)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    return bool(ok) and all(abs(r["kv_cache"] - r["kv_cache_expected"]) <= rel_tol * r["kv_cache_expected"] for r in ok)


def server_report(engine: Any) -> list[dict[str, Any]]:
    """Per server of the pair: the KV-cache capacity and the memory split it reports, and the GPU memory its processes
    hold (:meth:`~sagecheck.engines.Backend.memory_report`)."""
    from sagecheck.engines import EngineError

    rows = []
    for label in engine.pair:
        try:
            with engine.backend(label) as b:
                m = b.memory_report()
                gpu = m.get("server_gpu_bytes")
                rows.append({"implementation": label, "role": engine.role(label), "status": "ok", **m,
                             "server_GiB (NVML)": gpu / GiB if gpu else None})
        except EngineError as e:
            rows.append({"implementation": label, "status": "server error", "error": e.cause[:300]})
    if all(r["status"] != "ok" for r in rows):  # nothing measured: fail with the cause rather than an empty table
        raise EngineError(f"no server could be reached: {rows[0]['error']}", cause=rows[0]["error"])
    return rows


def server_deltas(server_rows: list[dict[str, Any]], baseline: str, candidate: str) -> dict[str, Any] | None:
    """SGLang servers of both backends: the candidate's KV-cache capacity and GPU memory against the baseline's (%).

    ``server_gpu_delta_pct``: the GPU memory of the candidate server's processes against the baseline's
    (NVML per process); None without both figures. It compares backends only where both servers hold
    the same KV cache (``same_capacity``, e.g. set by ``--max-total-tokens``): else the memory fractions
    the servers were started with decide most of it. None unless both servers ran and reported a capacity.
    """
    ok = {r["implementation"]: r for r in server_rows if r.get("status") == "ok"}
    if baseline not in ok or candidate not in ok or not ok[baseline].get("max_total_num_tokens"):
        return None
    b, c = ok[baseline], ok[candidate]
    gpu = (100 * (c["server_gpu_bytes"] / b["server_gpu_bytes"] - 1)
           if b.get("server_gpu_bytes") and c.get("server_gpu_bytes") else None)
    return {"capacity_delta_pct": 100 * (c["max_total_num_tokens"] / b["max_total_num_tokens"] - 1),
            "capacity_tokens": (b["max_total_num_tokens"], c["max_total_num_tokens"]),
            "same_capacity": b["max_total_num_tokens"] == c["max_total_num_tokens"],
            "server_gpu_delta_pct": gpu, "server_gpu_bytes": (b.get("server_gpu_bytes"), c.get("server_gpu_bytes")),
            "cuda_graphs_GB": (b.get("cuda_graphs_GB"), c.get("cuda_graphs_GB")),
            "startup_split_disturbed": startup_split_disturbed([b, c])}


def startup_split_disturbed(server_rows: list[dict[str, Any]], weights_rel_tol: float = 0.02) -> str | None:
    """Why SGLang's own start-up split of a server's memory cannot be compared here, or None.

    SGLang measures a server's weights and CUDA-graph memory as differences of the whole GPU's free
    memory before and after each step; servers starting at the same time on the GPU move those
    differences (three 8B servers started side by side on one GPU reported different weights for the same model
    and negative CUDA-graph memory). The signs of that: a negative figure, or weights that differ between servers
    of the same model.
    """
    ok = [r for r in server_rows if r.get("status", "ok") == "ok"]
    graphs = [r.get("cuda_graphs_GB") for r in ok if r.get("cuda_graphs_GB") is not None]
    weights = [r.get("weights_GB") for r in ok if r.get("weights_GB")]
    signs = []
    if any(g < 0 for g in graphs):
        signs.append("CUDA graphs " + " vs ".join(f"{g:g}" for g in graphs) + " GB")
    if len(weights) > 1 and max(weights) > (1 + weights_rel_tol) * min(weights):
        signs.append("weights " + " vs ".join(f"{w:g}" for w in weights) + " GB for the same model")
    if not signs:
        return None
    return ("SGLang's start-up split (weights, CUDA graphs) is a difference of the GPU's free memory, moved by servers "
            f"starting at the same time ({'; '.join(signs)}); the comparison uses each server's processes' memory (NVML)")

# --------------------------------------------------------------------------- 05_memory: either engine


@dataclass
class Measured:
    """05's measurement: per server (``servers``), per point from the allocator (``allocator``), or sizes computed from
    the shapes where peak memory cannot be measured (``computed``, with ``why``)."""

    kind: str
    rows: list[dict[str, Any]]
    baseline: str
    candidate: str
    where: str
    deltas: list[dict[str, Any]] = field(default_factory=list)
    servers: dict[str, Any] | None = None
    why: str = ""


def measure(engine: Any, p: Any, where: str, on_gpu: bool) -> Measured:
    base, cand = engine.pair
    if SERVER_MEMORY in engine.capabilities:
        rows = server_report(engine)
        return Measured("servers", rows, base, cand, where, servers=server_deltas(rows, base, cand))
    if ALLOCATOR_MEMORY not in engine.capabilities or not on_gpu:
        config, weights = engine.model_config(), weights_bytes(engine.model)
        rows = [{"input_length": n, "batch": b, "weights_MiB": weights / 2**20,
                 "kv_cache_MiB (computed)": kv_cache_bytes_expected(config, b, n + p.decode_tokens, engine.dtype) / 2**20}
                for n in p.input_lengths for b in p.batch_sizes]
        return Measured("computed", rows, base, cand, where,
                        why="no CUDA device: peak GPU memory cannot be measured here; weights and KV-cache sizes are computed "
                            "from the shapes")
    rows = [{"input_length": n, "batch": b, "implementation": label, **measure_point(engine, label, b, n, p.decode_tokens, p.seed)}
            for n in p.input_lengths for b in p.batch_sizes for label in engine.pair]
    return Measured("allocator", rows, base, cand, where, deltas=peak_deltas(rows, base, cand))


SERVER_COLUMNS = ["implementation", "role", "attention_backend", "status", "max_total_num_tokens", "mem_fraction_static",
                  "weights_GB", "kv_cache_GB", "cuda_graphs_GB", "server_GiB (NVML)", "error"]
POINT_COLUMNS = ["input_length", "batch", "implementation", "peak_allocated", "peak_reserved", "weights", "kv_cache",
                 "kv_cache_expected", "activations_peak", "nvml_used"]


def tables(m: Measured) -> list[tuple[list[dict[str, Any]], str, list[str] | None]]:
    """(rows, caption, columns) of every table 05 shows."""
    if m.kind == "servers":
        return [(m.rows, f"What each server reports, and its processes' GPU memory — {m.where}", SERVER_COLUMNS)]
    if m.kind == "computed":
        return [(m.rows, "Sizes computed from the shapes (no GPU)", None)]
    gib = [{k: (v / GiB if isinstance(v, int) and k not in ("input_length", "batch") else v) for k, v in r.items()
            if k not in ("status", "error")} for r in m.rows if r["status"] == "ok"]
    return [(gib, f"GiB per point — {m.where}", POINT_COLUMNS), (m.deltas, "Candidate against baseline", None)]


def record(results: Any, m: Measured, p: Any) -> list[str]:
    """05's results and verdicts; returns the notes to show."""
    shown: list[str] = []
    if m.kind == "computed":
        results.table("computed_sizes", m.rows)
        results.skip(m.why)
        return shown
    if m.kind == "servers":
        results.table("sglang_memory", m.rows)
        results.metric("sglang", m.servers)
        d = m.servers
        if not d:
            return shown
        base_cap, cand_cap = d["capacity_tokens"]
        results.verdict("memory.kv_capacity", "memory", f"candidate KV-cache capacity within -{p.margin_pct:g}% of the baseline's",
                        -d["capacity_delta_pct"], "<=", p.margin_pct, unit="%", detail=f"{cand_cap} vs {base_cap} tokens; " + (
                            f"both set by --max-total-tokens {p.sglang.max_total_tokens}" if p.sglang.max_total_tokens
                            else "each left by its memory fraction (servers side by side: not a backend comparison)"))
        if d["server_gpu_delta_pct"] is not None and d["same_capacity"]:
            results.verdict("memory.server_gpu", "memory", f"GPU memory of the server's processes (NVML) within "
                            f"+{p.margin_pct:g}% of the baseline's", d["server_gpu_delta_pct"], "<=", p.margin_pct, unit="%",
                            detail="same KV capacity; {:.2f} vs {:.2f} GiB".format(*(b / GiB for b in d["server_gpu_bytes"])))
        elif d["server_gpu_delta_pct"] is None:
            results.note("no per-process GPU memory (no GPU, or NVML did not list the servers' processes): only KV capacities compared")
        else:
            results.note(f"the servers hold different KV caches ({base_cap} vs {cand_cap} tokens): their GPU memory "
                         f"({d['server_gpu_delta_pct']:+.1f}%) is not compared; set sglang.max_total_tokens to compare it")
        if d["startup_split_disturbed"]:
            results.note(d["startup_split_disturbed"])
            shown.append(f"**Note.** {d['startup_split_disturbed']}.")
        return shown
    results.table("memory", m.rows)
    results.table("deltas", m.deltas)
    results.metric("context", {"where": m.where, "candidate_phases": p.candidate_phases})
    results.metric("points_out_of_memory", sum(r["status"] != "ok" for r in m.rows))
    worst = max(m.deltas, key=lambda d: d["peak_delta_pct"]) if m.deltas else None
    if worst:
        results.verdict("memory.peak", "memory", f"candidate peak memory within +{p.margin_pct:g}% of the baseline's (worst point)",
                        worst["peak_delta_pct"], "<=", p.margin_pct, unit="%",
                        detail=f"batch {worst['batch']}, length {worst['input_length']}; {m.where}")
        results.verdict("memory.kv_cache_size", "control", "KV cache size matches 2·layers·batch·kv_heads·tokens·head_dim·bytes",
                        int(kv_cache_matches(m.rows)), "==", 1)
    return shown


@dataclass
class MemoryResults:
    """05's results as ``compare`` reads them: one record per server or point."""

    points: list[dict[str, Any]]

    @classmethod
    def read(cls, res: Any) -> "MemoryResults | None":
        if res is None or res.status != "ok":
            return None
        if "sglang_memory" in res.tables:
            return cls([{**r, "point": r.get("role"), "server_GiB": r["server_gpu_bytes"] / GiB if r.get("server_gpu_bytes") else None}
                        for r in res.tables["sglang_memory"]])
        if res.tables.get("memory"):
            return cls([{**r, "point": f"{r.get('implementation')} b{r.get('batch')} n{r.get('input_length')}",
                         "peak_allocated_GiB": r["peak_allocated"] / GiB if r.get("peak_allocated") else None,
                         "peak_reserved_GiB": r["peak_reserved"] / GiB if r.get("peak_reserved") else None}
                        for r in res.tables["memory"]])
        return None
