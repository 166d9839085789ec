"""The kernel at the configurations the backend used: every distinct configuration of the candidate's census of kernel
calls (:mod:`sagecheck.census`: entry point, kernel, causal, head dim, GQA ratio, dtype, and each class of key count
it met) run again on the kernel that ran, against the float64 reference and against that kernel's emulation, with 08's
inputs (:func:`sagecheck.metrics.kernel.make_inputs`) and 08's bound on kernel-vs-emulation disagreement. A
configuration whose kernel disagrees with its emulation fails every code path that called it (10 reads it so).

Where it runs: a kernel the census names as ``module:function`` of plain torch (the emulations, the tests' kernels)
anywhere; sageattention's own functions where CUDA and sageattention are there, else the configuration is listed as not
replayed, with why. 10 runs the replay, after its paths: 08 runs before the paths that make the census.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from sagecheck import census
from sagecheck.attention.baseline import reference
from sagecheck.metrics.kernel import Shape, make_inputs

PARTIAL_OFFSET = 33  # a key count of a "partial" class: 33 keys into a 64-key block


def emulation_of(config: dict[str, Any], kernel: Any = None) -> str:
    """The emulation of the kernel that ran: a kernel may name it (``__sagecheck_emulation__``); else SageAttention 2's
    FP8 kernels -> ``sage2-fp8-emulated``, every other (1.0.6's and SA2's Triton kernels) -> ``sage-emulated``."""
    named = getattr(kernel, "__sagecheck_emulation__", None)
    if named:
        return named
    return "sage2-fp8-emulated" if "fp8" in config["kernel"] else "sage-emulated"


def resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def shapes(entry: dict[str, Any], cap: int | None) -> list[tuple[int, int]]:
    """(queries, keys) to replay a configuration at: one per class of key count it met (the class's lower edge, 33
    keys into a block for a partial class), as many queries as keys where causal, one where every call had one query,
    else the largest query class's edge (at most the keys); ``cap`` bounds the keys (a CPU's float64 reference)."""
    c = entry["config"]
    one_query = set(entry.get("q_classes", {})) <= {"1"}
    q_edges = [int(label.split("-")[0].rstrip("+")) for label in entry.get("q_classes", {})] or [1]
    out = []
    for label in sorted(entry.get("k_classes", {})):
        lo = int(label.split()[0].split("-")[0].rstrip("+"))
        n_k = lo + (PARTIAL_OFFSET if "partial" in label and lo >= 1 else 0)
        if lo == 1 and "partial" in label:
            n_k = 1
        if cap is not None and n_k > cap:
            continue
        n_q = n_k if c["causal"] else 1 if one_query else min(max(q_edges), n_k)
        if (n_q, n_k) not in out:
            out.append((n_q, n_k))
    return out


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def replay(kernel_census: dict[str, Any], bound: float, device: torch.device, seed: int = 0,
           cap: int | None = 512) -> list[dict[str, Any]]:
    """Every configuration at its shapes: the kernel vs float64, its emulation vs float64, kernel vs emulation, and
    whether that exceeds ``bound``; a configuration that cannot run here says why."""
    from sagecheck import attention

    rows = []
    for key, entry in kernel_census.items():
        c = entry["config"]
        base = {"key": key, "configuration": census.label(c), "kernel": c["kernel"]}
        if c["ref"].startswith("sageattention:") and device.type != "cuda":
            rows.append({**base, "status": "not replayed", "why": "sageattention's kernels need a CUDA GPU"})
            continue
        try:
            kernel = resolve(c["ref"])
        except (ImportError, AttributeError) as e:
            rows.append({**base, "status": "not replayed", "why": f"{c['ref']} cannot be imported here ({e})"})
            continue
        emulation = emulation_of(c, kernel)
        emulate = attention.get(emulation)
        dtype = c["dtype"] if c["dtype"] in ("float16", "bfloat16") else "float16"
        for n_q, n_k in shapes(entry, None if device.type == "cuda" else cap):
            shape = Shape(1, c["q_heads"], c["kv_heads"], n_q, n_k, c["head_dim"], c["causal"], dtype)
            q, k, v = make_inputs(shape, device, seed)
            if c["emulated"] and c["dtype"] not in ("float16", "bfloat16"):
                q, k, v = q.float(), k.float(), v.float()  # the dtype the emulated kernel ran in
            ref = reference(q, k, v, causal=c["causal"], scale=c["sm_scale"])
            got = call(kernel, c, q, k, v)
            emu = emulate(q, k, v, causal=c["causal"], scale=c["sm_scale"])
            vs_emu = rel_l2(got, emu)
            rows.append({**base, "status": "ok", "shape": shape.label.rsplit(" ", 1)[0] + " " + str(q.dtype).removeprefix("torch."),
                         "emulation": emulation,
                         "kernel_vs_reference": rel_l2(got, ref), "emulation_vs_reference": rel_l2(emu, ref),
                         "kernel_vs_emulation": vs_emu, "flagged": vs_emu > bound})
    return rows


def call(kernel: Any, config: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The kernel on ``[1, heads, seq, d]`` tensors, in its own calling convention: an attention implementation's
    (``causal=``, ``scale=``), or sageattention's (``tensor_layout``, ``is_causal``, ``sm_scale``; varlen packed)."""
    if not config["ref"].startswith("sageattention:"):
        return kernel(q, k, v, causal=config["causal"], scale=config["sm_scale"])
    name = config["ref"].split(":", 1)[1]
    if name == "sageattn_varlen":
        n_q, n_k = q.shape[2], k.shape[2]
        cu_q = torch.tensor([0, n_q], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, n_k], dtype=torch.int32, device=q.device)
        out = kernel(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(),
                     cu_q, cu_k, n_q, n_k, is_causal=config["causal"], sm_scale=config["sm_scale"])
        return out.transpose(0, 1)[None]
    return kernel(q, k, v, tensor_layout="HND", is_causal=config["causal"], sm_scale=config["sm_scale"])


def flagged_by_path(rows: list[dict[str, Any]], per_path: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per path: the replayed configurations of its own census that the replay flags."""
    flagged = {r["key"] for r in rows if r.get("flagged")}
    return {path: [r for r in rows if r.get("flagged") and r["key"] in made] for path, made in per_path.items()
            if flagged & set(made)}
