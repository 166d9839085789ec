"""09_tasks' library: choice scoring against hand-computed sums, answer extraction, task data from local files
and the hub (refused in one line), and the paired statistics against scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sagecheck.data import tasks as D
from sagecheck.metrics import tasks as T
from sagecheck.params import TaskSpec


class CharTokenizer:
    """One token per character (id = code point), no special tokens: token boundaries are obvious by hand."""

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True):
        return self._Enc([ord(c) for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_choice_loglik_sums_the_continuation_tokens_given_the_context():
    tok = CharTokenizer()
    table = {ord("a"): -0.1, ord("b"): -2.0, ord("c"): -0.5, ord("d"): -0.7}  # log p of each character, whatever precedes it

    def token_logprobs(batch):
        return [np.array([table.get(t, -9.0) for t in seq[1:]]) for seq in batch]

    item = D.MCItem("q", "q", "Q:", ["ab", "c", "dd"], answer=2)
    row = T.score_multiple_choice([item], tok, T.from_token_logprobs(token_logprobs))[0]
    assert row["loglik"] == pytest.approx([-2.1, -0.5, -1.4])  # by hand: a+b, c, d+d
    assert row["pick"] == 1 and not row["correct"]  # acc: the largest sum, "c"
    assert row["pick_norm"] == 1  # per character: -1.05, -0.5, -0.7
    item.choices = ["ab", "cccc", "dd"]
    table[ord("c")] = -0.3  # "cccc": sum -1.2 beats "dd" (-1.4) for acc; per character -0.3 beats -0.7 as well
    row = T.score_multiple_choice([item], tok, T.from_token_logprobs(token_logprobs))[0]
    assert row["pick"] == 1 and row["loglik"][1] == pytest.approx(-1.2)


def test_trailing_space_of_the_context_moves_to_the_continuation():
    ctx, cont = T.split_tokens(CharTokenizer(), "Answer: ", "B")
    assert "".join(map(chr, ctx)) == "Answer:" and "".join(map(chr, cont)) == " B"
    with pytest.raises(ValueError):
        T.choice_loglik(np.zeros(3), 0, 1)


def test_answer_extraction():
    assert D.extract("so 3 + 4 = 7 apples.\n", "last_number") == "7"
    assert D.extract("The total is $1,200.50.", "last_number") == "1200.5"
    assert D.extract("no digits", "last_number") is None
    assert D.extract("  Thou art\nmore", "first_word") == "thou"
    assert D.extract("The answer is (C).", r"regex:answer is \((\w)\)") == "C"
    assert D.gsm8k_gold("3 + 4 = 7\n#### 1,000") == "1000"
    assert T.cut_at_stop("7\n\nQuestion: next", ["Question:", "\n\n"]) == "7"
    with pytest.raises(ValueError):
        D.extract("x", "nope")


def test_mcnemar_against_the_binomial_sum():
    """scipy's exact test against the two-sided tail summed by hand: 2 * sum_{i<=min(b,c)} C(b+c, i) / 2^(b+c)."""
    for b, c in [(0, 0), (1, 0), (5, 1), (10, 2), (3, 3), (17, 4), (0, 9)]:
        n = b + c
        expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
        assert T.mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)


