"""Sliding-window perplexity, word perplexity, bits per byte, and a paired bootstrap of the delta.

Windows follow the Hugging Face "perplexity of fixed-length models" guide: windows of
``window`` tokens start every ``stride`` tokens; in each window only the tokens not
scored by an earlier window count (the overlap is context only), so every token of
the text is scored exactly once, the first one excepted (it has no context).

Word perplexity and bits per byte are those of lm-evaluation-harness:
``exp(NLL / words)`` and ``NLL / bytes / ln 2``, with NLL the total in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window (context included)
    end: int  # one past the last token
    n_scored: int  # the last n_scored tokens of the window are scored

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window; got window={window}, stride={stride}")
    if n_tokens < 2:
        raise ValueError("the text has fewer than two tokens")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        target = end - prev_end
        # the window's first token cannot be scored (nothing precedes it inside the window)
        windows.append(Window(begin, end, min(target, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class WindowScores:
    """Per window: summed negative log-likelihood (nats) and number of scored tokens."""

    nll: np.ndarray
    count: np.ndarray

    @property
    def total_nll(self) -> float:
        return float(self.nll.sum())

    @property
    def total_tokens(self) -> int:
        return int(self.count.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.total_nll / self.total_tokens)

    def word_perplexity(self, n_words: int) -> float:
        return math.exp(self.total_nll / n_words)

    def bits_per_byte(self, n_bytes: int) -> float:
        return self.total_nll / n_bytes / math.log(2)


TokenLogprobFn = Callable[[list[list[int]]], list[np.ndarray]]


def score_windows(ids: Sequence[int], windows: list[Window], token_logprobs: TokenLogprobFn, batch_size: int = 8) -> WindowScores:
    """``token_logprobs(batch)`` returns, per sequence, log p(x_t | x_<t) for t = 1..n-1."""
    nll = np.zeros(len(windows), dtype=np.float64)
    count = np.zeros(len(windows), dtype=np.int64)
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_length.setdefault(w.length, []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = [list(ids[windows[i].begin : windows[i].end]) for i in chunk]
            logprobs = token_logprobs(batch)
            for i, lp in zip(chunk, logprobs):
                n = windows[i].n_scored
                scored = np.asarray(lp, dtype=np.float64)[-n:] if n > 0 else np.zeros(0)
                nll[i] = -scored.sum()
                count[i] = n
    return WindowScores(nll, count)


def paired_bootstrap_delta_pct(base: WindowScores, cand: WindowScores, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Perplexity delta ``100 * (ppl_cand / ppl_base - 1)`` with a paired bootstrap 95% CI over windows.

    The same resampled windows are used for both backends (pairing), so the interval
    reflects the difference between backends, not the spread of the text.
    """
    rng = np.random.default_rng(seed)
    n = len(base.nll)
    if n != len(cand.nll) or not np.array_equal(base.count, cand.count):
        raise ValueError("baseline and candidate must be scored on the same windows")
    idx = rng.integers(0, n, size=(resamples, n))
    counts = base.count[idx].sum(axis=1)
    ppl_b = np.exp(base.nll[idx].sum(axis=1) / counts)
    ppl_c = np.exp(cand.nll[idx].sum(axis=1) / counts)
    deltas = 100.0 * (ppl_c / ppl_b - 1.0)
    point = 100.0 * (cand.perplexity / base.perplexity - 1.0)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta_pct": point, "ci_low_pct": float(lo), "ci_high_pct": float(hi), "resamples": resamples}


def per_window_delta_pct(base: WindowScores, cand: WindowScores) -> np.ndarray:
    """Each window's own perplexity delta in %: ``100 * (exp((nll_cand - nll_base) / scored) - 1)``."""
    return 100.0 * (np.exp((cand.nll - base.nll) / np.maximum(base.count, 1)) - 1.0)


# --------------------------------------------------------------------------- 03_perplexity


@dataclass
class Scored:
    """What 03 scores: the text, its tokens (cut to ``max_tokens``), the windows, each backend's window scores."""

    text: Any
    description: str
    ids: list[int]
    n_words: int
    n_bytes: int
    windows: list[Window]
    scores: dict[str, WindowScores]
    control: str | None = None  # the accepted-precision control's label
    control_scores: dict[str, WindowScores] | None = None  # "baseline" and "control", on the control's engine


