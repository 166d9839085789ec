"""10_code_paths: every code path of the backend judged on its own, on the same tokens, with the proof that it ran.

An attention backend in a serving engine is several programs: a cold prefill, an extend over a cached
prefix (radix cache, multi-turn chat, few-shot prompts), chunked prefill, decode replayed from CUDA graphs,
eager decode (graphs off, or a batch above the captured sizes), decode of short sequences whose key counts
are no multiple of any block size, batches, and one copy per tensor-parallel rank. A report built from cold
prompts judges only the first. Here each path runs on the baseline and on the candidate, teacher-forced on
the same token sequences, and is compared with a reference path of the same server that computes the same
positions another way (:data:`PATHS`): the cold prefill for most, an unchunked extend over a cached prefix
for chunked prefill, a teacher-forced prefill of the generated sequence for decode.

Per position t of a path P with reference R, four log-probabilities: the candidate's ``c_P``, ``c_R`` and the
baseline's ``b_P``, ``b_R``. The control, measured in the same run, is the baseline's own path-to-path
difference ``k = |b_P - b_R|`` (what the path changes in a backend that is right), and ``e = |c_R - b_R|`` is
the candidate's error on the reference path (what the rest of the report judges). Two comparisons:

* against the baseline on the same path: ``|c_P - b_P|`` against ``e + k``;
* against the candidate's own reference path (self-consistency): ``|c_P - c_R|`` against ``2e + k``, the
  triangle-inequality bound for a path exactly as accurate as the reference.

Each is the ratio of the means over positions, with a paired bootstrap over positions (the same positions
resampled for both means) giving its lower 99% bound. A path fails where either lower bound exceeds
``ratio_max`` (1.5): a path twice as noisy as its control is caught, one as noisy is not
(``tests/test_code_paths.py`` holds both). The baseline against itself (an A/A run) gives ratios of 1.

A path that did not run, or whose evidence does not show it ran (no cached tokens, one chunk only, graphs
off, the candidate falling back to the baseline), is "not exercised", never "pass". A prefill path whose batches the
candidate's own dispatch rule sent to the baseline's kernel (sagecheck's sage_attn measures where its kernel pays) is
judged as that route, "on Triton": the backend serves that shape so, and its route must give the baseline's answers
too; no kernel call is looked for there, and the kernel itself is judged on the paths that reached it
(``sglang.sage_attn_dispatch=kernel`` sends every path there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Callable

import numpy as np

from sagecheck import backend_stats, census
from sagecheck.metrics.counted import Counted
from sagecheck.results import one_line
from sagecheck.engines import SERVERS, Generated

EPS = 1e-6  # nats: a difference below this is no difference (an A/A run of a deterministic backend gives exact zeros)
BOOTSTRAP = 2000

PATHS = {
    "cold": ("cold prefill", "each sequence alone from an empty cache: the reference of the paths below"),
    "prefix": ("extend over a cached prefix", "the sequence after an earlier request left its first tokens in the cache "
                                              "(radix cache; multi-turn chat, system and few-shot prompts); against the cold prefill"),
    "chunked": ("chunked prefill", "a sequence longer than the prefill chunk, each chunk an extend over the ones before; "
                                   "against an unchunked extend over a cached prefix at the same positions"),
    "decode_graphs": ("decode in CUDA graphs", "greedy decode of a batch within the captured sizes, short prompts (1-70 keys) "
                                               "and key counts no multiple of 64 among longer ones; each token's log-probability "
                                               "against the same token's in a prefill of the generated sequence"),
    "decode_eager": ("eager decode", "the same mix of prompt lengths in a batch above the captured sizes (or with graphs "
                                     "off); against a prefill"),
    "batch": ("batch invariance", "sequences inside one batch against each alone"),
    "tp_ranks": ("tensor-parallel ranks", "every path above on each rank's share of the heads"),
}


@dataclass
class Aligned:
    """The four log-probabilities of one path at the positions both backends computed (module docstring). On the decode
    paths each backend generates its own tokens: ``b_on_c`` is then the baseline's prefill of the candidate's tokens,
    the reference answer the candidate's figures are taken against (elsewhere the tokens are the same: ``b_ref``)."""

    c_path: np.ndarray
    c_ref: np.ndarray
    b_path: np.ndarray
    b_ref: np.ndarray
    b_on_c: np.ndarray | None = None

    @classmethod
    def join(cls, parts: list[tuple[np.ndarray, ...]]) -> "Aligned":
        width = len(parts[0]) if parts else 4
        cols = list(zip(*parts)) if parts else [[]] * width
        return cls(*(np.concatenate([np.asarray(x, dtype=np.float64) for x in col]) if col else np.zeros(0) for col in cols))

    @property
    def b_answer(self) -> np.ndarray:
        """The baseline's reference answer for the candidate's tokens."""
        return self.b_ref if self.b_on_c is None else self.b_on_c

    def __len__(self) -> int:
        return int(self.c_path.size)


def ratio_bound(x: np.ndarray, budget: np.ndarray, seed: int = 0, level: float = 0.99) -> tuple[float, float]:
    """(mean(x) / mean(budget), its lower ``level`` bound by a paired bootstrap over positions); ``EPS`` added to both
    means, so that two exact zeros give 1."""
    x, budget = np.asarray(x, dtype=np.float64), np.asarray(budget, dtype=np.float64)
    ratio = (x.mean() + EPS) / (budget.mean() + EPS)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(BOOTSTRAP, x.size))
    boot = (x[idx].mean(axis=1) + EPS) / (budget[idx].mean(axis=1) + EPS)
    return float(ratio), float(np.quantile(boot, 1 - level))


