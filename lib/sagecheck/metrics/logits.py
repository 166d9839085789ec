"""Comparing next-token distributions of two backends on identical token sequences (02_logits, and 07's natural text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sagecheck.engines import FULL_LOGITS


def compare_logprobs(base: torch.Tensor, cand: torch.Tensor, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Per position: KL(base || cand), top-1 / top-5 agreement, max abs and RMS logit difference, cosine.

    ``base`` and ``cand`` are full log-softmax distributions ``[n, vocab]``. Logit
    differences are taken between log-probabilities (logits up to their per-position
    constant, which is what a sampler sees). Everything is computed in float64.
    """
    if base.shape != cand.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(cand.shape)}")
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("kl", "top1", "top5", "max_abs", "rms", "cosine")}
    for start in range(0, base.shape[0], chunk):
        b = base[start : start + chunk].double()
        c = cand[start : start + chunk].double()
        pb = b.exp()
        kl = (pb * (b - c)).sum(-1).clamp_min(0.0)
        top1 = b.argmax(-1) == c.argmax(-1)
        top5_b = b.topk(5, dim=-1).indices
        top5_c = c.topk(5, dim=-1).indices
        top5 = (top5_b.sort(-1).values == top5_c.sort(-1).values).all(-1)
        diff = b - c
        # log-probabilities are -inf nowhere for a softmax over finite logits; guard anyway
        diff = torch.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0)
        bc = b - b.mean(-1, keepdim=True)
        cc = c - c.mean(-1, keepdim=True)
        cos = (bc * cc).sum(-1) / (bc.norm(dim=-1) * cc.norm(dim=-1)).clamp_min(1e-300)
        for key, val in (("kl", kl), ("top1", top1), ("top5", top5), ("max_abs", diff.abs().amax(-1)),
                         ("rms", diff.pow(2).mean(-1).sqrt()), ("cosine", cos)):
            out[key].append(val.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def compare_topk(base_vals: np.ndarray, base_idx: np.ndarray, cand_vals: np.ndarray, cand_idx: np.ndarray) -> dict[str, np.ndarray]:
    """The same comparison from top-k logprobs only (the SGLang engine's view).

    KL is restricted to the baseline's top-k tokens, with the candidate's logprob for a
    token it did not list taken as its own k-th logprob (an upper bound for that
    token's probability); the mass outside the top-k is ignored. Reported as an
    approximation.
    """
    n, k = base_vals.shape
    kl = np.zeros(n)
    max_abs = np.zeros(n)
    for i in range(n):
        cand_map = dict(zip(cand_idx[i].tolist(), cand_vals[i].tolist()))
        floor = float(cand_vals[i].min())
        c = np.array([cand_map.get(t, floor) for t in base_idx[i].tolist()])
        pb = np.exp(base_vals[i])
        kl[i] = max(0.0, float((pb * (base_vals[i] - c)).sum()))
        shared = [t for t in base_idx[i].tolist() if t in cand_map]
        bmap = dict(zip(base_idx[i].tolist(), base_vals[i].tolist()))
        max_abs[i] = max((abs(bmap[t] - cand_map[t]) for t in shared), default=np.nan)
    top1 = base_idx[:, 0] == cand_idx[:, 0]
    k5 = min(5, k)
    top5 = np.array([set(base_idx[i, :k5].tolist()) == set(cand_idx[i, :k5].tolist()) for i in range(n)])
    return {"kl": kl, "top1": top1, "top5": top5, "max_abs": max_abs}


def summarize(per_position: dict[str, np.ndarray]) -> dict[str, float]:
    """Aggregates over positions: KL mean / p99 / max, agreement rates, difference maxima, cosine."""
    kl = per_position["kl"]
    out: dict[str, Any] = {
        "positions": int(kl.size),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(per_position["top1"])),
        "top5_agreement": float(np.mean(per_position["top5"])),
        "max_abs_logit_diff": float(np.nanmax(per_position["max_abs"])) if np.isfinite(per_position["max_abs"]).any() else float("nan"),
    }
    if "rms" in per_position:
        out["rms_logit_diff"] = float(np.sqrt(np.mean(per_position["rms"] ** 2)))
    if "cosine" in per_position:
        out["cosine_min"] = float(per_position["cosine"].min())
        out["cosine_mean"] = float(per_position["cosine"].mean())
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two greedy continuations differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def collect(backend: Any, prompts: list[list[int]], top_k: int | None = None) -> list[Any]:
    """Next-token distributions of every prompt: the full log-softmax on the CPU (``top_k`` None), or the top-k."""
    out = []
    for ids in prompts:
        if top_k is None:
            out.append(backend.next_token_logprobs(ids).float().cpu())
        else:
            out.append(backend.next_token_logprobs(ids, top_k=top_k))
    return out


