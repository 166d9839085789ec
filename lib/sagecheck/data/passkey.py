"""Passkey retrieval: a number hidden at a chosen depth in filler text, asked for at the end.

The format is the one of Mohtashami & Jaggi (Landmark Attention, 2023), used widely since.
Prompts are assembled from token ids, so they have exactly the requested length with any
causal LM's tokenizer; the needle is placed at the sentence boundary of the filler nearest
to the requested depth, and the key appears in the prompt exactly once.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sagecheck.data.prompts import bos_ids, encode

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "\nThe pass key is {key}. Remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    input_ids: list[int]
    needle_start: int  # token index where the needle begins
    filler_before: int = 0  # filler tokens before the needle
    filler_total: int = 0  # filler tokens in the prompt
    answer_ids: list[int] = field(default_factory=list)  # " <key>" tokens (training, scoring)

    @property
    def actual_depth(self) -> float:
        """Where the needle sits within the filler, 0 (start) to 1 (end)."""
        return self.filler_before / max(1, self.filler_total)


@lru_cache(maxsize=16)
def _fixed(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(bos_ids(tokenizer) + encode(tokenizer, INTRO)), tuple(encode(tokenizer, QUESTION))


@lru_cache(maxsize=16)
def _filler(tokenizer: Any, reps: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Filler tokens of ``reps`` repetitions and the token offsets where its sentences end."""
    ids = tuple(encode(tokenizer, " ".join([FILLER] * reps)))
    ends = tuple(i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip().endswith("."))
    return ids, ends


def _filler_tokens(tokenizer: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    reps = 1
    while True:
        ids, ends = _filler(tokenizer, reps)
        if len(ids) >= n + 64:
            return ids, ends
        reps *= 2


def min_length(tokenizer: Any) -> int:
    head, question = _fixed(tokenizer)
    return len(head) + len(encode(tokenizer, NEEDLE.format(key="9" * KEY_DIGITS))) + len(question)


def make_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyTrial:
    """One prompt of exactly ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    head, question = _fixed(tokenizer)
    needle = encode(tokenizer, NEEDLE.format(key=key))
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {length - budget} tokens with this tokenizer, not {length}")
    filler, ends = _filler_tokens(tokenizer, budget)
    target = depth * budget
    candidates = [0, *(e for e in ends if e <= budget)]
    i = bisect.bisect_left(candidates, target)
    before = min(candidates[max(0, i - 1) : i + 1], key=lambda c: abs(c - target))
    ids = list(head) + list(filler[:before]) + needle + list(filler[before:budget]) + list(question)
    return PasskeyTrial(
        length=length, depth=depth, key=key, input_ids=ids, needle_start=len(head) + before,
        filler_before=before, filler_total=budget, answer_ids=encode(tokenizer, " " + key),
    )


def make_trials(tokenizer: Any, lengths: list[int], depths: list[float], trials: int, seed: int = 0) -> list[PasskeyTrial]:
    """``trials`` prompts for each (length, depth), with random keys from ``seed``."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))
                out.append(make_prompt(tokenizer, length, depth, key))
    return out


def extract_key(generated_text: str) -> str | None:
    """The first run of digits in the model's answer."""
    m = re.search(r"\d+", generated_text)
    return m.group(0) if m else None


def is_correct(trial: PasskeyTrial, generated_text: str) -> bool:
    return extract_key(generated_text) == trial.key


def accuracy_by(outcomes: dict[tuple[str, int, float, str], bool], implementations: tuple[str, str], by: str) -> list[dict]:
    """Accuracy per length or per depth from ``{(implementation, length, depth, key): correct}``.

    With two implementations, ``delta`` is the second's accuracy minus the first's.
    """
    position = {"length": 1, "depth": 2}[by]
    values = sorted({k[position] for k in outcomes})
    rows = []
    for value in values:
        row = {by: value}
        for impl in implementations:
            hits = [ok for k, ok in outcomes.items() if k[0] == impl and k[position] == value]
            row[impl] = sum(hits) / len(hits) if hits else float("nan")
        row["delta"] = row[implementations[1]] - row[implementations[0]]
        rows.append(row)
    return rows
