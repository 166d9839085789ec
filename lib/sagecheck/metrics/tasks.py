"""Downstream accuracy of two backends on the same questions, and the paired comparison.

Multiple choice is scored as lm-evaluation-harness scores it: each choice's log-likelihood is the sum
of its tokens' log-probabilities given the context (context and continuation tokenized together, the
continuation being the tokens after the context's); ``acc`` takes the largest sum, ``acc_norm`` the
largest sum per character of the choice. Generation is greedy, cut at the first stop string, and the
extracted answer compared exactly.

Both backends answer the same questions, so the comparison is paired: the accuracy delta gets a
bootstrap interval over questions, and the exact McNemar test asks whether the discordant questions
(right for one backend, wrong for the other) split evenly, as they would if the backends differed only
by chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from sagecheck.data.tasks import GenItem, MCItem, extract

TokenLogprobs = Callable[[list[list[int]]], list[np.ndarray]]
Generate = Callable[[list[list[int]], int], list[list[int]]]


def split_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) with the pair tokenized as one text, as lm-evaluation-harness
    does: a trailing space of the context moves to the continuation, and the continuation is whatever
    follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation).input_ids)
    ctx = list(tokenizer(context).input_ids)
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encodings
        cont = list(tokenizer(continuation, add_special_tokens=False).input_ids)
        return ctx, cont
    return ctx, whole[len(ctx):]


def choice_loglik(logprobs: np.ndarray, n_context: int, n_continuation: int) -> float:
    """Sum of the continuation's token logprobs in a teacher-forced ``logprobs`` (entry t-1 is log p(x_t | x_<t))."""
    if n_context < 1 or n_continuation < 1:
        raise ValueError("need at least one context and one continuation token")
    return float(np.sum(logprobs[n_context - 1: n_context - 1 + n_continuation]))


Continuation = Callable[[list[list[int]], list[int]], Any]


def from_token_logprobs(token_logprobs: TokenLogprobs) -> Continuation:
    """A continuation scorer from a plain teacher-forced scorer: every context recomputed, none reused."""
    from sagecheck.engines import PathRun

    def score(seqs: list[list[int]], starts: list[int]) -> Any:
        return PathRun([lp[s:] for lp, s in zip(token_logprobs(seqs), starts)], {"cached_tokens": [0] * len(seqs)})

    return score


def score_multiple_choice(items: Sequence[MCItem], tokenizer: Any, continuation: Continuation, batch_size: int = 16,
                          by_question: bool = False) -> list[dict[str, Any]]:
    """Per question: each choice's log-likelihood, the choice picked by acc and by acc_norm, correctness, and the tokens
    of each choice's request that the engine took from its prefix cache.

    ``continuation(seqs, starts)`` gives, per sequence, log p(x_t | x_<t) for t = start+1..n-1 (a
    :meth:`~sagecheck.engines.Backend.continuation_logprobs`, or :func:`from_token_logprobs` of a plain scorer). Each
    choice asks from the last context token on, so that a server may reuse the context from its prefix cache.
    ``by_question``: the questions in order, each batch's first choices before its other choices, so that a server takes
    each context from its prefix cache as it takes a serving workload's shared prompts (else the longest requests first,
    which batches equal lengths in process). Choices sent together with their context reuse almost nothing: one
    prefill batch shares nothing between its requests (README, 09)."""
    requests = []
    for qi, item in enumerate(items):
        for ci, choice in enumerate(item.choices):
            ctx, cont = split_tokens(tokenizer, item.context, choice)
            requests.append((qi, ci, ctx + cont, len(ctx), len(cont)))
    order = list(range(len(requests))) if by_question else sorted(range(len(requests)), key=lambda i: -len(requests[i][2]))
    logliks: dict[tuple[int, int], float] = {}
    cached: dict[tuple[int, int], int] = {}
    for start in range(0, len(order), batch_size):
        chunk = [requests[i] for i in order[start: start + batch_size]]
        # by question: each question's first choice, then the others, which find its context in the prefix cache (a
        # server prefills one batch at once: choices that arrive together with their context do not share it)
        waves = [[r for r in chunk if r[1] == 0], [r for r in chunk if r[1] != 0]] if by_question else [chunk]
        for wave in (w for w in waves if w):
            got = continuation([r[2] for r in wave], [r[3] - 1 for r in wave])
            for (qi, ci, _, n_ctx, n_cont), lp, c in zip(wave, got.logprobs, got.evidence.get("cached_tokens", [0] * len(wave))):
                logliks[(qi, ci)] = choice_loglik(np.concatenate([np.zeros(n_ctx - 1), lp]), n_ctx, n_cont)
                cached[(qi, ci)] = int(c)
    rows = []
    for qi, item in enumerate(items):
        ll = [logliks[(qi, ci)] for ci in range(len(item.choices))]
        norm = [v / max(len(c), 1) for v, c in zip(ll, item.choices)]
        pick, pick_norm = int(np.argmax(ll)), int(np.argmax(norm))
        rows.append({"id": item.id, "loglik": ll, "pick": pick, "pick_norm": pick_norm, "answer": item.answer,
                     "correct": pick == item.answer, "correct_norm": pick_norm == item.answer,
                     "cached_tokens": [cached[(qi, ci)] for ci in range(len(item.choices))]})
    return rows