def judge(a: Aligned, ratio_max: float, seed: int = 0, anchor: float | None = None,
          reference_fails: bool = False) -> dict[str, Any]:
    """The two comparisons of one path (module docstring): ratios, their lower bounds, the means they come from.

    ``anchor``: the candidate's mean error on the cold prefill, which is judged absolutely; given, the comparison against
    the baseline allows the path that, not its reference path's error, which a defect the path shares with its
    reference (an extend over a cached prefix, for chunked prefill) would inflate. ``reference_fails``: the reference path failed, so the comparison with the
    candidate's own reference says nothing: the path is judged against the baseline alone."""
    k = np.abs(a.b_path - a.b_ref)
    e = np.abs(a.c_ref - a.b_answer)
    # on the same tokens the candidate's path against the baseline's same path; on decode (own tokens each) against
    # the baseline's prefill of the candidate's tokens
    vs_base = np.abs(a.c_path - (a.b_path if a.b_on_c is None else a.b_on_c))
    vs_self = np.abs(a.c_path - a.c_ref)
    allowed = e if anchor is None else np.full_like(e, anchor)
    r_base, lo_base = ratio_bound(vs_base, allowed + k, seed)
    r_self, lo_self = ratio_bound(vs_self, 2 * e + k, seed + 1)
    excess = lo_base if reference_fails else max(lo_base, lo_self)
    return {"positions": len(a), "vs_baseline_mean": float(vs_base.mean()), "vs_self_mean": float(vs_self.mean()),
            "control_mean": float(k.mean()), "reference_error_mean": float(e.mean()),
            "anchor_error_mean": None if anchor is None else float(anchor), "reference_fails": bool(reference_fails),
            "ratio_vs_baseline": r_base, "ratio_vs_baseline_low": lo_base, "ratio_vs_self": r_self, "ratio_vs_self_low": lo_self,
            "excess": excess, "passed": excess <= ratio_max}


# --------------------------------------------------------------------------- what each backend computes


@dataclass
class Plan:
    """The token sequences of every path, the same for both backends."""

    seqs: list[list[int]]  # cold and prefix
    prefix: int
    long: list[int] | None  # chunked prefill (None: no sequence longer than a chunk fits)
    chunk: int | None
    tail: int  # chunked: the last ``tail`` tokens are compared
    batch_seqs: list[list[int]]
    decode_prompts: list[list[int]]  # in CUDA graphs: within the captured sizes
    eager_prompts: list[list[int]]  # above the captured sizes, or every decode where graphs are off
    graphs: bool
    graph_max_bs: int | None
    tp: int
    serving: bool = False
    why_not: dict[str, str] = field(default_factory=dict)  # path -> why it cannot run on this engine
    replay: list[dict[str, Any]] = field(default_factory=list)  # the census's configurations replayed (kernel_replay)


