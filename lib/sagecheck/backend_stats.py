"""The statistics a serving backend writes of what it ran, and how they are read.

sagecheck's ``sage_attn`` plugin runs in SGLang's scheduler processes (one per tensor-parallel rank), out of reach of
the HTTP API. With ``SAGE_ATTN_STATS_DIR`` set, each process writes ``<dir>/rank<R>-<pid>.json``: its configuration
(decode mode, kernel, heads per rank) at start, then its counters (batches on the kernel, batches with a cached
prefix, fallbacks to the baseline by reason, decode steps by path) while they change. This module is the file format's
reader: the engines and the metrics read the files through it, never by importing the plugin (which lives in the
servers). The plugin's writer (:mod:`sagecheck.sglang_plugin.stats`) takes its timing from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_interval_s() -> float:
    """Seconds between two writes of changed counters (``SAGE_ATTN_STATS_INTERVAL_S``, 0.5 by default; the tests
    shorten it). Readers wait a little longer than this for the counters of what they just ran."""
    raw = os.environ.get("SAGE_ATTN_STATS_INTERVAL_S", "")
    try:
        value = float(raw) if raw else 0.5
    except ValueError:
        value = 0.5
    return min(max(value, 0.01), 5.0)


def settle_s() -> float:
    """How long a reader waits for the counters of what just ran to be written."""
    return write_interval_s() + 0.1


def _json_files(folder: str | Path | None, pattern: str) -> list[dict[str, Any]]:
    """The readable JSON files of ``folder`` matching ``pattern``, in name order (a file being replaced or cut short is
    skipped: the writer rewrites it whole); none where the folder is missing."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = []
    for path in sorted(Path(folder).glob(pattern)):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def read(folder: str | Path | None) -> dict[str, Any] | None:
    """One server's files merged: the configuration of each rank and the counters summed; None when there are none."""
    ranks = _json_files(folder, "rank*.json")
    if not ranks:
        return None
    # every tensor-parallel rank runs every batch (on its share of the heads): a server's count is the largest of its
    # ranks', not their sum, which would count each batch tp times
    counts: dict[str, int] = {}
    for r in ranks:
        for key, n in r.get("counts", {}).items():
            counts[key] = max(counts.get(key, 0), n)
    configs = [r.get("config", {}) for r in ranks]
    return {"config": configs[0], "ranks": configs, "counts": counts,
            "counts_by_rank": {str(c.get("tp_rank", i)): r.get("counts", {}) for i, (c, r) in enumerate(zip(configs, ranks))}}


def describe(stats: dict[str, Any] | None) -> str:
    """One sentence on what ran, for a notebook; says so where nothing was written."""
    if not stats:
        return ("what sage_attn ran is not known: the server wrote no statistics (started outside sagecheck "
                "without SAGE_ATTN_STATS_DIR, or not the sagecheck plugin)")
    c, cfg = stats["counts"], stats["config"]
    fallbacks = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("fallback:")}
    fb = ", ".join(f"{v} {k}" for k, v in sorted(fallbacks.items())) or "none"
    decode = {"triton": "the baseline's Triton decode kernel", "sage": "the sageattention kernel"}.get(cfg.get("decode"), cfg.get("decode"))
    padded = (f" in {c.get('extend_kernel_calls', 0)} sageattn calls with {c.get('extend_padded_tokens', 0)} padded tokens"
              if cfg.get("prefill") == "batched" else "")
    rule = cfg.get("dispatch_rule")
    routed = (f", {c.get('extend_batches_triton', 0)} on Triton by the dispatch rule ({rule})" if rule else "")
    split = f" ({c['extend_batches_split']} split by log-sum-exp)" if c.get("extend_batches_split") else ""
    return (f"sage_attn ({cfg.get('kernel')}, sageattention {cfg.get('sageattention_version', '?')}): "
            f"{c.get('extend_batches_kernel', 0)} prefill batches on the kernel{padded}, {c.get('extend_batches_with_prefix', 0)} of "
            f"them with a cached prefix{split}{routed}; fallbacks to the baseline (batches or layer calls): {fb}; decode on {decode} "
            f"({c.get('decode_batches_kernel', 0)} eager steps on the kernel, {c.get('decode_batches_triton', 0)} eager and "
            f"{c.get('decode_graph_replays', 0)} CUDA-graph steps on Triton); "
            f"{len(stats['ranks'])} rank(s), {cfg.get('q_heads_per_rank')} query / {cfg.get('kv_heads_per_rank')} KV heads per rank")