def context_reuse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many choice requests took tokens from the prefix cache, and how many on average."""
    cached = [c for r in rows for c in r.get("cached_tokens", [])]
    used = [c for c in cached if c]
    return {"requests": len(cached), "reused": len(used), "cached_tokens_mean": float(np.mean(used)) if used else 0.0}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def score_generation(items: Sequence[GenItem], tokenizer: Any, generate: Generate, max_new_tokens: int, extractor: str,
                     stop: Sequence[str] = (), batch_size: int = 16) -> list[dict[str, Any]]:
    """Per question: the greedy output (cut at the first stop string), the extracted answer, exact match."""
    prompts = [list(tokenizer(it.prompt).input_ids) for it in items]
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs += generate(prompts[start: start + batch_size], max_new_tokens)
    rows = []
    for item, out in zip(items, outputs):
        text = cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), stop)
        got = extract(text, extractor)
        rows.append({"id": item.id, "output": text, "extracted": got, "answer": item.answer, "correct": got == item.answer})
    return rows


# --------------------------------------------------------------------------- the paired comparison


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of ``correct`` out of ``n`` (scipy.stats)."""
    from scipy import stats

    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def reference_bar(reference: float, n: int) -> float:
    """The level a baseline accuracy must exceed to show that a task can tell right from wrong: the reference
    (chance) level plus two binomial standard errors at that level."""
    return reference + 2 * math.sqrt(reference * (1 - reference) / n) if n else float("nan")


def mcnemar_exact(base_only: int, cand_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a binomial(b + c, 1/2) count (scipy.stats)."""
    from scipy import stats

    n = base_only + cand_only
    if n == 0:
        return 1.0
    return min(1.0, float(stats.binomtest(min(base_only, cand_only), n, 0.5).pvalue))


def paired_bootstrap_delta(base: Sequence[bool], cand: Sequence[bool], resamples: int = 2000, seed: int = 0,
                           level: float = 0.95) -> dict[str, float]:
    """Accuracy delta (candidate - baseline, in percentage points) and its percentile bootstrap interval,
    questions resampled with both backends' answers kept together."""
    b, c = np.asarray(base, dtype=float), np.asarray(cand, dtype=float)
    if b.shape != c.shape or b.size == 0:
        raise ValueError("need the same, non-empty set of questions for both backends")
    diff = c - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"delta_pp": 100 * float(diff.mean()), "ci_low_pp": 100 * float(np.quantile(means, alpha)),
            "ci_high_pp": 100 * float(np.quantile(means, 1 - alpha)), "resamples": resamples}


