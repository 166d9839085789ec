"""Downstream task data: multiple-choice and exact-match questions, from the hub, local files or the package.

Two schemas, those of the two tasks SGLang's own accuracy tests run:

- multiple choice, MMLU's (``cais/mmlu``): ``question``, ``choices`` (a list), ``answer`` (an index or a
  letter), optional ``subject``. The prompt is lm-evaluation-harness' MMLU prompt; the choices scored are
  the letters " A", " B", ...
- generation, GSM8K's (``openai/gsm8k``): ``question``, ``answer`` (the worked solution ending in
  ``#### <number>``). The prompt is "Question: ...\\nAnswer:" with k worked examples before it.

And two built from the held-out text that ships with the package, so the notebook runs offline on the
built-in model with a real signal: ``builtin:line_ending`` (which of four endings completes a line;
chance 1/4) and ``builtin:next_word`` (generate the next word; exact match).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagecheck.data.corpus import builtin_heldout

LETTERS = "ABCDEFGHIJ"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class TaskDataError(RuntimeError):
    """A task's data could not be loaded or has the wrong fields (one line, names the source)."""


@dataclass
class MCItem:
    """One multiple-choice question: the prompt, the continuations to score, the index of the right one."""

    id: str
    question: str  # for the flips table: the question as a reader sees it
    context: str
    choices: list[str]
    answer: int
    labels: list[str] = field(default_factory=list)  # what each choice says, when the scored strings are letters


@dataclass
class GenItem:
    """One generation question: the prompt, the gold answer as the extractor returns it."""

    id: str
    question: str
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice | generate
    description: str
    items: list[Any]
    stop: list[str] = field(default_factory=list)

    @property
    def reference_level(self) -> float:
        """The accuracy that shows nothing: a uniform guess (multiple choice), or always giving the commonest
        gold answer (generation)."""
        if not self.items:
            return float("nan")
        if self.kind == "multiple_choice":
            return sum(1 / len(it.choices) for it in self.items) / len(self.items)
        counts = Counter(it.answer for it in self.items)
        return max(counts.values()) / len(self.items)


