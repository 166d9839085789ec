"""07_context_length: passkey retrieval by context length, and per-position KL and loss on long natural text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sagecheck.data import corpus, passkey, prompts
from sagecheck.metrics import logits as L


@dataclass
class Setup:
    lengths: list[int]
    trials: list[passkey.PasskeyTrial]
    natural: list[int]  # one window of natural text as long as the longest length
    text: Any

    def facts(self, p: Any) -> dict[str, Any]:
        return {"lengths": self.lengths, "depths": p.depths, "trials per length and depth": p.trials,
                "natural text window": f"{len(self.natural)} tokens of {self.text.description}"}


def setup(engine: Any, p: Any) -> Setup:
    """The lengths the model and ``max_length`` allow (and a passkey prompt fits), the trials, the natural-text window."""
    tok = engine.tokenizer
    limits = [x for x in (p.max_length, engine.max_context) if x]
    limit = min(limits) if limits else None
    lengths = sorted(n for n in p.lengths if (limit is None or n <= limit) and n >= passkey.min_length(tok))
    if not lengths:
        raise ValueError(f"no context length of {p.lengths} fits: the model takes at most {limit} tokens and a passkey "
                         f"prompt needs at least {passkey.min_length(tok)}")
    text = corpus.load_text(p.text)
    natural = prompts.cut_prompts(prompts.encode(tok, text.text), 1, max(lengths), prompts.bos_ids(tok))[0]
    return Setup(lengths, passkey.make_trials(tok, lengths, p.depths, p.trials, seed=p.seed), natural, text)


@dataclass
class Measured:
    correct: dict[tuple[str, int, float, str], bool]
    distributions: dict[str, Any]  # per label: the natural text's next-token distributions (full or top-k)
    logprobs: dict[str, np.ndarray]  # per label: the natural text's teacher-forced log-probabilities
    control_pair: tuple[str, str] | None = None  # the control's engine's (baseline, control) labels


def _run(engine: Any, label: str, s: Setup, top_k: int | None, m: Measured) -> None:
    """One backend: a greedy answer to every passkey trial, and the natural text teacher-forced (into ``m``)."""
    tok = engine.tokenizer
    with engine.backend(label) as b:
        for length in s.lengths:
            batch = [t for t in s.trials if t.length == length]
            outs = b.generate([t.input_ids for t in batch], passkey.KEY_DIGITS + 2)
            for t, out in zip(batch, outs):
                m.correct[(label, length, t.depth, t.key)] = passkey.is_correct(t, tok.decode(out))
        m.distributions[label] = L.collect(b, [s.natural], top_k)[0]
        m.logprobs[label] = b.token_logprobs([s.natural])[0]


def measure(engine: Any, s: Setup, control_engine: Any = None) -> Measured:
    """Both backends, then the accepted-precision control and its engine's baseline (where that is not the run's
    baseline already): passkey trials and the natural text, seen as the run's engine sees them (top-k where it gives
    only that)."""
    m = Measured({}, {}, {})
    top_k = L.top_k_for(engine, 20)
    for label in engine.pair:
        _run(engine, label, s, top_k, m)
    if control_engine is not None:
        ce = control_engine
        m.control_pair = (ce.baseline, ce.control)
        for label in m.control_pair:
            if not (ce is engine and label == engine.baseline):
                _run(ce, label, s, top_k, m)
    return m


@dataclass
class Compared:
    by_length: list[dict[str, Any]]
    by_depth: list[dict[str, Any]]
    kl: np.ndarray  # per position of the natural text (the prediction of token t + 1)
    loss_delta: np.ndarray  # candidate - baseline, nats per position
    ranges: list[dict[str, Any]]
    note: str
    pooled: dict[str, float]  # passkey accuracy over every trial: baseline, candidate (and the control's pair)
    control: str | None = None
    control_pair: tuple[str, str] | None = None  # the control's engine's (baseline, control)
    control_by_length: list[dict[str, Any]] | None = None
    control_kl: np.ndarray | None = None
    control_ranges: list[dict[str, Any]] | None = None


def _natural(m: Measured, baseline: str, other: str, p: Any) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], str]:
    comp = L.compare_collected([m.distributions[baseline]], [m.distributions[other]])[0]
    kl = comp["kl"][:-1]  # the distribution after token t predicts token t+1: aligned with the loss below
    loss_delta = -(m.logprobs[other] - m.logprobs[baseline])
    ranges, note = L.position_ranges(kl, loss_delta, p.short_range, p.long_range)
    return kl, loss_delta, [{"compared": other, **r} for r in ranges], note


def pooled_accuracy(correct: dict[tuple[str, int, float, str], bool], label: str) -> float:
    hits = [ok for k, ok in correct.items() if k[0] == label]
    return sum(hits) / len(hits) if hits else float("nan")


def compare(m: Measured, baseline: str, candidate: str, p: Any) -> Compared:
    pair = (baseline, candidate)
    kl, loss_delta, ranges, note = _natural(m, baseline, candidate, p)
    pooled = {label: pooled_accuracy(m.correct, label) for label in (*pair, *(m.control_pair or ()))}
    c = Compared(passkey.accuracy_by(m.correct, pair, "length"), passkey.accuracy_by(m.correct, pair, "depth"),
                 kl, loss_delta, ranges, note, pooled)
    if m.control_pair:
        c.control, c.control_pair = m.control_pair[1], m.control_pair
        c.control_by_length = passkey.accuracy_by(m.correct, m.control_pair, "length")
        c.control_kl, _, c.control_ranges, _ = _natural(m, *m.control_pair, p)
    return c


def record(results: Any, c: Compared, lengths: list[int], p: Any, baseline: str, candidate: str) -> None:
    """07's results and verdicts: the passkey accuracy lost over every trial, and the mean KL over long positions, each
    against the accepted-precision control's on the same trials and text."""
    from sagecheck.thresholds import accuracy_loss, from_control

    long_row = next(r for r in c.ranges if r["range"] == "long")
    control_long = next((r for r in c.control_ranges or [] if r["range"] == "long"), {})
    results.table("passkey_by_length", c.by_length)
    results.table("passkey_by_depth", c.by_depth)
    results.table("natural_text_ranges", c.ranges)
    results.table("control_passkey_by_length", c.control_by_length or [])
    results.table("control_natural_text_ranges", c.control_ranges or [])
    results.metric("lengths", lengths)
    results.metric("passkey_pooled", c.pooled)
    results.metric("kl_by_position", c.kl)
    results.metric("control_kl_by_position", c.control_kl if c.control_kl is not None else [])
    results.metric("loss_delta_by_position", c.loss_delta)
    if c.note:
        results.note(c.note)
    trials = len(lengths) * len(p.depths) * p.trials
    lost = 100 * (c.pooled[baseline] - c.pooled[candidate])
    control_base, control = c.control_pair or (baseline, None)
    control_lost = 100 * (c.pooled[control_base] - c.pooled[control]) if control else float("nan")
    t = accuracy_loss(control_lost, c.pooled[control_base] if control else float("nan"), control, f"the same {trials} trials")
    results.verdict("context.passkey_loss", "accuracy", "passkey accuracy lost, every length and depth pooled", lost, "<=",
                    t.value, unit="pp", source=t.source,
                    detail=f"{candidate} {c.pooled[candidate]:.3f} vs {baseline} {c.pooled[baseline]:.3f} over {trials} trials; "
                           "per length " + ", ".join(f"{r['length']}: {r['delta']:+.2f}" for r in c.by_length))
    results.verdict("context.long_kl", "accuracy", f"long-context mean KL (positions {long_row['positions']})",
                    long_row["kl_mean"], "<=", control_long.get("kl_mean", float("nan")), unit="nats",
                    detail=f"loss delta there {long_row['loss_delta_mean']:+.3g} nats/token",
                    source=from_control(c.control, "the same positions", f"{control_long.get('kl_mean', float('nan')):.3g} nats"))