def compare(base: Sequence[bool], cand: Sequence[bool], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy of each, the paired delta with its interval, the discordant counts and McNemar's p."""
    b, c = np.asarray(base, dtype=bool), np.asarray(cand, dtype=bool)
    base_only, cand_only = int(np.sum(b & ~c)), int(np.sum(~b & c))
    return {
        "questions": int(b.size),
        "baseline_accuracy": float(b.mean()),
        "candidate_accuracy": float(c.mean()),
        "baseline_ci": wilson_interval(int(b.sum()), int(b.size)),
        "candidate_ci": wilson_interval(int(c.sum()), int(c.size)),
        **paired_bootstrap_delta(b, c, resamples, seed),
        "right_to_wrong": base_only,
        "wrong_to_right": cand_only,
        "both_right": int(np.sum(b & c)),
        "both_wrong": int(np.sum(~b & ~c)),
        "mcnemar_p": mcnemar_exact(base_only, cand_only),
    }


# per kind of task: (the field of a scored row that says right or wrong, the metric's name); the first is the headline
METRICS = {"multiple_choice": [("correct", "acc"), ("correct_norm", "acc_norm")], "generate": [("correct", "exact match")]}


def paired_summary(task: Any, base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], resamples: int = 2000,
                   seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One task's comparison per metric (:func:`compare`, with the task's reference level) and its flips per metric."""
    summary, changed = [], []
    for key, metric in METRICS[task.kind]:
        c = compare([r[key] for r in base_rows], [r[key] for r in cand_rows], resamples=resamples, seed=seed)
        summary.append({"task": task.name, "metric": metric, "headline": key == "correct", "reference level": task.reference_level, **c})
        changed += [{"metric": metric, **f} for f in flips(task.items, base_rows, cand_rows, key=key)]
    return summary, changed


def flips(items: Sequence[Any], base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], key: str = "correct",
          max_chars: int = 160) -> list[dict[str, Any]]:
    """The questions whose correctness changed, with what each backend answered."""
    out = []
    for item, b, c in zip(items, base_rows, cand_rows):
        if b[key] == c[key]:
            continue
        out.append({"id": item.id, "flip": "right → wrong" if b[key] else "wrong → right",
                    "question": item.question[:max_chars], "right answer": _answer_text(item, item.answer if isinstance(item, MCItem) else None),
                    "baseline answered": _answered(item, b, key), "candidate answered": _answered(item, c, key)})
    return out


def _answer_text(item: Any, index: int | None) -> str:
    if isinstance(item, MCItem):
        labels = item.labels or item.choices
        scored = item.choices[index].strip()
        letter = scored if len(scored) == 1 and scored != labels[index].strip() else ""  # MMLU scores letters: say both
        return f"{letter + ': ' if letter else ''}{labels[index]}"[:120]
    return str(item.answer)


def _answered(item: Any, row: dict[str, Any], key: str) -> str:
    if isinstance(item, MCItem):
        return _answer_text(item, row["pick_norm" if key == "correct_norm" else "pick"])
    return f"{row['extracted']} ({row['output'][:60]!r})"


# --------------------------------------------------------------------------- 09_tasks


def load_all(p: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Every task of ``p.tasks``, by name, and the ones that could not be loaded with why (the others still run)."""
    from sagecheck.data.tasks import TaskDataError, load_task

    loaded, errors = {}, {}
    for spec in p.tasks:
        try:
            loaded[spec.name] = load_task(spec, seed=p.seed, cache_dir=p.cache_dir)
        except (TaskDataError, ValueError) as e:
            errors[spec.name] = str(e)
    if not loaded:
        raise RuntimeError("no task could be loaded: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return loaded, errors


def overview(loaded: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"task": name, "kind": t.kind, "questions": len(t.items), "data": t.description, "reference level": t.reference_level}
            for name, t in loaded.items()]