def prefill_route(counted: dict[str, int] | None) -> dict[str, Any] | None:
    """Where a piece of work's prefill batches ran, from the change of the counters (:mod:`sagecheck.metrics.counted`):
    ``{"on": ..., "kernel": n, "triton": n, "fallbacks": n}``; ``on`` is ``kernel``, ``Triton (dispatch rule)``,
    ``kernel and Triton`` or ``the baseline (fallback)``. None where the backend counts nothing (not sagecheck's plugin)
    or counted no prefill batch."""
    if not counted:
        return None
    kernel, triton = counted.get("extend_batches_kernel", 0), counted.get("extend_batches_triton", 0)
    fallbacks = sum(v for k, v in counted.items() if k.startswith("fallback:"))
    if kernel and triton:
        on = "kernel and Triton"
    elif kernel:
        on = ON_KERNEL
    elif triton:
        on = "Triton (dispatch rule)"
    elif fallbacks:
        on = "the baseline (fallback)"
    else:
        return None
    return {"on": on, "kernel": kernel, "triton": triton, "fallbacks": fallbacks}


ON_KERNEL = "kernel"


def off_kernel(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Of a sweep's measured rows, (those whose route was counted, those of them whose prefill did not run wholly on the
    kernel): the ``prefill_on`` of :func:`prefill_route`."""
    routed = [r for r in rows if r.get("status", "ok") == "ok" and r.get("prefill_on")]
    return routed, [r for r in routed if r["prefill_on"] != ON_KERNEL]


def expected_heads_per_rank(heads: int, kv_heads: int, tp: int) -> tuple[int, int]:
    """Query and KV heads one tensor-parallel rank should hold: SGLang splits the query heads evenly and the KV heads
    too, replicating them where there are fewer KV heads than ranks (each rank then holds one)."""
    return heads // tp, max(1, kv_heads // tp)


def head_split(stats: dict[str, Any] | None, heads: int, kv_heads: int, tp: int) -> dict[str, Any]:
    """Did every rank of the server report the heads it should hold? ``passed`` with what was expected and reported.

    With tensor parallelism each scheduler process writes its own file: there must be one per rank (ranks 0..tp-1,
    each once) and each must hold heads/tp query heads and max(1, kv_heads/tp) KV heads.
    """
    q, kv = expected_heads_per_rank(heads, kv_heads, tp)
    expected = f"{tp} rank(s), {q} query / {kv} KV heads each (model: {heads} / {kv_heads}, tp {tp})"
    if not stats:
        return {"passed": False, "expected": expected, "reported": "no statistics written"}
    ranks = stats.get("ranks", [])
    seen = sorted(int(r.get("tp_rank", -1)) for r in ranks)
    per_rank = [f"rank {r.get('tp_rank')}: {r.get('q_heads_per_rank')}/{r.get('kv_heads_per_rank')} of tp {r.get('tp_size')}"
                for r in sorted(ranks, key=lambda r: int(r.get("tp_rank", -1)))]
    passed = seen == list(range(tp)) and all(
        r.get("q_heads_per_rank") == q and r.get("kv_heads_per_rank") == kv and r.get("tp_size") == tp for r in ranks)
    return {"passed": passed, "expected": expected, "reported": "; ".join(per_rank) or "no ranks"}


def census_path(folder: str | Path, pid: int | None = None) -> Path:
    """Where a server process writes its census of kernel calls (:mod:`sagecheck.census`)."""
    return Path(folder) / f"census-{pid if pid is not None else os.getpid()}.json"


def read_census(folder: str | Path | None) -> dict[str, Any] | None:
    """A server's census: every process's file merged (:func:`sagecheck.census.merge`); None where none was written."""
    from sagecheck.census import merge

    found = [f.get("census") or {} for f in _json_files(folder, "census-*.json")]
    return merge(found) if found else None