def top_k_for(engine: Any, top_k: int) -> int | None:
    """None (the full vocabulary) where the engine gives it, else ``top_k``."""
    return None if FULL_LOGITS in engine.capabilities else top_k


def compare_collected(base: list[Any], cand: list[Any]) -> list[dict[str, np.ndarray]]:
    """Per prompt, per position comparison of two :func:`collect` results."""
    per_prompt = []
    for b, c in zip(base, cand):
        if isinstance(b, torch.Tensor):
            per_prompt.append(compare_logprobs(b, c))
        else:
            per_prompt.append(compare_topk(b.values, b.indices, c.values, c.indices))
    return per_prompt


def concat(per_prompt: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = per_prompt[0].keys()
    return {k: np.concatenate([p[k] for p in per_prompt]) for k in keys}


def position_ranges(kl: np.ndarray, loss_delta: np.ndarray, short_range: list[int], long_range: list[int]) -> tuple[list[dict[str, Any]], str]:
    """KL and loss difference averaged over short and long positions of one long sequence.

    ``kl[i]`` and ``loss_delta[i]`` belong to the prediction of token ``i + 1``. If no position
    falls in ``long_range`` (a shorter sequence), the last quarter stands in, and the returned
    note says so.
    """
    positions = np.arange(1, loss_delta.size + 1)
    note = ""
    masks = {}
    for name, (lo, hi) in (("short", short_range), ("long", long_range)):
        m = (positions >= lo) & (positions < hi)
        if m.any():
            masks[name] = m
    if "long" not in masks:
        start = int(0.75 * (loss_delta.size + 1))
        masks["long"] = positions >= start
        note = (f"no positions in {list(long_range)} (longest context {loss_delta.size + 1}): "
                f"the last quarter ({start}+) stands in for the long range")
    rows = [{"range": name, "positions": f"{positions[m].min()}-{positions[m].max()}", "n": int(m.sum()),
             "kl_mean": float(kl[m].mean()), "loss_delta_mean": float(loss_delta[m].mean()),
             "loss_delta_abs_mean": float(np.abs(loss_delta[m]).mean())} for name, m in masks.items()]
    return rows, note


# --------------------------------------------------------------------------- 02_logits


def prompt_sets(engine: Any, p: Any) -> tuple[dict[str, list[list[int]]], Any]:
    """The short and long prompts of 02, cut from ``p.text`` with the engine's tokenizer; and the text."""
    from sagecheck.data import corpus, prompts

    text = corpus.load_text(p.text)
    return prompts.prompt_sets(engine.tokenizer, text.text, p.n_short, p.short_tokens, p.n_long, p.long_tokens, p.seed), text


@dataclass
class Measured:
    """Per backend label and prompt set: the next-token distributions and the greedy continuations; and the
    accepted-precision control's distributions with its own baseline's (``control``: its label)."""

    distributions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    greedy: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)
    top_k: int | None = None
    control: str | None = None
    control_distributions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # "baseline", "control"


def measure(engine: Any, sets: dict[str, list[list[int]]], greedy_tokens: int, top_k: int, control_engine: Any = None) -> Measured:
    """Both backends on the same prompts: distributions (full or top-k) and greedy continuations; then the control
    against its engine's baseline on the same prompts, seen as the candidate is (the top-k where the run's engine gives
    only that)."""
    out = Measured(top_k=top_k_for(engine, top_k))
    for label in engine.pair:
        with engine.backend(label) as b:
            out.distributions[label] = {name: collect(b, ps, out.top_k) for name, ps in sets.items()}
            out.greedy[label] = {name: b.generate(ps, greedy_tokens) for name, ps in sets.items()}
    if control_engine is not None:
        ce = control_engine
        out.control = ce.control
        for role, label in (("baseline", ce.baseline), ("control", ce.control)):
            if ce is engine and label == engine.baseline:
                out.control_distributions[role] = out.distributions[label]
                continue
            with ce.backend(label) as b:
                out.control_distributions[role] = {name: collect(b, ps, out.top_k) for name, ps in sets.items()}
    return out