def test_wilson_interval_against_the_formula():
    """scipy's Wilson interval against the score interval written out (z = 1.959964)."""
    z = 1.959964
    for k, n in [(0, 10), (7, 20), (97, 200), (20, 20)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert T.wilson_interval(k, n) == pytest.approx((max(0, centre - half), min(1, centre + half)), abs=1e-6)


def test_paired_comparison_counts_flips_and_brackets_the_delta():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.6
    cand = base.copy()
    cand[:30] = ~cand[:30]
    c = T.compare(base, cand, resamples=2000)
    assert c["right_to_wrong"] == int(np.sum(base[:30])) and c["wrong_to_right"] == int(np.sum(~base[:30]))
    assert c["delta_pp"] == pytest.approx(100 * (cand.mean() - base.mean()))
    assert c["baseline_ci"] == T.wilson_interval(int(base.sum()), 400) and c["candidate_ci"] == T.wilson_interval(int(cand.sum()), 400)
    assert c["ci_low_pp"] <= c["delta_pp"] <= c["ci_high_pp"]
    k = min(c["right_to_wrong"], c["wrong_to_right"])
    assert c["mcnemar_p"] == pytest.approx(min(1, 2 * sum(math.comb(30, i) for i in range(k + 1)) / 2 ** 30))
    same = T.compare(base, base)  # A/A: nothing to tell apart
    assert same["delta_pp"] == same["ci_low_pp"] == same["ci_high_pp"] == 0 and same["mcnemar_p"] == 1.0


def test_flips_list_the_changed_answers():
    items = [D.MCItem("a", "first?", "ctx", [" A", " B"], 0, labels=["yes", "no"]),
             D.MCItem("b", "second?", "ctx", [" A", " B"], 1, labels=["yes", "no"])]
    base = [{"pick": 0, "correct": True}, {"pick": 0, "correct": False}]
    cand = [{"pick": 1, "correct": False}, {"pick": 0, "correct": False}]
    (flip,) = T.flips(items, base, cand)
    assert flip["flip"] == "right → wrong" and flip["question"] == "first?"
    assert flip["right answer"] == "A: yes" and flip["baseline answered"] == "A: yes" and flip["candidate answered"] == "B: no"


def test_builtin_line_ending_task_is_deterministic_with_the_answer_among_the_choices():
    t = D.line_ending_task(50, seed=3)
    again = D.line_ending_task(50, seed=3)
    assert [i.choices for i in t.items] == [i.choices for i in again.items] and t.reference_level == 0.25
    answers = {i.answer for i in t.items}
    assert answers == {0, 1, 2, 3}  # the right ending is not always in the same place
    for item in t.items:
        assert len(set(item.choices)) == 4 and item.context.split("\n")[-1] + item.choices[item.answer] in D.builtin_heldout().text
        # the flips table shows the question whole: the lines before and the half line, not the half line alone
        assert item.question == item.context.replace("\n", " / ") + " …"


def test_local_files_in_both_schemas(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": "BCDA"[i % 4],
                                        "subject": "math"}) for i in range(6)))
    t = D.load_task(TaskSpec(name="m", kind="multiple_choice", source=str(mc), fewshot=2, limit=3))
    assert len(t.items) == 3 and t.reference_level == 0.25 and [i.answer for i in t.items] == [3, 0, 1]  # rows 2..4: D, A, B
    assert t.items[0].context.count("Answer:") == 3 and "about math" in t.items[0].context  # 2 examples + the question
    assert t.items[0].choices == [" A", " B", " C", " D"]
    gen = D.load_task(TaskSpec(name="g", kind="generate", source="tests/data/gsm8k_sample.jsonl", fewshot=2))
    assert len(gen.items) == 5 and gen.items[-1].answer == "1000" and gen.items[0].prompt.count("Question:") == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "label": 1}))
    with pytest.raises(D.TaskDataError, match="need the fields question, choices, answer"):
        D.load_task(TaskSpec(name="b", kind="multiple_choice", source=str(bad)))


def test_an_unreachable_hub_id_is_one_line(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    # offline as on the GPU machine (datasets reads the variables when imported, so set its flags too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(D.TaskDataError) as e:
        D.load_task(TaskSpec(name="x", kind="multiple_choice", source="no-such-org/no-such-set"), cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not load no-such-org/no-such-set") and len(msg) < 500


def test_reference_bar_is_two_standard_errors_above_chance():
    assert T.reference_bar(0.25, 100) == pytest.approx(0.25 + 2 * math.sqrt(0.25 * 0.75 / 100))