def plan(engine: Any, backend: Any, p: Any) -> Plan:
    """Cut every path's sequences from ``p.text`` with the engine's tokenizer, sized by where the engine changes path."""
    from sagecheck.data import corpus, prompts

    tok = engine.tokenizer
    ids = prompts.encode(tok, corpus.load_text(p.text).text)
    bos = prompts.bos_ids(tok)
    limits = backend.limits()
    serving = SERVERS in engine.capabilities
    why: dict[str, str] = {}
    chunk = limits.chunked_prefill_size if serving else p.chunk_tokens
    context = engine.max_context or engine.model_config().max_position_embeddings
    long, tail = None, 0
    if chunk is None:
        why["chunked"] = "the server's --chunked-prefill-size is not known (set it in sglang.extra_args)"
    elif min(int(2.5 * chunk), context - 1) <= chunk:
        why["chunked"] = f"no sequence longer than a prefill chunk ({chunk} tokens) fits the model's context ({context})"
    else:
        n = min(int(2.5 * chunk), context - 1)
        long = prompts.cut_prompts(ids, 1, n, bos)[0]
        # the reference: one extend over a cached prefix that ends on a 64-token block boundary (so that the chunked
        # row is judged apart from the unaligned prefixes of the prefix row) but not on a chunk boundary (where the
        # chunked prefill's own last extend would be the very same computation), about half a chunk from the end
        k = (n - chunk // 2) // 64 * 64
        while k > 0 and k % chunk == 0:
            k -= 64
        tail = n - k
        if k <= 0:
            long, tail = None, 0
            why["chunked"] = f"no reference extend fits: chunks of {chunk} tokens leave no 64-token boundary between them"
    max_bs = limits.cuda_graph_max_bs
    if not limits.cuda_graphs:
        why["decode_graphs"] = ("this engine replays no CUDA graphs (in process)" if not serving
                                else "the server runs with CUDA graphs off (--disable-cuda-graph)")
        eager_n = p.decode_prompts
    elif max_bs is None:
        why["decode_graphs"] = why["decode_eager"] = "the server's largest CUDA-graph batch is not known (set --cuda-graph-max-bs)"
        eager_n = 0
    else:
        eager_n = max_bs + p.eager_extra
    if limits.tp <= 1:
        why["tp_ranks"] = "one rank (sglang.tp 1)" if serving else "the in-process engine runs on one device"
    short = [(list(bos) + ids[i * 97: i * 97 + n])[:n] for i, n in enumerate(p.short_lengths)]
    eager_n = max(eager_n, len(short) + p.decode_prompts)
    spread = prompts.cut_prompts(ids, max(eager_n, p.batch), max(p.prompt_tokens, p.batch_tokens), bos)
    longer = [s[: p.prompt_tokens] for s in spread]
    head = [x for pair in zip_longest(short, longer[: p.decode_prompts]) for x in pair if x is not None]
    mixed = head + longer[p.decode_prompts:]  # short and long alternating, every short prompt first, all distinct
    graph_n = min(len(short) + p.decode_prompts, max_bs or 0)
    if not graph_n and "decode_graphs" not in why:
        why["decode_graphs"] = "no batch fits the captured sizes"
    return Plan(seqs=prompts.cut_prompts(ids, p.sequences, p.tokens, bos), prefix=p.prefix_tokens or p.tokens // 2 + 13,
                long=long, chunk=chunk, tail=tail, batch_seqs=[s[: p.batch_tokens] for s in spread[: p.batch]],
                decode_prompts=mixed[:graph_n], eager_prompts=mixed[:eager_n], graphs=limits.cuda_graphs, graph_max_bs=max_bs,
                tp=limits.tp, serving=serving, why_not=why)


@dataclass
class Ran:
    """What one backend computed on every path: log-probabilities, the path's evidence, its counters' change."""

    implementation: str = ""  # what runs behind the label (in process: the attention implementation)
    logprobs: dict[str, Any] = field(default_factory=dict)
    cross: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the baseline: prefill of the candidate's decodes
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    counted: dict[str, dict[str, int]] = field(default_factory=dict)
    census: dict[str, dict[str, Any]] = field(default_factory=dict)  # per path: the kernel calls it made (sagecheck.census)
    kernel_phases: frozenset = frozenset({"prefill", "decode"})  # where the backend means to call the kernel
    ranks: Any = None


def _decode(backend: Any, prompts: list[list[int]], n: int) -> tuple[list[Generated], list[np.ndarray]]:
    """Greedy decode of the prompts in one batch, and a cold prefill of each generated sequence (its log-probabilities
    of the generated tokens)."""
    backend.reset_cache()
    gen = backend.generate_scored(prompts, n)
    full = backend.cold_logprobs([pr + g.tokens for pr, g in zip(prompts, gen)]).logprobs
    return gen, [lp[len(pr) - 1:] for pr, lp in zip(prompts, full)]


def run_backend(backend: Any, pl: Plan, p: Any, settle_s: float) -> Ran:
    """Every path that can run on this engine, on one backend."""
    out = Ran(implementation=getattr(backend, "implementation", backend.label), kernel_phases=backend.kernel_phases())
    counted = Counted(backend, settle_s)

    def path(name: str, fn: Callable[[], Any]) -> None:
        if name in pl.why_not:
            return
        got, out.counted[name], out.census[name] = counted(fn)
        out.logprobs[name], out.evidence[name] = got

    def prefill(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            r = fn()
            return r.logprobs, r.evidence
        return call

    path("cold", prefill(lambda: backend.cold_logprobs(pl.seqs)))
    path("prefix", lambda: _merge([backend.prefix_logprobs(s, pl.prefix) for s in pl.seqs]))
    if pl.long is not None:
        path("chunked", lambda: _merge([backend.chunked_logprobs(pl.long, pl.chunk),
                                        backend.prefix_logprobs(pl.long, len(pl.long) - pl.tail)]))
    for name, batch in (("decode_graphs", pl.decode_prompts), ("decode_eager", pl.eager_prompts)):
        path(name, lambda batch=batch: (_decode(backend, batch, p.decode_tokens),
                                        {"batch": len(batch), "lengths": sorted({len(s) for s in batch})}))
    path("batch", lambda: _merge([backend.batched_logprobs(pl.batch_seqs), backend.cold_logprobs(pl.batch_seqs)]))
    out.ranks = backend.rank_report()
    return out


def _merge(runs: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Several path runs as one: their log-probabilities in order, their evidence lists."""
    evidence: dict[str, Any] = {}
    for r in runs:
        for key, value in r.evidence.items():
            evidence.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return [r.logprobs for r in runs], evidence


# --------------------------------------------------------------------------- aligning and judging


def align(name: str, base: Ran, cand: Ran, pl: Plan) -> tuple[Aligned, dict[str, Any]]:
    """The four log-probabilities of a path at the positions both backends computed, and facts of the alignment."""
    parts, facts = [], {}
    if name == "cold":
        for cb, bb in zip(cand.logprobs["cold"], base.logprobs["cold"]):
            parts.append((cb, cb, bb, bb))
    elif name == "prefix":
        for c_pre, b_pre, c_cold, b_cold in zip(cand.logprobs["prefix"], base.logprobs["prefix"], cand.logprobs["cold"],
                                                base.logprobs["cold"]):
            parts.append((c_pre[0], c_cold[pl.prefix:], b_pre[0], b_cold[pl.prefix:]))
    elif name == "chunked":
        (c_chunk, c_ext), (b_chunk, b_ext) = cand.logprobs["chunked"], base.logprobs["chunked"]
        parts.append((c_chunk[0][-len(c_ext[0]):], c_ext[0], b_chunk[0][-len(b_ext[0]):], b_ext[0]))
    elif name.startswith("decode"):
        # each backend's decode against its own prefill of its own sequence, all steps; the candidate's tokens also
        # prefilled by the baseline (base.cross): the reference answer for the candidate's own tokens
        (c_gen, c_pre), (b_gen, b_pre), b_on_c = cand.logprobs[name], base.logprobs[name], base.cross[name]
        for cg, cp, bg, bp, bc in zip(c_gen, c_pre, b_gen, b_pre, b_on_c):
            n = min(len(cg.tokens), len(bg.tokens))
            # as Aligned: c_path, c_ref, and for the baseline its own decode / prefill; e and the vs-baseline figure use bc
            parts.append((cg.logprobs[:n], cp[:n], bg.logprobs[:n], bp[:n], bc[:n]))
        parted = [next((i for i, (x, y) in enumerate(zip(cg.tokens, bg.tokens)) if x != y), None) for cg, bg in zip(c_gen, b_gen)]
        facts["greedy_tokens_alike"] = f"{sum(p is None for p in parted)} of {len(parted)} sequences (each backend's decode is " \
                                       "compared with its own prefill, on its own tokens)"
    elif name == "batch":
        (c_batch, c_alone), (b_batch, b_alone) = cand.logprobs["batch"], base.logprobs["batch"]
        parts += list(zip(c_batch, c_alone, b_batch, b_alone))
    return Aligned.join(parts), facts


def evidence(name: str, ran: Ran, pl: Plan) -> tuple[str, str | None]:
    """(what shows the path ran, why it did not where the evidence says so) for the candidate."""
    ev, counted = ran.evidence.get(name, {}), ran.counted.get(name, {})
    words, why = [], None
    if name == "cold":
        words.append(f"{len(pl.seqs)} sequences of {len(pl.seqs[0])} tokens, each alone")
        cached = ev.get("cached_tokens", [])
        if cached:
            words.append(f"cached tokens {sorted(set(cached))}")
            if any(cached):
                why = f"the server took {max(cached)} tokens from its cache: not a cold prefill"
    elif name == "prefix":
        cached = ev.get("cached_tokens", [])
        words.append(f"{len(pl.seqs)} sequences of {len(pl.seqs[0])} tokens after a cached prefix of {pl.prefix}; "
                     f"cached tokens reported: {sorted(set(cached))}")
        if any(c != pl.prefix for c in cached):
            why = f"the server reused {min(cached)} of the {pl.prefix} prefix tokens"
    elif name == "chunked":
        words.append(f"{len(pl.long)} tokens in chunks of {pl.chunk} ({-(-len(pl.long) // pl.chunk)} chunks); the last "
                     f"{pl.tail - 1} compared with an extend over a cached prefix of {len(pl.long) - pl.tail}")
    elif name == "decode_graphs":
        words.append(f"batch {ev.get('batch')} within the largest CUDA-graph batch {pl.graph_max_bs}; prompts of "
                     f"{_lengths(ev.get('lengths', []))} tokens")
    elif name == "decode_eager":
        how = (f" above the largest CUDA-graph batch {pl.graph_max_bs}" if pl.graphs else " with CUDA graphs off" if pl.serving
               else " (in process: every step eager, prompts of one length together)")
        words.append(f"batch {ev.get('batch')}{how}; prompts of "
                     f"{_lengths(ev.get('lengths', []))} tokens")
    elif name == "batch":
        words.append(f"{len(pl.batch_seqs)} sequences of {len(pl.batch_seqs[0])} tokens in one batch against each alone")
    if counted:
        words.append("counted: " + ", ".join(f"{k} {v:+d}" for k, v in sorted(counted.items())))
        why = why or _counters_say_not(name, counted, ran.implementation)
    return "; ".join(words), why


def _lengths(lengths: list[int]) -> str:
    return ", ".join(map(str, lengths)) if len(lengths) <= 12 else f"{lengths[0]} to {lengths[-1]} ({len(lengths)} lengths)"


TRITON_ROUTE = "on Triton (dispatch rule)"
PREFILL_PATHS = ("cold", "prefix", "chunked", "batch")


def triton_route(name: str, counted: dict[str, int]) -> bool:
    """Whether the candidate's dispatch rule sent every prefill batch of this path to the baseline's kernel (its
    counters: batches on Triton, none on the kernel)."""
    return name in PREFILL_PATHS and bool(counted.get("extend_batches_triton")) and not counted.get("extend_batches_kernel")


def _counters_say_not(name: str, counted: dict[str, int], implementation: str) -> str | None:
    """Where the candidate's own counters contradict the path: it fell back to the baseline, ran in other phases only,
    or its server ran another path."""
    if any(k.startswith("calls:") for k in counted) and not counted.get(f"calls:{implementation}"):
        if counted.get(f"fallbacks:{implementation}"):
            return "the candidate fell back to the baseline on every attention call of this path"
        return "the candidate ran no attention call on this path (its phases leave this path to the baseline)"
    if any(k.startswith("fallback:") for k in counted) and name in PREFILL_PATHS and not counted.get("extend_batches_kernel") \
            and not triton_route(name, counted):
        return "the candidate's server ran no prefill batch on its kernel (every batch fell back)"
    with_prefix = counted.get("extend_batches_with_prefix_triton" if triton_route(name, counted) else "extend_batches_with_prefix")
    if name in ("prefix", "chunked") and ("extend_batches_kernel" in counted or triton_route(name, counted)) and not with_prefix:
        return "the candidate's server counted no batch with a cached prefix"
    if name == "decode_graphs" and ("decode_batches_triton" in counted or "decode_batches_kernel" in counted) \
            and not counted.get("decode_graph_replays"):
        return "the candidate's server replayed no CUDA graph: every decode step ran eagerly"
    if name == "decode_eager" and counted.get("decode_graph_replays") and not (
            counted.get("decode_batches_triton") or counted.get("decode_batches_kernel")):
        return "every decode step of the candidate's server was a CUDA-graph replay"
    return None


@dataclass
class PathResult:
    path: str
    title: str
    exercised: bool
    evidence: str
    why_not: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return self.figures.get("passed") if self.exercised else None


# each path's reference path (module docstring): where that fails, the path is judged against the baseline alone
REFERENCE = {"prefix": "cold", "chunked": "prefix", "decode_graphs": "cold", "decode_eager": "cold", "batch": "cold"}
CONTRACT_SOURCE = ("published target: the kernel's contract (SageAttention's docs): is_causal only where every sequence has "
                   "as many queries as keys, the model's sm_scale, head dims " + ", ".join(map(str, census.SUPPORTED_HEAD_DIMS))
                   + ", float16 or bfloat16")


def kernel_calls(name: str, cand: Ran, model_config: Any = None) -> dict[str, Any] | None:
    """The candidate's kernel calls on one path, held to the kernel's contract (:func:`sagecheck.census.violations`):
    None where nothing is looked for (the candidate made no kernel call on any path, or this path's phase is not
    one it means to run on the kernel)."""
    phase = "decode" if name.startswith("decode") else "prefill"
    if not any(census.calls(d) for d in cand.census.values()) or phase not in cand.kernel_phases:
        return None
    made = cand.census.get(name, {})
    # the step that makes the path (an extend over a cached prefix, the chunks after the first), where the engine
    # measured it apart from what prepares it (the prefix's own prefill): a fallback hides behind that otherwise
    steps = (cand.evidence.get(name) or {}).get("kernel_calls")
    if isinstance(steps, dict):
        steps = [steps]
    if steps and name == "chunked":
        steps = steps[:1]  # the chunked run's; the second is its reference extend's
    if steps:  # judged on the step that makes the path alone; the rest of the path is its reference's or a preparation
        made = census.total(steps)
    own = census.calls(made)
    rows = []
    for entry in made.values():
        broken = census.violations(entry, model_config)
        rows.append({"configuration": census.label(entry["config"]), "calls": entry["calls"], "sequences": entry.get("sequences"),
                     "captured": entry.get("captured", 0), "key counts": ", ".join(f"{c}: {n}" for c, n in sorted(entry.get("k_classes", {}).items())),
                     "violations": "; ".join(broken), "entry": entry["config"]["entry"]})
    bad = [r for r in rows if r["violations"]]
    return {"calls": census.calls(made), "step_calls": own, "configurations": rows,
            "violating_calls": sum(r["calls"] for r in bad),
            "violations": [f"{r['entry']}: {r['calls']} call(s) {r['violations']}" for r in bad]}


def judge_all(base: Ran, cand: Ran, pl: Plan, p: Any,
              ranks_check: Callable[[Any], dict[str, Any]] | None = None, cold_control: float = float("nan"),
              model_config: Any = None) -> list[PathResult]:
    """Every path judged; the cold prefill against the baseline, within ``cold_control`` (the accepted-precision
    control's mean |difference| on the same sequences), the others against their controls (:func:`judge`), their
    allowance anchored to the cold prefill's error; every path's kernel calls against the kernel's contract
    (:func:`kernel_calls`)."""
    out: list[PathResult] = []
    results: dict[str, PathResult] = {}
    for name, (title, _) in PATHS.items():
        if name == "tp_ranks":
            out.append(_tp_ranks(title, pl, cand, out, ranks_check))
            continue
        if name in pl.why_not:
            out.append(PathResult(name, title, False, "", pl.why_not[name]))
            continue
        aligned, facts = align(name, base, cand, pl)
        words, why = evidence(name, cand, pl)
        if facts:
            words += "; compared: " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items())
        routed = triton_route(name, cand.counted.get(name, {}))
        calls = kernel_calls(name, cand, model_config)
        # on the rule's Triton route no kernel call is made by design: the route is judged by its answers, and by the
        # census agreeing with the counters (a kernel call there means the counters misreport where batches ran)
        route_calls = (calls or {}).get("step_calls", 0) if routed else 0
        calls = None if routed else calls
        if calls is not None and not calls["step_calls"]:
            why = why or "the candidate made no kernel call on this path (another kernel served it: a fallback)"
        if why or not len(aligned):
            out.append(PathResult(name, title, False, words, why or "no position was computed alike by both backends",
                                  {"kernel": calls} if calls is not None else {}))
            results[name] = out[-1]
            continue
        if name == "cold":
            diff = np.abs(aligned.c_path - aligned.b_path)
            figures = {"positions": len(aligned), "vs_baseline_mean": float(diff.mean()), "accepted_control_mean": cold_control,
                       "passed": float(diff.mean()) <= cold_control}
        else:
            # a path whose reference is the cold prefill is allowed the cold prefill's error at its own positions already;
            # another (chunked: an extend over a cached prefix) is allowed the cold prefill's mean error, not its reference's
            cold = results.get("cold")
            anchor = (cold.figures.get("vs_baseline_mean") if cold is not None and cold.exercised
                      and REFERENCE.get(name) != "cold" else None)
            ref = results.get(REFERENCE.get(name, ""))
            # a reference that fails, or that did not run as itself (its kernel calls fell back), says nothing of the
            # candidate's own: the path is judged against the baseline alone
            figures = judge(aligned, p.ratio_max, p.seed, anchor=anchor,
                            reference_fails=bool(ref is not None and (ref.passed is False or (
                                not ref.exercised and (ref.figures.get("kernel") or {}).get("step_calls") == 0))))
        figures["output_passed"] = figures["passed"]  # the difference against the controls alone
        if routed:
            figures["route"], figures["route_kernel_calls"] = TRITON_ROUTE, route_calls
            figures["passed"] = bool(figures["passed"]) and not route_calls
        if calls is not None:
            figures["kernel"] = calls
            figures["passed"] = bool(figures["passed"]) and not calls["violating_calls"]
        out.append(PathResult(name, title, True, words, "", figures))
        results[name] = out[-1]
    return out


def _tp_ranks(title: str, pl: Plan, cand: Ran, done: list[PathResult], ranks_check: Any) -> PathResult:
    if "tp_ranks" in pl.why_not:
        return PathResult("tp_ranks", title, False, "", pl.why_not["tp_ranks"])
    ran = [r for r in done if r.exercised]
    if cand.ranks is not None and ranks_check is not None:
        got = ranks_check(cand.ranks)
        words = f"{pl.tp} ranks: {got['reported']} (expected {got['expected']})"
        return PathResult("tp_ranks", title, True, words, "", {"passed": bool(got["passed"]) and all(r.passed for r in ran),
                                                               "heads_per_rank": bool(got["passed"])})
    words = f"{pl.tp} ranks (the server's tp size); no per-rank statistics: judged by the paths above, each run on every rank"
    return PathResult("tp_ranks", title, True, words, "", {"passed": all(r.passed for r in ran), "heads_per_rank": None})


def cold_control(engine: Any, control_engine: Any, pl: Plan, base: Ran) -> float:
    """The accepted-precision control's mean |difference| from its engine's baseline on the cold prefill of the same
    sequences (the run's baseline's, where the control runs on the run's engine)."""
    ce = control_engine
    with ce.backend(ce.control) as kb:
        control = kb.cold_logprobs(pl.seqs).logprobs
    if ce is engine:
        reference = base.logprobs["cold"]
    else:
        with ce.backend(ce.baseline) as bb:
            reference = bb.cold_logprobs(pl.seqs).logprobs
    return float(np.mean(np.abs(np.concatenate(control) - np.concatenate(reference))))


def measure(engine: Any, p: Any, control_engine: Any = None) -> tuple[Plan, list[PathResult]]:
    """Every path on both backends of ``engine``, judged; the cold prefill against the accepted-precision control's
    (measured on ``control_engine``)."""
    serving = SERVERS in engine.capabilities
    settle = backend_stats.settle_s() if serving else 0.0
    with engine.backend(engine.candidate) as cb:
        pl = plan(engine, cb, p)
        cand = run_backend(cb, pl, p, settle)
    with engine.backend(engine.baseline) as bb:
        base = run_backend(bb, pl, p, 0.0)
        _with_cross(bb, cand, pl, base)
    control = cold_control(engine, control_engine, pl, base) if control_engine is not None else float("nan")
    check = _head_split_check(engine.model_config(), pl.tp) if cand.ranks is not None else None
    results = judge_all(base, cand, pl, p, check, control, engine.model_config())
    pl.replay = replay_census(results, cand, p)
    judge_integration(results, engine, control_engine, pl, p, cand, base)
    return pl, results


EMULATIONS = ("sage-emulated", "sage2-fp8-emulated")


def _head_split_check(config: Any, tp: int) -> Callable[[Any], dict[str, Any]]:
    """The per-rank check of a server's statistics: each rank ran its share of the model's query and KV heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return lambda stats: backend_stats.head_split(stats, heads, kv_heads, tp)


def _with_cross(bb: Any, ran: Ran, pl: Plan, into: Ran) -> None:
    """The baseline's prefill of ``ran``'s own decoded tokens (the reference answer for them), into ``into.cross``."""
    for name in ("decode_graphs", "decode_eager"):
        if name in ran.logprobs:
            gen, _ = ran.logprobs[name]
            batch = pl.decode_prompts if name == "decode_graphs" else pl.eager_prompts
            full = bb.cold_logprobs([pr + g.tokens for pr, g in zip(batch, gen)]).logprobs
            into.cross[name] = [lp[len(pr) - 1:] for pr, lp in zip(batch, full)]


def judge_integration(results: list[PathResult], engine: Any, control_engine: Any, pl: Plan, p: Any, cand: Ran,
                      base: Ran) -> None:
    """Beside each path's error, the error a correct integration of the same kernel has on it: the kernel's emulation
    run through the same path in process, on the same tokens, against the in-process baseline; the candidate's
    difference from its baseline may exceed that (plus the path's control) by no more than ``ratio_max`` (99% lower
    bound). Not done where the candidate is an emulation itself, or called no kernel (in place: ``figures["integration"]``)."""
    from sagecheck.metrics import kernel_replay

    made = census.merge(cand.census.values())
    in_process = control_engine if control_engine is not None else (engine if "hidden_states" in engine.capabilities else None)
    if not made or cand.implementation in EMULATIONS or in_process is None:
        return
    emulations = []
    for entry in made.values():
        try:
            kernel = kernel_replay.resolve(entry["config"]["ref"])
        except (ImportError, AttributeError):
            kernel = None
        emulations.append(kernel_replay.emulation_of(entry["config"], kernel))
    emulation = max(set(emulations), key=emulations.count)
    with in_process.backend(emulation) as eb:
        emu = run_backend(eb, pl, p, 0.0)
    if in_process is engine:
        ref_base = base
    else:
        with in_process.backend(in_process.baseline) as bb:
            ref_base = run_backend(bb, pl, p, 0.0)
    with in_process.backend(in_process.baseline) as bb:
        _with_cross(bb, emu, pl, ref_base)
    for r in results:
        if not r.exercised or r.path in ("cold", "tp_ranks") or r.path not in emu.logprobs or r.figures.get("route"):
            continue
        a_c, _ = align(r.path, base, cand, pl)
        a_e, _ = align(r.path, ref_base, emu, pl)
        if not len(a_c) or not len(a_e):
            continue
        vs_base = np.abs(a_c.c_path - (a_c.b_path if a_c.b_on_c is None else a_c.b_on_c))
        emu_err = float(np.abs(a_e.c_path - (a_e.b_path if a_e.b_on_c is None else a_e.b_on_c)).mean())
        k = np.abs(a_c.b_path - a_c.b_ref)
        ratio, low = ratio_bound(vs_base, np.full_like(vs_base, emu_err) + k, p.seed + 2)
        r.figures["integration"] = {"emulation": emulation, "emulation_vs_baseline_mean": emu_err, "ratio": ratio,
                                    "ratio_low": low, "passed": low <= p.ratio_max}
        if low > p.ratio_max:
            r.figures["passed"] = False


def replay_census(results: list[PathResult], cand: Ran, p: Any) -> list[dict[str, Any]]:
    """The configurations the candidate called the kernel with, replayed (:mod:`sagecheck.metrics.kernel_replay`); a
    configuration the replay flags fails every path that called it (in place: ``figures["replay"]``, ``passed``)."""
    from sagecheck import runtime
    from sagecheck.metrics import kernel_replay

    made = census.merge(cand.census.values())
    if not made:
        return []
    device = runtime.resolve_device(p.device)
    rows = kernel_replay.replay(made, p.kernel_vs_emulation_max, device, p.seed, p.replay_max_keys)
    flagged = kernel_replay.flagged_by_path(rows, cand.census)
    for r in results:
        if r.figures.get("kernel") is None:
            continue
        mine = [row for row in rows if row["key"] in cand.census.get(r.path, {})]
        r.figures["replay"] = {"replayed": sum(row["status"] == "ok" for row in mine),
                               "not_replayed": sorted({row["why"] for row in mine if row["status"] != "ok"}),
                               "flagged": [f"{row['configuration']} at {row['shape']}: {row['kernel_vs_emulation']:.3g} from "
                                           f"{row['emulation']}" for row in flagged.get(r.path, [])]}
        if r.figures["replay"]["flagged"]:
            r.figures["passed"] = False
    return [{k: v for k, v in row.items() if k != "key"} for row in rows]


# --------------------------------------------------------------------------- the notebook's table, verdicts and reader


def table(results: list[PathResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        f = r.figures
        result = "not exercised" if not r.exercised else ("pass" if r.passed else "FAIL")
        rows.append({"path": r.title, "result": result + (f", {f['route']}" if f.get("route") else ""),
                     "positions": f.get("positions"), "|cand - base| (nats)": f.get("vs_baseline_mean"),
                     "control |base path - base ref|": f.get("control_mean"),
                     "ratio vs baseline (99% low)": _ratio(f, "ratio_vs_baseline"), "ratio vs own reference (99% low)":
                     _ratio(f, "ratio_vs_self"), "kernel calls (outside the contract)": _calls(f),
                     "evidence": r.evidence or r.why_not, "not exercised because": r.why_not})
    return rows


def _calls(f: dict[str, Any]) -> str:
    k = f.get("kernel")
    return "" if not k else f"{k['calls']} ({k['violating_calls']})"


def census_rows(results: list[PathResult]) -> list[dict[str, Any]]:
    """The kernel's census per path: every configuration the candidate called the kernel with, and what breaks its
    contract (empty where the candidate made no kernel call)."""
    return [{"path": r.title, **row} for r in results for row in (r.figures.get("kernel") or {}).get("configurations", [])]


def census_sentence(results: list[PathResult]) -> str:
    """The census in one sentence: how many calls, on which paths, and every violation; or that nothing called it."""
    looked = [r for r in results if r.figures.get("kernel") is not None]
    if not looked:
        return ("**Kernel census:** no kernel calls: the candidate called neither sageattention nor an emulation of it, "
                "so there is nothing to hold to a contract.")
    bad = [f"{r.title}: " + "; ".join(r.figures["kernel"]["violations"]) for r in looked if r.figures["kernel"]["violating_calls"]]
    calls = sum(r.figures["kernel"]["calls"] for r in looked)
    text = f"**Kernel census:** {calls} kernel calls on {len(looked)} paths"
    return text + (", outside the kernel's contract: " + " | ".join(bad) + "." if bad else ", every one inside the kernel's contract.")


def _ratio(f: dict[str, Any], key: str) -> str:
    return "" if key not in f else f"{f[key]:.2f} ({f[key + '_low']:.2f})"


def record(results: Any, paths: list[PathResult], pl: Plan, p: Any, control: str | None = None) -> None:
    """10's results: one verdict per exercised path (kind ``code_path``), the paths not exercised with why."""
    from sagecheck.thresholds import from_control, parameter

    results.table("paths", [{"id": r.path, "title": r.title, "exercised": r.exercised, "evidence": r.evidence,
                             "why_not": r.why_not, **r.figures} for r in paths])
    results.metric("not_exercised", {r.path: r.why_not for r in paths if not r.exercised})
    results.metric("plan", {"sequences": len(pl.seqs), "tokens": len(pl.seqs[0]), "prefix": pl.prefix, "chunk": pl.chunk,
                            "long": len(pl.long) if pl.long else None, "cuda_graphs": pl.graphs,
                            "cuda_graph_max_bs": pl.graph_max_bs, "tp": pl.tp})
    for r in paths:
        if not r.exercised:
            continue
        f = r.figures
        title = f"{r.title}, {f['route']}" if f.get("route") else r.title
        if r.path == "cold":
            results.verdict("code_path.cold", "code_path", f"{title}: mean |candidate - baseline| log-probability",
                            f["vs_baseline_mean"], "<=", f["accepted_control_mean"], unit="nats",
                            detail=f"{f['positions']} positions; {r.evidence}",
                            source=from_control(control, f"the same {f['positions']} positions",
                                                f"{f['accepted_control_mean']:.3g} nats"))
        elif r.path == "tp_ranks":
            results.verdict("code_path.tp_ranks", "code_path", f"{r.title}: heads per rank, and every path on every rank",
                            int(bool(f["passed"])), "==", 1, detail=r.evidence,
                            source="the model's head counts split as the server's tensor-parallel size says")
        else:
            how = (f"its reference ({PATHS[REFERENCE[r.path]][0]}) fails: judged against the baseline alone; "
                   if f.get("reference_fails") else "")
            anchored = (f"allowed the cold prefill's error {f['anchor_error_mean']:.3g} nats; "
                        if f.get("anchor_error_mean") is not None else "")
            results.verdict(f"code_path.{r.path}", "code_path", f"{title}: excess over its control (99% lower bound)",
                            f["excess"], "<=", p.ratio_max,
                            detail=(how + anchored + f"vs baseline {f['ratio_vs_baseline']:.2f} (low {f['ratio_vs_baseline_low']:.2f}), vs its "
                                    f"own reference {f['ratio_vs_self']:.2f} (low {f['ratio_vs_self_low']:.2f}); "
                                    f"|cand-base| {f['vs_baseline_mean']:.3g}, control {f['control_mean']:.3g} nats over "
                                    f"{f['positions']} positions; {r.evidence}")[:500],
                            source="control of this run: the baseline's own difference between this path and its reference "
                                   "(k), and the candidate's error on the reference (e); " +
                                   parameter("code_paths.ratio_max", p.ratio_max, "the most a 99% lower bound may exceed"))
    for r in paths:  # a path its counters put on the dispatch rule's Triton route: the census must see no kernel call
        if r.exercised and r.figures.get("route"):
            results.verdict(f"code_path.{r.path}.route", "code_path", f"{r.title}: kernel calls where the counters say "
                            f"{r.figures['route']}", r.figures["route_kernel_calls"], "==", 0,
                            detail=one_line(r.evidence, 400),
                            source="the candidate's own counters against the census of its kernel calls on the same path")
    for r in paths:  # beside each path's error, a correct integration's (the kernel's emulation through the same path)
        g = r.figures.get("integration")
        if g is None:
            continue
        results.verdict(f"code_path.{r.path}.integration", "code_path", f"{r.title}: excess over a correct integration "
                        f"({g['emulation']} through the same path; 99% lower bound)", g["ratio_low"], "<=", p.ratio_max,
                        detail=one_line(f"{r.title}: |cand-base| {r.figures['vs_baseline_mean']:.3g} nats against "
                                        f"{g['emulation_vs_baseline_mean']:.3g} for {g['emulation']} through the same path "
                                        f"in process; ratio {g['ratio']:.2f} (low {g['ratio_low']:.2f})", 400),
                        source="control of this run: the kernel's emulation through the same path, on the same tokens, and "
                               "the baseline's path-to-path difference; " +
                               parameter("code_paths.ratio_max", p.ratio_max, "the most a 99% lower bound may exceed"))
    for r in paths:  # every path whose kernel calls were looked for, exercised or not (a fallback is a failure too)
        k = r.figures.get("kernel")
        if k is None:
            continue
        replayed = r.figures.get("replay") or {}
        flagged = replayed.get("flagged", [])
        problems = list(k["violations"]) + [f"the kernel disagrees with its emulation at {x}" for x in flagged]
        if not k["step_calls"]:
            problems.append("no kernel call on this path: another kernel served it (a fallback)")
        words = "; ".join(problems) or (f"{k['calls']} kernel calls in {len(k['configurations'])} configuration(s), none outside "
                                        f"the contract" + (f"; {replayed['replayed']} replayed, none flagged" if replayed.get("replayed")
                                                           else ""))
        results.verdict(f"code_path.{r.path}.kernel", "code_path", f"{r.title}: kernel calls outside the contract or at a "
                        "configuration the kernel gets wrong", k["violating_calls"] + len(flagged) + (0 if k["step_calls"] else 1),
                        "<=", 0, detail=one_line(f"{r.title}: {words}", 400),
                        source=CONTRACT_SOURCE + "; " + parameter("code_paths.kernel_vs_emulation_max",
                                                                  p.kernel_vs_emulation_max, "08's bound on kernel vs emulation"))
    results.table("kernel_census", census_rows(paths))
    results.table("kernel_replay", pl.replay)
    results.metric("kernel_census", {"sentence": census_sentence(paths),
                                     "calls": {r.path: (r.figures.get("kernel") or {}).get("calls") for r in paths}})


@dataclass
class CodePathResults:
    """10's results as the recommendation reads them."""

    rows: list[dict[str, Any]]

    @classmethod
    def read(cls, res: Any) -> "CodePathResults | None":
        return cls(res.tables.get("paths", [])) if res is not None and res.status == "ok" else None

    def failing(self) -> list[dict[str, Any]]:
        """Paths that fail; a path whose kernel calls fell back to another kernel too (it is not exercised, and that
        is a failure of the candidate, not of the engine)."""
        return [r for r in self.rows if (r["exercised"] and not r.get("passed"))
                or ((r.get("kernel") or {}) and not r["kernel"].get("step_calls"))]

    def not_exercised(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["exercised"] and r not in self.failing()]



def sentence(paths: list[PathResult]) -> str:
    """The paths in one paragraph: which fail (with their figure), which pass, which did not run and why."""
    failing = [r for r in paths if r.exercised and not r.passed]
    passing = [r for r in paths if r.exercised and r.passed]
    idle = [r for r in paths if not r.exercised]
    parts = []
    if failing:
        parts.append("**Failing:** " + "; ".join(f"{r.title} ({_figure_words(r)})" for r in failing) + ".")
    if passing:
        parts.append(f"**Passing ({len(passing)}):** " + ", ".join(
            r.title + (f" ({r.figures['route']})" if r.figures.get("route") else "") for r in passing) + ".")
    if idle:
        parts.append("**Not exercised:** " + "; ".join(f"{r.title} ({r.why_not})" for r in idle) + ".")
    routed = [r.title for r in paths if r.figures.get("route")]
    if routed:
        parts.append(f"**On Triton by the dispatch rule** ({', '.join(routed)}): the candidate's server sent every prefill "
                     "batch of these paths to the baseline's kernel, so they judge that route and not the kernel "
                     "(sglang.sage_attn_dispatch=kernel judges the kernel on every path).")
    return " ".join(parts)


def _figure_words(r: PathResult) -> str:
    f = r.figures
    if f.get("route_kernel_calls"):
        return f"{f['route_kernel_calls']} kernel call(s) where its counters say {f['route']}"
    k = f.get("kernel") or {}
    if k.get("violating_calls"):
        return "; ".join(k["violations"])
    if (f.get("replay") or {}).get("flagged"):
        return "the kernel disagrees with its emulation at " + "; ".join(f["replay"]["flagged"])
    if "excess" in f:
        return f"{f['excess']:.2f}× its control at least, vs baseline {f['ratio_vs_baseline']:.2f}, vs its own reference {f['ratio_vs_self']:.2f}"
    if "vs_baseline_mean" in f:
        return f"mean |candidate - baseline| {f['vs_baseline_mean']:.3g} nats"
    return r.evidence