def score(engine: Any, loaded: dict[str, Any], p: Any, control_engine: Any = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Per (backend label, task): each question scored, multiple choice by log-likelihood, generation by exact match;
    then the accepted-precision control and its engine's baseline (where that is not the run's baseline already)."""
    scored = _score(engine, engine.pair, loaded, p)
    if control_engine is not None:
        ce = control_engine
        labels = [label for label in (ce.baseline, ce.control) if not (ce is engine and label == engine.baseline)]
        scored.update(_score(ce, labels, loaded, p))
    return scored


def _score(engine: Any, labels: Sequence[str], loaded: dict[str, Any], p: Any) -> dict[tuple[str, str], list[dict[str, Any]]]:
    from sagecheck.engines import RADIX_CACHE

    specs = {s.name: s for s in p.tasks}
    serving = RADIX_CACHE in engine.capabilities  # a server: each question's choices together, as a serving workload
    scored = {}
    for label in labels:
        with engine.backend(label) as b:
            for name, t in loaded.items():
                if t.kind == "multiple_choice":
                    b.reset_cache()
                    scored[label, name] = score_multiple_choice(t.items, engine.tokenizer, b.continuation_logprobs,
                                                                p.batch_size, by_question=serving)
                else:
                    s = specs[name]
                    scored[label, name] = score_generation(t.items, engine.tokenizer, b.generate, s.max_new_tokens, s.extractor,
                                                           t.stop, p.batch_size)
    return scored


def choice_kl(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]]) -> np.ndarray:
    """Per multiple-choice question: KL(baseline || candidate) between the two distributions over its choices (a softmax
    of the choices' log-likelihoods). A continuous view of the answers: it moves where the choices' scores move, long
    before an answer flips."""
    out = []
    for b, c in zip(base_rows, cand_rows):
        lb, lc = np.asarray(b["loglik"], dtype=np.float64), np.asarray(c["loglik"], dtype=np.float64)
        lb, lc = lb - np.logaddexp.reduce(lb), lc - np.logaddexp.reduce(lc)
        out.append(max(0.0, float(np.sum(np.exp(lb) * (lb - lc)))))
    return np.asarray(out)


@dataclass
class Compared:
    summary: list[dict[str, Any]]  # per task and metric
    flips: dict[str, list[dict[str, Any]]]  # per task: the questions whose answer changed
    control: str | None = None
    control_summary: list[dict[str, Any]] | None = None  # the control against its engine's baseline, per task and metric
    choice_kl: dict[str, dict[str, float]] | None = None  # multiple choice: per task, mean KL of the candidate, the control

    @property
    def headline(self) -> list[dict[str, Any]]:
        return [s for s in self.summary if s["headline"]]

    def control_headline(self, task: str) -> dict[str, Any] | None:
        return next((s for s in self.control_summary or [] if s["task"] == task and s["headline"]), None)


def compare_all(loaded: dict[str, Any], scored: dict[tuple[str, str], Any], baseline: str, candidate: str, p: Any,
                control_pair: tuple[str, str] | None = None) -> Compared:
    summary, flipped, control_summary, kl = [], {}, [], {}
    for name, t in loaded.items():
        rows, flipped[name] = paired_summary(t, scored[baseline, name], scored[candidate, name], p.bootstrap, p.seed)
        summary += rows
        if control_pair:
            control_summary += paired_summary(t, scored[control_pair[0], name], scored[control_pair[1], name], p.bootstrap,
                                              p.seed)[0]
            if t.kind == "multiple_choice":
                kl[name] = {"candidate": float(choice_kl(scored[baseline, name], scored[candidate, name]).mean()),
                            "control": float(choice_kl(scored[control_pair[0], name], scored[control_pair[1], name]).mean())}
    return Compared(summary, flipped, control_pair[1] if control_pair else None, control_summary if control_pair else None, kl)


def accuracy_table(c: Compared, baseline: str, candidate: str) -> list[dict[str, Any]]:
    """Per task and metric: the candidate against the baseline, then the control against its baseline (its rows say
    so): accuracy of each, the delta with its interval, the flips and McNemar's p."""
    rows = []
    for compared, summary in ((candidate, c.summary), (c.control, c.control_summary or [])):
        rows += [{"task": s["task"], "metric": s["metric"], "compared": compared, "questions": s["questions"],
                  "baseline": s["baseline_accuracy"], "compared's": s["candidate_accuracy"], "reference level": s["reference level"],
                  "delta (pp)": s["delta_pp"], "95% CI (pp)": f"[{s['ci_low_pp']:+.2f}, {s['ci_high_pp']:+.2f}]",
                  "right → wrong": s["right_to_wrong"], "wrong → right": s["wrong_to_right"], "McNemar p": s["mcnemar_p"]}
                 for s in summary]
    return rows


def record(results: Any, loaded: dict[str, Any], errors: dict[str, str], scored: dict[tuple[str, str], Any], c: Compared,
           p: Any) -> None:
    """09's results and verdicts: per task the accuracy lost and (multiple choice) how far the choices' scores moved, each
    against the accepted-precision control's on the same questions; McNemar's p; that the task can tell right from
    wrong."""
    from sagecheck.thresholds import accuracy_loss, from_control, parameter

    results.metric("tasks", {name: {"kind": t.kind, "data": t.description, "questions": len(t.items),
                                    "reference_level": t.reference_level} for name, t in loaded.items()})
    results.metric("not_loaded", errors)
    results.table("accuracy", c.summary)
    results.table("flips", [{"task": name, **row} for name, rows in c.flips.items() for row in rows])
    results.table("answers", [{"task": name, "implementation": label, **{k: v for k, v in row.items() if k != "loglik"}}
                              for (label, name), rows in scored.items() for row in rows])
    results.metric("context_reuse", {f"{label}: {name}": context_reuse(rows) for (label, name), rows in scored.items()
                                     if loaded[name].kind == "multiple_choice"})
    results.table("control_accuracy", c.control_summary or [])
    results.metric("choice_kl", c.choice_kl or {})
    for s in c.headline:
        task = s["task"]
        k = c.control_headline(task) or {}
        on = f"the same {s['questions']} questions"
        t = accuracy_loss(-k.get("delta_pp", float("nan")), k.get("baseline_accuracy", float("nan")), c.control, on)
        results.verdict(f"tasks.{task}.loss", "accuracy", f"{task}: accuracy lost ({s['metric']})", -s["delta_pp"], "<=",
                        t.value, unit="pp", source=t.source,
                        detail=f"delta {s['delta_pp']:+.2f} pp, 95% CI [{s['ci_low_pp']:+.2f}, {s['ci_high_pp']:+.2f}] over "
                               f"{s['questions']} questions")
        if task in (c.choice_kl or {}):
            kl = c.choice_kl[task]
            results.verdict(f"tasks.{task}.choice_kl", "accuracy", f"{task}: mean KL between the choices' distributions",
                            kl["candidate"], "<=", kl["control"], unit="nats",
                            detail="each question's choices scored by both backends, softmax over the choices",
                            source=from_control(c.control, on, f"{kl['control']:.3g} nats"))
        results.verdict(f"tasks.{task}.mcnemar", "accuracy", f"{task}: exact McNemar p (flips not one-sided)", s["mcnemar_p"], ">=",
                        p.mcnemar_alpha, detail=f"{s['right_to_wrong']} right → wrong, {s['wrong_to_right']} wrong → right",
                        source=parameter("tasks.mcnemar_alpha", p.mcnemar_alpha, "the significance level of the test"))
        results.verdict(f"tasks.{task}.reference", "control", f"{task}: baseline above its reference level (the task can tell "
                        "right from wrong)", s["baseline_accuracy"], ">", reference_bar(s["reference level"], s["questions"]),
                        detail=f"reference level {s['reference level']:.3f} + 2 standard errors",
                        source="the task's chance level plus two binomial standard errors")
    for name, why in errors.items():
        results.verdict(f"tasks.{name}.loaded", "coverage", f"{name}: task data loaded", 0, "==", 1, detail=why[:300])


def reuse_sentence(scored: dict[tuple[str, str], list[dict[str, Any]]], loaded: dict[str, Any], candidate: str) -> str | None:
    """Whether the candidate's multiple-choice requests reused their question's context from the prefix cache."""
    parts = []
    for (label, name), rows in scored.items():
        if label == candidate and loaded[name].kind == "multiple_choice":
            r = context_reuse(rows)
            parts.append(f"{name}: {r['reused']} of {r['requests']} choice requests of {candidate} reused a cached context"
                         + (f" ({r['cached_tokens_mean']:.0f} tokens on average)" if r["reused"] else ""))
    return ("Prefix cache (the choices of a question share its context): " + "; ".join(parts) + ".") if parts else None
