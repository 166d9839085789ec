"""The attention op alone: accuracy of each implementation against a float64 reference, and speed.

Inputs are random normal Q, K, V, with a per-channel offset added to K (real keys have
channel-wise outliers: that is what SageAttention's K smoothing is for). The error
of ``sdpa``, both emulations (``sage-emulated``: 1.0.6; ``sage2-fp8-emulated``: SageAttention 2's
Hopper kernel) and ``sage`` is measured against attention computed in float64 from the same
inputs; ``sage`` is also compared with the emulation of the kernel that ran (the dispatch probe
says which): if the kernel is right, it agrees with its emulation far more closely than either
agrees with the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from sagecheck import attention
from sagecheck.attention.baseline import flops, reference
from sagecheck.metrics.drift import error_stats
from sagecheck.metrics.timing import time_callable

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    causal: bool
    dtype: str

    @property
    def label(self) -> str:
        c = "causal" if self.causal else "full"
        return f"b{self.batch} h{self.heads}/{self.kv_heads} q{self.n_q} k{self.n_k} d{self.head_dim} {c} {self.dtype}"


def accuracy_shapes(p: Any, device: torch.device) -> list[Shape]:
    """The sweep of the kernel notebook's parameters. On CPU, a shape is skipped where its score matrix is larger than
    ``cpu_max_seq_len`` squared (the cost of the float64 reference and the emulations): long prefills go, decode steps
    (one query) and a chunk of queries over a longer cache stay."""
    shapes = []
    limit = None if device.type == "cuda" else p.cpu_max_seq_len**2

    def fits(n_q: int, n_k: int) -> bool:
        return limit is None or n_q * n_k <= limit

    for dtype in p.dtypes:
        for d in p.head_dims:
            for n in p.seq_lens:
                if fits(n, n):
                    shapes.extend(Shape(p.batch, p.heads, p.kv_heads, n, n, d, causal, dtype) for causal in (False, True))
            for nk in p.decode_kv_lens:
                if fits(1, nk):
                    shapes.append(Shape(max(p.batch, 2), p.heads, p.kv_heads, 1, nk, d, False, dtype))
            # a chunk of queries over a longer cache (chunked prefill): causal, bottom-right aligned
            nk = 1000 if fits(128, 1000) else p.cpu_max_seq_len
            shapes.append(Shape(p.batch, p.heads, p.kv_heads, min(128, nk), nk, d, True, dtype))
    return shapes


def make_inputs(shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[shape.dtype]
    q = torch.randn(shape.batch, shape.heads, shape.n_q, shape.head_dim, generator=gen, device=device)
    k = torch.randn(shape.batch, shape.kv_heads, shape.n_k, shape.head_dim, generator=gen, device=device)
    k = k + 2.0 * torch.randn(1, shape.kv_heads, 1, shape.head_dim, generator=gen, device=device)  # channel offsets
    v = torch.randn(shape.batch, shape.kv_heads, shape.n_k, shape.head_dim, generator=gen, device=device)
    return q.to(dt), k.to(dt), v.to(dt)


# both emulations run at every shape: each scheme's own error is shown, also where no kernel runs (a CPU run)
EMULATIONS = ("sage-emulated", "sage2-fp8-emulated")


def run_shape(shape: Shape, device: torch.device, seed: int, kernel_available: bool,
              emulation: str = "sage-emulated") -> dict[str, Any]:
    """Errors of every implementation at one shape, whether each call left its inputs unchanged, and the kernel against
    ``emulation`` (the one that reproduces its scheme)."""
    q, k, v = make_inputs(shape, device, seed)
    ref = reference(q, k, v, causal=shape.causal)
    row: dict[str, Any] = {"shape": shape.label, **asdict(shape), "emulation": emulation}
    row["kind"] = shape_kind(row)
    outs = {}
    impls = ["sdpa", *EMULATIONS] + (["sage"] if kernel_available else [])
    for name in impls:
        q0, k0, v0 = q.clone(), k.clone(), v.clone()
        try:
            out = attention.get(name)(q, k, v, causal=shape.causal)
        except attention.UnsupportedCall as e:
            row[f"{name}_status"] = f"unsupported: {e}"
            continue
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_status"] = "out of memory"
            torch.cuda.empty_cache()
            continue
        row[f"{name}_status"] = "ok"
        row[f"{name}_inputs_unchanged"] = bool(torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0))
        if not row[f"{name}_inputs_unchanged"]:
            q, k, v = q0, k0, v0
        outs[name] = out
        for key, val in error_stats(ref, out).items():
            row[f"{name}_vs_ref_{key}"] = val
    if "sage" in outs and emulation in outs:
        for key, val in error_stats(outs[emulation].to(outs["sage"].dtype), outs["sage"]).items():
            row[f"sage_vs_emulated_{key}"] = val
    if kernel_available and shape.n_q == shape.n_k:
        from sagecheck.attention.sage_kernel import raw_sageattn

        k0 = k.clone()
        raw_sageattn()(q, k, v, is_causal=shape.causal)
        row["raw_sageattn_k_unchanged"] = bool(torch.equal(k, k0))
    return row


def likely_cause(row: dict[str, Any]) -> tuple[str, str]:
    """Our reading of why the kernel and its emulation disagree at this shape: a short tag for the table
    and the explanation, which the notebook states once per tag."""
    if emulation_of(row) == "sage-emulated" and not row["causal"] and row["n_k"] % 64:
        return ("key padding: n_k not a multiple of 64",
                "the non-causal 1.0.6 kernel loads the keys missing from its last 64-key block as zeros and lets them into "
                "the softmax denominator with score 0 (attn_qk_int8_per_block.py masks their loads, not their scores); "
                "the fewer real keys in that block, the larger the error")
    return ("not explained", "not explained by the block padding; compare with the emulation's documented differences")


def status_word(status: Any) -> str:
    """A cell's word where an implementation produced no figure: never a bare nan."""
    if status is None:
        return "not run"
    return "unsupported" if str(status).startswith("unsupported") else str(status)


