"""Passkey retrieval: a number hidden at a chosen depth in filler text, asked for at the end.

The format is the one of Mohtashami & Jaggi (Landmark Attention, 2023), used widely since.
Prompts are assembled from token ids, so they have exactly the requested length with any
causal LM's tokenizer, and the key appears in them exactly once.
"""

from __future__ import annotations

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
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
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
    answer_ids: list[int] = field(default_factory=list)  # " <key>" tokens, for training

    @property
    def actual_depth(self) -> float:
        return self.needle_start / max(1, self.length)


@lru_cache(maxsize=8)
def _pieces(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    head = tuple(bos_ids(tokenizer) + encode(tokenizer, INTRO))
    filler = tuple(encode(tokenizer, FILLER * 64))
    question = tuple(encode(tokenizer, QUESTION))
    return head, filler, question


def min_length(tokenizer: Any) -> int:
    head, _, question = _pieces(tokenizer)
    needle = encode(tokenizer, NEEDLE.format(key="9" * KEY_DIGITS))
    return len(head) + len(needle) + len(question)


def _filler(filler: tuple[int, ...], n: int, start: int = 0) -> list[int]:
    if n <= 0:
        return []
    reps = (start + n) // len(filler) + 1
    return list((filler * reps)[start : start + n])


def make_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyTrial:
    """One prompt of exactly ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    head, filler, question = _pieces(tokenizer)
    needle = encode(tokenizer, NEEDLE.format(key=key))
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {length - budget} tokens with this tokenizer, not {length}")
    before = int(round(depth * budget))
    ids = list(head) + _filler(filler, before) + needle + _filler(filler, budget - before, start=before) + list(question)
    answer = encode(tokenizer, " " + key)
    return PasskeyTrial(length=length, depth=depth, key=key, input_ids=ids, needle_start=len(head) + before, answer_ids=answer)


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