def score(engine: Any, p: Any, control_engine: Any = None) -> Scored:
    """Both backends on the same sliding windows of ``p.dataset`` (its first ``p.max_tokens`` tokens); then the
    accepted-precision control and its engine's baseline on the same windows."""
    from sagecheck.data import corpus

    text = corpus.load_text(p.dataset)
    ids = list(engine.tokenizer(text.text).input_ids)
    scored_text = text
    if p.max_tokens:
        ids = ids[: p.max_tokens]
        scored_text = corpus.Text(text.name, engine.tokenizer.decode(ids, skip_special_tokens=True), text.description)
    windows = sliding_windows(len(ids), p.window, p.stride)
    scores = {}
    for label in engine.pair:
        with engine.backend(label) as b:
            scores[label] = score_windows(ids, windows, b.token_logprobs)
    out = Scored(text, text.description, ids, scored_text.n_words, scored_text.n_bytes, windows, scores)
    if control_engine is not None:
        ce, out.control, out.control_scores = control_engine, control_engine.control, {}
        for role, label in (("baseline", ce.baseline), ("control", ce.control)):
            if ce is engine and label == engine.baseline:
                out.control_scores[role] = scores[label]
                continue
            with ce.backend(label) as b:
                out.control_scores[role] = score_windows(ids, windows, b.token_logprobs)
    return out


def data_facts(s: Scored, p: Any) -> dict[str, Any]:
    return {"text": s.description, "tokens scored": f"{len(s.ids):,}", "words": f"{s.n_words:,}", "bytes": f"{s.n_bytes:,}",
            "windows": len(s.windows), "window / stride": f"{p.window} / {p.stride}"}


def table(s: Scored) -> list[dict[str, Any]]:
    rows = dict(s.scores)
    if s.control_scores and s.control:
        rows[s.control] = s.control_scores["control"]
    return [{"backend": label, "token perplexity": w.perplexity, "word perplexity": w.word_perplexity(s.n_words),
             "bits per byte": w.bits_per_byte(s.n_bytes), "scored tokens": w.total_tokens, "NLL (nats)": w.total_nll}
            for label, w in rows.items()]


def delta(s: Scored, baseline: str, candidate: str, p: Any) -> dict[str, float]:
    return paired_bootstrap_delta_pct(s.scores[baseline], s.scores[candidate], resamples=p.bootstrap, seed=p.seed)


def control_delta(s: Scored, p: Any) -> dict[str, float]:
    """The control's perplexity delta against its own engine's baseline, on the same windows and resamples."""
    if not s.control_scores:
        return {"delta_pct": float("nan"), "ci_low_pct": float("nan"), "ci_high_pct": float("nan"), "resamples": 0}
    return paired_bootstrap_delta_pct(s.control_scores["baseline"], s.control_scores["control"], resamples=p.bootstrap,
                                      seed=p.seed)


def record(results: Any, s: Scored, d: dict[str, float], baseline: str, candidate: str, p: Any) -> None:
    """03's results and its verdict: the candidate's |perplexity delta| against the control's on the same windows."""
    from sagecheck.thresholds import from_control

    results.metric("dataset", s.description)
    results.metric("tokens", len(s.ids))
    results.metric("windows", len(s.windows))
    results.metric("perplexity", {label: w.perplexity for label, w in s.scores.items()}
                   | ({s.control: s.control_scores["control"].perplexity} if s.control_scores else {}))
    results.metric("word_perplexity", {label: w.word_perplexity(s.n_words) for label, w in s.scores.items()})
    results.metric("bits_per_byte", {label: w.bits_per_byte(s.n_bytes) for label, w in s.scores.items()})
    results.metric("delta", d)
    results.table("perplexity", table(s))
    base, cand = s.scores[baseline], s.scores[candidate]
    results.table("windows", [{"begin": w.begin, "end": w.end, "scored": w.n_scored, "nll_base": float(b), "nll_cand": float(c)}
                              for w, b, c in zip(s.windows, base.nll, cand.nll)])
    k = control_delta(s, p)
    results.metric("control", {"implementation": s.control, **k})
    results.verdict("perplexity.delta", "accuracy", "token perplexity delta (judged by its size)", d["delta_pct"], "abs<=",
                    abs(k["delta_pct"]), unit="%", detail=f"95% CI [{d['ci_low_pct']:+.3f}, {d['ci_high_pct']:+.3f}] %",
                    source=from_control(s.control, f"the same {len(s.windows)} windows",
                                        f"{k['delta_pct']:+.3f} % [{k['ci_low_pct']:+.3f}, {k['ci_high_pct']:+.3f}]"))
