"""Prompt sets cut from a text: short (~100 tokens) and long (2000+ tokens), identical for every backend."""

from __future__ import annotations

from typing import Any


def bos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's BOS token if it puts one in front of a text by default (Llama, the built-in model)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a").input_ids
    return [bos] if ids and ids[0] == bos else []


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def cut_prompts(token_ids: list[int], n: int, length: int, bos: list[int] = (), offset: int = 0) -> list[list[int]]:
    """``n`` windows of ``length`` tokens (BOS included), spread evenly over the text, not overlapping if it can be helped."""
    body = length - len(bos)
    if body <= 0:
        raise ValueError(f"prompt length {length} leaves no room for text")
    usable = len(token_ids) - offset - body
    if usable < 0:
        raise ValueError(f"the text has {len(token_ids)} tokens; a {length}-token prompt does not fit")
    step = usable // max(1, n - 1) if n > 1 else 0
    starts = [offset + i * step for i in range(n)]
    return [list(bos) + token_ids[s : s + body] for s in starts]


def seeded_offset(n_tokens: int, n: int, length: int, seed: int) -> int:
    """Where a set of ``n`` prompts of ``length`` tokens starts for ``seed``: 0 for seed 0 (the text's start), else a
    seeded place within the first gap between the windows, so that every window stays inside the text."""
    if not seed:
        return 0
    import random

    room = max(0, n_tokens - length) // max(1, n)
    return random.Random(seed).randrange(room) if room > 0 else 0


def prompt_sets(tokenizer: Any, text: str, n_short: int, short_tokens: int, n_long: int, long_tokens: int,
                seed: int = 0) -> dict[str, list[list[int]]]:
    """{"short": [...], "long": [...]} cut from ``text``, each set spread evenly over it from a place ``seed`` chooses."""
    ids = encode(tokenizer, text)
    bos = bos_ids(tokenizer)
    sets = {"short": cut_prompts(ids, n_short, short_tokens, bos, seeded_offset(len(ids), n_short, short_tokens, seed))}
    if n_long:
        sets["long"] = cut_prompts(ids, n_long, long_tokens, bos, seeded_offset(len(ids), n_long, long_tokens, seed))
    return sets