@dataclass
class Comparison:
    aggregate: list[dict[str, Any]]  # per set, then "all"; then the control's "all"
    per_prompt: list[dict[str, Any]]
    overall: dict[str, Any]
    kl_series: dict[str, np.ndarray]  # the prompts drawn by position (the long ones where there are)
    kl_by_set: dict[str, np.ndarray]  # every position's KL, per prompt set; and the control's over all positions
    greedy_identical: int
    greedy_prompts: int
    control: str | None = None
    control_overall: dict[str, Any] | None = None


def compare(measured: Measured, sets: dict[str, list[list[int]]], baseline: str, candidate: str) -> Comparison:
    per_set, rows, kl_series = {}, [], {}
    for name, ps in sets.items():
        per_prompt = compare_collected(measured.distributions[baseline][name], measured.distributions[candidate][name])
        per_set[name] = concat(per_prompt)
        for i, pp in enumerate(per_prompt):
            div = first_divergence(measured.greedy[baseline][name][i], measured.greedy[candidate][name][i])
            rows.append({"set": name, "prompt": i, "tokens": len(ps[i]), **summarize(pp),
                         "greedy_first_divergence": div if div is not None else "none"})
            if name == "long" or (name == "short" and "long" not in sets):
                kl_series[f"{name} #{i}"] = pp["kl"]
    aggregate = [{"set": name, "compared": candidate, **summarize(v)} for name, v in per_set.items()]
    overall = summarize(concat(list(per_set.values())))
    aggregate.append({"set": "all", "compared": candidate, **overall})
    kl_by_set = {name: v["kl"] for name, v in per_set.items()}
    control_overall = None
    if measured.control:
        cd = measured.control_distributions
        control_all = concat([p for name in sets for p in compare_collected(cd["baseline"][name], cd["control"][name])])
        control_overall = summarize(control_all)
        aggregate.append({"set": "all", "compared": f"{measured.control} (accepted precision)", **control_overall})
        kl_by_set[f"all: {measured.control}"] = control_all["kl"]
    same = sum(r["greedy_first_divergence"] == "none" for r in rows)
    return Comparison(aggregate, rows, overall, kl_series, kl_by_set, same, len(rows), measured.control, control_overall)


PER_PROMPT_COLUMNS = ["set", "prompt", "tokens", "kl_mean", "kl_p99", "kl_max", "top1_agreement", "top5_agreement",
                      "max_abs_logit_diff", "greedy_first_divergence"]


def record(results: Any, c: Comparison, p: Any, text: Any) -> None:
    """02's results and verdicts: the candidate's KL and top-1 agreement against the control's on the same positions."""
    from sagecheck.thresholds import from_control

    results.metric("overall", c.overall)
    results.metric("per_set", {a["set"]: a for a in c.aggregate if not a["compared"].endswith("(accepted precision)")})
    results.metric("control", {"implementation": c.control, **(c.control_overall or {})})
    results.metric("greedy_identical", c.greedy_identical)
    results.metric("greedy_prompts", c.greedy_prompts)
    results.metric("text", text.description)
    results.table("per_prompt", c.per_prompt)
    o, k = c.overall, c.control_overall or {}
    on = f"the same {o['positions']} positions"
    results.verdict("logits.kl_mean", "accuracy", "mean KL(baseline || candidate)", o["kl_mean"], "<=", k.get("kl_mean", float("nan")),
                    unit="nats", detail=f"{o['positions']} positions; p99 {o['kl_p99']:.3g}, max {o['kl_max']:.3g}",
                    source=from_control(c.control, on, f"{k.get('kl_mean', float('nan')):.3g} nats"))
    results.verdict("logits.top1", "accuracy", "top-1 agreement", o["top1_agreement"], ">=", k.get("top1_agreement", float("nan")),
                    source=from_control(c.control, on, f"{k.get('top1_agreement', float('nan')):.4g}"))
