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


def measure(engine: Any, s: Setup) -> Measured:
    """Both backends: a greedy answer to every passkey trial, and the natural text teacher-forced."""
    tok = engine.tokenizer
    correct, dists, lps = {}, {}, {}
    for label in engine.pair:
        with engine.backend(label) as b:
            for length in s.lengths:
                batch = [t for t in s.trials if t.length == length]
                outs = b.generate([t.input_ids for t in batch], passkey.KEY_DIGITS + 2)
                for t, out in zip(batch, outs):
                    correct[(label, length, t.depth, t.key)] = passkey.is_correct(t, tok.decode(out))
            dists[label] = L.collect(b, [s.natural], L.top_k_for(engine, 20))[0]
            lps[label] = b.token_logprobs([s.natural])[0]
    return Measured(correct, dists, lps)


@dataclass
class Compared:
    by_length: list[dict[str, Any]]
    by_depth: list[dict[str, Any]]
    kl: np.ndarray  # per position of the natural text (the prediction of token t + 1)
    loss_delta: np.ndarray  # candidate - baseline, nats per position
    ranges: list[dict[str, Any]]
    note: str


def compare(m: Measured, baseline: str, candidate: str, p: Any) -> Compared:
    pair = (baseline, candidate)
    comp = L.compare_collected([m.distributions[baseline]], [m.distributions[candidate]])[0]
    kl = comp["kl"][:-1]  # the distribution after token t predicts token t+1: aligned with the loss below
    loss_delta = -(m.logprobs[candidate] - m.logprobs[baseline])
    ranges, note = L.position_ranges(kl, loss_delta, p.short_range, p.long_range)
    return Compared(passkey.accuracy_by(m.correct, pair, "length"), passkey.accuracy_by(m.correct, pair, "depth"),
                    kl, loss_delta, ranges, note)


def record(results: Any, c: Compared, lengths: list[int], p: Any) -> None:
    """07's results and verdicts: the worst length's passkey accuracy delta, and the loss delta over long positions."""
    worst = max(c.by_length, key=lambda r: abs(r["delta"]))
    long_row = next(r for r in c.ranges if r["range"] == "long")
    results.table("passkey_by_length", c.by_length)
    results.table("passkey_by_depth", c.by_depth)
    results.table("natural_text_ranges", c.ranges)
    results.metric("lengths", lengths)
    results.metric("kl_by_position", c.kl)
    results.metric("loss_delta_by_position", c.loss_delta)
    if c.note:
        results.note(c.note)
    results.verdict("context.passkey_delta", "accuracy", "passkey accuracy delta at every length (worst length)", worst["delta"],
                    "abs<=", p.accuracy_delta_max,
                    detail=f"worst at {worst['length']} tokens; " + ", ".join(f"{r['length']}: {r['delta']:+.2f}" for r in c.by_length))
    results.verdict("context.long_loss_delta", "accuracy", f"long-context loss delta (positions {long_row['positions']})",
                    long_row["loss_delta_mean"], "abs<=", p.loss_delta_max, unit="nats/token",
                    detail=f"mean KL there {long_row['kl_mean']:.3g}")