# --------------------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str:
    """"1,234.50" -> "1234.5", "$7" -> "7": GSM8K answers compared as numbers written plainly."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def extract(text: str, extractor: str) -> str | None:
    """The answer in a generated ``text``: ``last_number`` (GSM8K's flexible extraction), ``first_word``,
    ``first_line``, or ``regex:PATTERN`` (the first group of the first match). None where there is none."""
    if extractor == "last_number":
        found = _NUMBER.findall(text)
        return normalize_number(found[-1]) if found else None
    if extractor == "first_word":
        words = re.findall(r"[A-Za-z']+", text)
        return words[0].lower() if words else None
    if extractor == "first_line":
        line = text.strip().split("\n", 1)[0].strip()
        return line or None
    if extractor.startswith("regex:"):
        m = re.search(extractor[len("regex:"):], text)
        if not m:
            return None
        return (m.group(1) if m.groups() else m.group(0)).strip()
    raise ValueError(f"unknown extractor {extractor!r}: last_number, first_word, first_line or regex:PATTERN")


def gsm8k_gold(answer: str) -> str:
    """The number after GSM8K's ``####``."""
    if "####" not in answer:
        raise TaskDataError(f"GSM8K answer without '####': {answer[:80]!r}")
    return normalize_number(answer.split("####")[-1])


# --------------------------------------------------------------------------- the shipped tasks


def _heldout_lines() -> list[str]:
    """Lines of the held-out text with at least six words (speaker tags and stage directions are shorter)."""
    return [ln.strip() for ln in builtin_heldout().text.splitlines() if len(ln.split()) >= 6]


def line_ending_task(n: int | None, context_lines: int = 2, n_choices: int = 4, seed: int = 0) -> Task:
    """Which ending completes the line: two lines of held-out verse and the first half of the next line; the
    choices are its true second half and the second halves of lines drawn at random from elsewhere in the
    text. Scored like any multiple choice; chance is 1/n_choices."""
    lines = _heldout_lines()
    rng = random.Random(seed)
    starts = list(range(context_lines, len(lines)))
    rng.shuffle(starts)

    def halves(i: int) -> tuple[str, str]:
        words = lines[i].split()
        return " ".join(words[: len(words) // 2]), " " + " ".join(words[len(words) // 2:])

    items = []
    for i in starts[: n or len(starts)]:
        head, ending = halves(i)
        wrong: list[str] = []
        while len(wrong) < n_choices - 1:
            other = halves(rng.randrange(len(lines)))[1]
            if other != ending and other not in wrong:
                wrong.append(other)
        answer = rng.randrange(n_choices)
        choices = wrong[:answer] + [ending] + wrong[answer:]
        context = "\n".join(lines[i - context_lines: i]) + "\n" + head
        # the question as a reader of the flips table needs it: the lines before, then the half line to complete
        items.append(MCItem(f"line {i}", context.replace("\n", " / ") + " …", context, choices, answer,
                            labels=[c.strip() for c in choices]))
    return Task("line ending", "multiple_choice",
                f"which of {n_choices} endings completes a line of Hamlet or the Sonnets (held out from the built-in model's "
                f"training), after {context_lines} lines and the line's first half; the wrong endings are second halves of "
                "other lines of the same text", items)


def next_word_task(n: int | None, context_chars: int = 300, seed: int = 0) -> Task:
    """Generate the next word of held-out text (a word inside a line, after ``context_chars`` characters);
    exact match of the first word, case folded."""
    text = builtin_heldout().text
    spots = [m for m in re.finditer(r"(?<=[A-Za-z,;:] )[A-Za-z']+", text) if m.start() > context_chars]
    rng = random.Random(seed + 1)
    rng.shuffle(spots)
    items = []
    for m in spots[: n or len(spots)]:
        prompt = text[m.start() - context_chars: m.start() - 1]  # the space before the word belongs to the word's token
        tail = prompt.rsplit("\n", 1)[-1][-60:]
        items.append(GenItem(f"char {m.start()}", f"{tail} ___", prompt, m.group(0).lower()))
    return Task("next word", "generate", f"the next word inside a line of held-out text after {context_chars} characters "
                "(greedy, first word compared exactly, case folded)", items, stop=["\n"])


# --------------------------------------------------------------------------- hub and local files


def load_rows(source: str, subset: str | None, split: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows of a hub data set (``datasets.load_dataset``, cached) or a local json/jsonl/csv/parquet file."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.suffix in LOCAL_SUFFIXES:
            if not path.is_file():
                raise TaskDataError(f"local task file not found: {path}")
            ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(source, subset, split=split, cache_dir=cache_dir)
    except TaskDataError:
        raise
    except Exception as e:  # datasets raises many kinds (connection, not found, bad config): one line naming the source
        first = (str(e).strip().splitlines() or [""])[0][:300]
        where = f"{source}" + (f" ({subset})" if subset else "") + f", split {split}"
        raise TaskDataError(f"could not load {where}: {type(e).__name__}: {first}") from None
    return [dict(r) for r in ds]


def _answer_index(value: Any, n: int) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    idx = int(value)
    if not 0 <= idx < n:
        raise TaskDataError(f"answer {value!r} is not one of {n} choices")
    return idx


def _mmlu_block(row: dict[str, Any], with_answer: bool) -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    if with_answer:
        text += f" {LETTERS[_answer_index(row['answer'], len(row['choices']))]}\n\n"
    return text


def mmlu_items(rows: list[dict[str, Any]], shots: list[dict[str, Any]], k: int) -> list[MCItem]:
    """lm-evaluation-harness' MMLU prompt: a subject header, k solved questions of the same subject, the question."""
    missing = {"question", "choices", "answer"} - set(rows[0] if rows else {})
    if missing:
        raise TaskDataError(f"multiple-choice rows need the fields question, choices, answer; missing {sorted(missing)}")
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for s in shots:
        by_subject.setdefault(s.get("subject", ""), []).append(s)
    items = []
    for i, row in enumerate(rows):
        subject = row.get("subject", "")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" if subject else ""
        fewshot = "".join(_mmlu_block(s, True) for s in by_subject.get(subject, shots)[:k])
        n = len(row["choices"])
        items.append(MCItem(f"{subject or 'q'} {i}", row["question"].strip(), header + fewshot + _mmlu_block(row, False),
                            [f" {LETTERS[j]}" for j in range(n)], _answer_index(row["answer"], n), labels=list(row["choices"])))
    return items


def gsm8k_items(rows: list[dict[str, Any]], shots: list[dict[str, Any]], k: int) -> list[GenItem]:
    """GSM8K with k worked examples ("Question: ...\\nAnswer: <solution>"), greedy, the final number compared."""
    missing = {"question", "answer"} - set(rows[0] if rows else {})
    if missing:
        raise TaskDataError(f"generation rows need the fields question, answer; missing {sorted(missing)}")
    fewshot = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer'].strip()}\n\n" for s in shots[:k])
    return [GenItem(f"q {i}", r["question"].strip(), f"{fewshot}Question: {r['question'].strip()}\nAnswer:", gsm8k_gold(r["answer"]))
            for i, r in enumerate(rows)]


def line_ending_source(spec: Any, seed: int = 0, cache_dir: str | None = None) -> Task:
    return line_ending_task(spec.limit, seed=seed)


def next_word_source(spec: Any, seed: int = 0, cache_dir: str | None = None) -> Task:
    return next_word_task(spec.limit, seed=seed)


def mmlu_source(spec: Any, seed: int = 0, cache_dir: str | None = None) -> Task:
    return rows_task(spec, "cais/mmlu", spec.subset or "all", spec.split or "test", spec.fewshot_split or "dev", seed, cache_dir)


def gsm8k_source(spec: Any, seed: int = 0, cache_dir: str | None = None) -> Task:
    return rows_task(spec, "openai/gsm8k", spec.subset or "main", spec.split or "test", spec.fewshot_split or "train", seed,
                     cache_dir)


def load_task(spec: Any, seed: int = 0, cache_dir: str | None = None) -> Task:
    """The task a ``tasks.tasks`` entry names: a registered source (:data:`sagecheck.registry.TASKS`), else a hub id or a
    local file in the MMLU or GSM8K schema (see :class:`sagecheck.params.TaskSpec`)."""
    from sagecheck.registry import TASKS

    if spec.source in TASKS:
        task = TASKS.load(spec.source)(spec, seed, cache_dir)
    else:
        task = rows_task(spec, spec.source, spec.subset, spec.split or "test", spec.fewshot_split, seed, cache_dir)
    task.name = spec.name
    return task


def rows_task(spec: Any, repo: str, subset: str | None, split: str, shot_split: str | None, seed: int,
              cache_dir: str | None) -> Task:
    """A task from the rows of a hub data set or a local file, in the MMLU or the GSM8K schema by ``spec.kind``."""
    rows = load_rows(repo, subset, split, cache_dir)
    if not rows:
        raise TaskDataError(f"{repo} ({subset}), split {split}: no rows")
    if spec.subjects:
        rows = [r for r in rows if r.get("subject") in spec.subjects]
        if not rows:
            raise TaskDataError(f"{repo}: none of the subjects {spec.subjects} in split {split}")
    shots: list[dict[str, Any]] = []
    if spec.fewshot and Path(repo).suffix in LOCAL_SUFFIXES:  # a local file: its first rows are the examples, not scored
        shots, rows = rows[: spec.fewshot], rows[spec.fewshot:]
    elif spec.fewshot:
        shots = load_rows(repo, subset, shot_split or split, cache_dir)
    if spec.limit and spec.sample:
        rows = random.Random(seed).sample(rows, min(spec.limit, len(rows)))
    rows = rows[: spec.limit] if spec.limit else rows
    if Path(repo).suffix in LOCAL_SUFFIXES:
        where = f"local file {Path(repo).name}, {len(rows)} questions, {spec.fewshot}-shot (examples: the file's first rows)"
    else:
        where = f"{repo}" + (f" ({subset})" if subset else "") + f", {split} split, {len(rows)} questions, {spec.fewshot}-shot"
    if spec.kind == "multiple_choice":
        return Task(spec.name, spec.kind, where, mmlu_items(rows, shots, spec.fewshot))
    return Task(spec.name, spec.kind, where, gsm8k_items(rows, shots, spec.fewshot), stop=list(spec.stop))
