"""GPU memory: the torch allocator's peaks, the device's used memory from NVML, and sizes of weights and KV cache."""

from __future__ import annotations

from typing import Any

import torch


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


def process_tree_gpu_bytes(pid: int) -> int | None:
    """GPU memory held by a process and its descendants on every GPU, as NVML reports it per process.

    An SGLang server's memory sits in its scheduler processes (one per tensor-parallel rank),
    children of the process that was started. None where NVML or the process is not available,
    or NVML lists none of them (in a container NVML may see other process ids).
    """
    try:
        import psutil
        import pynvml

        root = psutil.Process(pid)
        pids = {root.pid, *(c.pid for c in root.children(recursive=True))}
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        total, seen = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    total, seen = total + int(proc.usedGpuMemory), True
        return total if seen else None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


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
    from sagecheck.metrics.throughput import random_prompts

    device = engine.device
    prompts = random_prompts(engine.config.vocab_size, batch, length, seed, device)
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
        "kv_cache_expected": kv_cache_bytes_expected(engine.config, batch, length + decode_tokens, engine.dtype),
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
    differences. Seen on the H100 with three 8B servers started side by side: weights 15.67 vs 15.02 GB
    for the same model and CUDA graphs -0.72 GB. The signs of that: a negative figure, or weights that
    differ between servers of the same model.
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