def flagged_view(flagged: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The flagged shapes as shown (their errors and a short cause tag) and each tag's explanation, stated once."""
    rows, causes = [], {}
    for r in flagged:
        tag, why = likely_cause(r)
        causes[tag] = why
        rows.append({"shape": r["shape"], "kernel vs emulation": r["sage_vs_emulated_rel_l2"], "kernel vs reference": r["sage_vs_ref_rel_l2"],
                     "emulation vs reference": r[f"{emulation_of(r)}_vs_ref_rel_l2"], "likely cause": tag})
    return rows, causes


def emulation_of(row: dict[str, Any]) -> str:
    """The emulation a row's kernel was compared with (rows written before SageAttention 2 was emulated: 1.0.6's)."""
    return row.get("emulation", "sage-emulated")


def emulation_under_test(covered: tuple[str | None, str, dict[str, Any]] | None, candidate: str) -> str:
    """The emulation 08 compares the kernel with and judges: the one that reproduces the kernel that ran
    (:func:`probe_kernel_emulation`); where no kernel ran, the run's candidate if it is an emulation, else 1.0.6's."""
    if covered is not None and covered[0]:
        return covered[0]
    return candidate if candidate in EMULATIONS else "sage-emulated"


# the full accuracy table: (column heading, implementations that must have run, field); "emulation" stands for the row's
ACCURACY_COLUMNS = [
    ("sdpa vs reference", ("sdpa",), "sdpa_vs_ref_rel_l2"),
    ("1.0.6 emulation vs reference", ("sage-emulated",), "sage-emulated_vs_ref_rel_l2"),
    ("SA2 FP8 emulation vs reference", ("sage2-fp8-emulated",), "sage2-fp8-emulated_vs_ref_rel_l2"),
    ("kernel vs reference", ("sage",), "sage_vs_ref_rel_l2"),
    ("kernel vs its emulation", ("sage", "emulation"), "sage_vs_emulated_rel_l2"),
    ("kernel cosine", ("sage",), "sage_vs_ref_cosine"),
    ("kernel max |error|", ("sage",), "sage_vs_ref_max_abs"),
]


def accuracy_view(rows: list[dict[str, Any]], kernel_ran: bool) -> list[dict[str, Any]]:
    """The full accuracy table as shown: relative L2 errors where an implementation ran, its status word
    (unsupported, out of memory) where it did not; the kernel's columns only where the kernel was available."""
    out = []
    for r in rows:
        view: dict[str, Any] = {"shape": r["shape"]}
        for heading, impls, field in ACCURACY_COLUMNS:
            if "sage" in impls and not kernel_ran:
                continue
            impls = tuple(emulation_of(r) if i == "emulation" else i for i in impls)
            bad = [i for i in impls if r.get(f"{i}_status") != "ok"]
            value = r.get(field)
            view[heading] = status_word(r.get(f"{bad[0]}_status")) if bad else ("n/a" if value is None else value)
        if kernel_ran:
            inputs = r.get("sage_inputs_unchanged")
            view["kernel leaves inputs alone"] = status_word(r.get("sage_status")) if inputs is None else ("yes" if inputs else "NO")
        out.append(view)
    return out


def shape_kind(row: dict[str, Any]) -> str:
    """prefill (n_q = n_k), decode (one query) or chunk (a block of queries over a longer cache)."""
    if row["n_q"] == row["n_k"]:
        return "prefill"
    return "decode" if row["n_q"] == 1 else "chunk"


def probe_kernel_emulation() -> tuple[str | None, str, dict[str, Any]]:
    """(the emulation that reproduces what the selected sageattention entry point dispatched to or None, why, the
    kernel's description), probed once (:func:`sagecheck.attention.sage_kernel.emulation_for`)."""
    from sagecheck.attention import sage_kernel

    info = sage_kernel.kernel_info(probe=True)
    emulation, why = sage_kernel.emulation_for(info)
    return emulation, why, info


def agreement(rows: list[dict[str, Any]], threshold: float, covered: tuple[str | None, str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Where the kernel ran: the shapes where it disagrees with its emulation by more than ``threshold``
    (relative L2), and over the others the smallest ratio kernel-vs-reference / kernel-vs-emulation
    (a right kernel sits much closer to its emulation than to the reference). Where the emulation does not reproduce
    the kernel's scheme (``covered``: see :func:`probe_kernel_emulation`), nothing is flagged and the kernel is judged
    against float64 only (``not_emulated`` says why)."""
    ran = [r for r in rows if r.get("sage_status") == "ok"]
    if covered is not None and not covered[0]:
        return {"ran": ran, "flagged": [], "agree_ratio_min": float("nan"), "not_emulated": covered[1], "kernel": covered[2],
                "unsupported": [r for r in rows if str(r.get("sage_status", "")).startswith("unsupported")],
                "inputs_unchanged": all(r.get("sage_inputs_unchanged") for r in ran),
                "kernel_vs_ref_max": max((r["sage_vs_ref_rel_l2"] for r in ran), default=float("nan"))}
    flagged = [r for r in ran if r["sage_vs_emulated_rel_l2"] > threshold]
    agree = [r for r in ran if r["sage_vs_emulated_rel_l2"] <= threshold]
    ratios = [r["sage_vs_ref_rel_l2"] / r["sage_vs_emulated_rel_l2"] for r in agree if r["sage_vs_emulated_rel_l2"] > 0]
    exact = [r for r in agree if r["sage_vs_emulated_rel_l2"] == 0]  # bit-identical outputs: agreement beyond any ratio
    return {
        "ran": ran,
        "flagged": flagged,
        "not_emulated": None,
        "kernel": covered[2] if covered else None,
        "agree_ratio_min": min(ratios) if ratios else (float("inf") if exact else float("nan")),
        "unsupported": [r for r in rows if str(r.get("sage_status", "")).startswith("unsupported")],
        "inputs_unchanged": all(r.get("sage_inputs_unchanged") for r in ran),
    }


def speed(impl: str, batch: int, heads: int, n: int, head_dim: int, causal: bool, dtype: str, device: torch.device,
          repeats: int, seed: int) -> dict[str, Any]:
    """Median TOPS of one implementation (FLOPs = 4·b·h·n²·d, halved when causal)."""
    shape = Shape(batch, heads, heads, n, n, head_dim, causal, dtype)
    try:
        q, k, v = make_inputs(shape, device, seed)
        fn = attention.get(impl)
        samples = time_callable(lambda: fn(q, k, v, causal=causal), device, repeats=repeats, warmup=3)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"implementation": impl, "seq_len": n, "status": "out of memory"}
    except (attention.UnsupportedCall, attention.AttentionUnavailable) as e:
        return {"implementation": impl, "seq_len": n, "status": f"unsupported: {e}"}
    f = flops(batch, heads, n, n, head_dim, causal)
    return {
        "implementation": impl, "seq_len": n, "batch": batch, "heads": heads, "head_dim": head_dim, "causal": causal,
        "dtype": dtype, "status": "ok", "ms_median": samples.median, "ms_p10": samples.p10, "ms_p90": samples.p90,
        "tops": f / (samples.median / 1e3) / 1e12, "clock": samples.clock,
    }


# --------------------------------------------------------------------------- 08_kernel


def run_shapes(p: Any, device: torch.device, kernel_available: bool, emulation: str = "sage-emulated") -> list[dict[str, Any]]:
    """Every accuracy shape of the sweep, each with its own seed."""
    return [run_shape(s, device, p.seed + i, kernel_available, emulation) for i, s in enumerate(accuracy_shapes(p, device))]


def error_curves(rows: list[dict[str, Any]], p: Any, causal: bool) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Relative L2 error against sequence length of every implementation (and kernel vs emulation), at the first dtype
    and the largest head dim, prefill shapes of one mask."""
    sub = [r for r in rows if r["causal"] == causal and r["n_q"] == r["n_k"] and r["dtype"] == p.dtypes[0]
           and r["head_dim"] == p.head_dims[-1]]
    fields = {name: f"{name}_vs_ref_rel_l2" for name in ("sdpa", *EMULATIONS, "sage")}
    fields["sage vs emulation"] = "sage_vs_emulated_rel_l2"
    xs, ys = {}, {}
    for name, f in fields.items():
        if any(f in r for r in sub):
            xs[name] = [r["n_k"] for r in sub]
            ys[name] = [r.get(f, float("nan")) for r in sub]
    return xs, ys


def speed_lengths(p: Any, device: torch.device) -> list[int]:
    """The sequence lengths timed: all on a GPU, those up to ``cpu_max_seq_len`` on the CPU (at least one)."""
    if device.type == "cuda":
        return list(p.speed_seq_lens)
    return [n for n in p.speed_seq_lens if n <= p.cpu_max_seq_len] or [min(p.speed_seq_lens + [p.cpu_max_seq_len])]


def speed_sweep(p: Any, device: torch.device, kernel_available: bool) -> list[dict[str, Any]]:
    """TOPS of sdpa (and the kernel where it runs) per head dim, mask and sequence length."""
    batch = p.speed_batch if device.type == "cuda" else 1
    impls = ["sdpa", "sage"] if kernel_available else ["sdpa"]
    return [speed(impl, batch, p.speed_heads, n, d, causal, p.dtypes[0], device, p.repeats, p.seed)
            for d in p.head_dims for causal in (False, True) for n in speed_lengths(p, device) for impl in impls]


def tops_curves(speed_rows: list[dict[str, Any]]) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    xs: dict[str, list[int]] = {}
    ys: dict[str, list[float]] = {}
    for r in speed_rows:
        if r["status"] != "ok":
            continue
        key = f"{r['implementation']} d={r['head_dim']} {'causal' if r['causal'] else 'full'}"
        xs.setdefault(key, []).append(r["seq_len"])
        ys.setdefault(key, []).append(r["tops"])
    return xs, ys


SPEED_COLUMNS = ["implementation", "head_dim", "causal", "seq_len", "ms_median", "ms_p10", "ms_p90", "tops", "status"]


def over_sdpa(speed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each timing with its TOPS over sdpa's at the same shape (``over_sdpa``; None where either did not run)."""
    shape = ("seq_len", "batch", "heads", "head_dim", "causal", "dtype")
    sdpa = {tuple(r.get(k) for k in shape): r for r in speed_rows if r.get("implementation") == "sdpa" and r.get("status") == "ok"}
    out = []
    for r in speed_rows:
        ref = sdpa.get(tuple(r.get(k) for k in shape))
        ratio = r["tops"] / ref["tops"] if ref and r.get("status") == "ok" and r.get("tops") and ref.get("tops") else None
        out.append({**r, "over_sdpa": ratio})
    return out


def record(results: Any, rows: list[dict[str, Any]], speed_rows: list[dict[str, Any]], agreed: dict[str, Any] | None,
           kernel_why: str, where: str, p: Any) -> None:
    """08's results and verdicts (the kernel's only where it ran)."""
    results.table("accuracy", rows)
    results.table("speed", speed_rows)
    results.metric("kernel", (agreed.get("kernel") or attention.info("sage")) if agreed is not None
                   else {"available": False, "reason": kernel_why})
    results.metric("device", where)
    name = emulation_of(rows[0]) if rows else "sage-emulated"
    emu = max(r[f"{name}_vs_ref_rel_l2"] for r in rows if r.get(f"{name}_status") == "ok")
    results.metric("emulation", attention.info(name))
    results.verdict("kernel.emulation_vs_reference", "kernel", f"emulation ({name}) vs float64 reference (worst shape)", emu,
                    "<=", p.emulation_vs_reference_max, detail="the quantization scheme's own error")
    results.verdict("kernel.sdpa_vs_reference", "control", "sdpa vs float64 reference (worst shape)",
                    max(r["sdpa_vs_ref_rel_l2"] for r in rows if r.get("sdpa_status") == "ok"), "<=", 1e-2)
    if agreed is None:
        results.note(f"kernel checks not run: {kernel_why}")
        return
    if agreed.get("not_emulated"):
        results.note(f"kernel against its emulation not judged: {agreed['not_emulated']}; the kernel is judged against "
                     "the float64 reference instead")
        results.verdict("kernel.vs_reference", "kernel", "kernel vs float64 reference (worst shape; its scheme is not emulated)",
                        agreed["kernel_vs_ref_max"], "<=", p.emulation_vs_reference_max,
                        detail="the limit of the emulated scheme's own error")
    else:
        _emulation_verdicts(results, agreed)
    results.verdict("kernel.inputs_unchanged", "kernel", "the sage call leaves q, k, v unchanged (all shapes)",
                    int(agreed["inputs_unchanged"]), "==", 1)
    raw = [r["raw_sageattn_k_unchanged"] for r in rows if r.get("raw_sageattn_k_unchanged") is not None]
    if raw:
        results.metric("raw_sageattn_changes_k", not all(raw))
    results.metric("sage_over_sdpa_tops", [{k: r[k] for k in ("head_dim", "causal", "seq_len", "over_sdpa")}
                                           for r in over_sdpa(speed_rows) if r["implementation"] == "sage" and r["over_sdpa"]])


def _emulation_verdicts(results: Any, agreed: dict[str, Any]) -> None:
    flagged = agreed["flagged"]
    causes = sorted(flagged_view(flagged)[1])
    shapes = [f"{r['shape']}: {r['sage_vs_emulated_rel_l2']:.2e}" for r in flagged]
    listed = 0  # whole shapes, up to about 500 characters; 08's flagged table lists them all
    while listed < len(shapes) and len("; ".join(shapes[: listed + 1])) <= 500:
        listed += 1
    more = f"; … {len(shapes) - listed} more in the flagged table" if listed < len(shapes) else ""
    results.verdict("kernel.vs_emulation", "kernel", "shapes where the kernel disagrees with its emulation", len(flagged), "<=", 0,
                    detail=(f"likely cause: {'; '.join(causes)}; " if causes else "") + "; ".join(shapes[:listed]) + more)
    results.verdict("kernel.agreement_ratio", "kernel", "where they agree: kernel-vs-reference / kernel-vs-emulation (smallest)",
                    agreed["agree_ratio_min"], ">=", 5.0)


def read_timings(res: Any) -> list[dict[str, Any]] | None:
    """08's timings as ``compare`` reads them: each with its TOPS over sdpa's (None where 08 did not run)."""
    if res is None or res.status != "ok" or "speed" not in res.tables:
        return None
    return over_sdpa(res.tables["speed"])


def accuracy_sentence(rows: list[dict[str, Any]], agreed: dict[str, Any] | None, kernel_why: str, p: Any) -> str:
    if agreed is None:
        return (f"**{len(rows)} shapes.** The kernel did not run ({kernel_why}): the figure shows the emulation against the "
                "float64 reference, the quantization scheme's own error.")
    if agreed.get("not_emulated"):
        return (f"**{len(rows)} shapes; the kernel ran at {len(agreed['ran'])}; its worst relative L2 against float64 is "
                f"{agreed['kernel_vs_ref_max']:.3g}.** Kernel against emulation is not judged: {agreed['not_emulated']}.")
    return (f"**{len(rows)} shapes; the kernel ran at {len(agreed['ran'])}, disagrees with its emulation at "
            f"{len(agreed['flagged'])} (relative L2 above {p.kernel_vs_emulation_max:g}), does not support "
            f"{len(agreed['unsupported'])}.**")


def flagged_tables(agreed: dict[str, Any] | None) -> list[tuple[list[dict[str, Any]], str]]:
    """(rows, caption) of the flagged shapes (with a cause tag each) and of the shapes the kernel does not support."""
    out = []
    if agreed and agreed["flagged"]:
        out.append((flagged_view(agreed["flagged"])[0], "Flagged: shapes where the kernel disagrees with its emulation (relative L2)"))
    if agreed and agreed["unsupported"]:
        out.append(([{"shape": r["shape"], "kernel": r["sage_status"]} for r in agreed["unsupported"]],
                    "Shapes the kernel does not support (callers fall back to the baseline)"))
    return out


def causes_text(agreed: dict[str, Any] | None) -> str | None:
    """Each cause tag of the flagged shapes explained once (None where nothing was flagged)."""
    if not agreed or not agreed["flagged"]:
        return None
    return "\n".join(f"- **{tag}**: {why}." for tag, why in flagged_view(agreed["flagged"])[1].items())


def error_figure(agreed: dict[str, Any] | None, p: Any, emulation: str = "sage-emulated") -> dict[str, Any]:
    """What 08's error-by-shape figure draws: the kernel against its emulation where it ran, else the emulation against
    the reference."""
    if agreed is not None and agreed.get("not_emulated"):
        return {"field": "sage_vs_ref_rel_l2", "ylabel": "kernel vs reference (relative L2)",
                "title": "Kernel vs float64 reference, every shape (its scheme is not emulated)",
                "threshold": p.emulation_vs_reference_max, "flagged": set()}
    if agreed is None:
        return {"field": f"{emulation}_vs_ref_rel_l2", "ylabel": f"{emulation} vs reference (relative L2)",
                "title": f"Emulation ({emulation}) vs float64 reference, every shape", "threshold": p.emulation_vs_reference_max, "flagged": set()}
    return {"field": "sage_vs_emulated_rel_l2", "ylabel": "kernel vs emulation (relative L2)",
            "title": "Kernel vs its emulation, every shape", "threshold": p.kernel_vs_emulation_max,
            "flagged": {r["shape"] for r in agreed["flagged"]}}
