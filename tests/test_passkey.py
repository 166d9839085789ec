"""The passkey generator, with the built-in tokenizer and with a tokenizer of another kind."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sagecheck import models as sm
from sagecheck.data import corpus, passkey


@pytest.fixture(scope="module")
def word_level_tokenizer():
    """A word-level tokenizer without BOS, nothing like the built-in BPE."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    text = corpus.builtin_heldout().text[:20000] + passkey.INTRO + passkey.FILLER + passkey.NEEDLE + passkey.QUESTION + " 0123456789"
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module", params=["builtin", "word-level"])
def tokenizer(request, word_level_tokenizer):
    return sm.load_tokenizer(sm.resolve("builtin")) if request.param == "builtin" else word_level_tokenizer


@pytest.mark.parametrize("length", [200, 777, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_depth_and_single_answer(tokenizer, length, depth):
    trial = passkey.make_prompt(tokenizer, length, depth, "48151")
    assert len(trial.input_ids) == length
    text = tokenizer.decode(trial.input_ids)
    assert text.count("48151") + text.count("4 8 1 5 1") == 1
    assert abs(trial.actual_depth - depth) <= 40 / max(1, trial.filler_total) + 1e-9  # nearest sentence boundary
    assert passkey.QUESTION.strip().split()[-1] in text.split()[-1]


def test_too_short_is_refused(tokenizer):
    with pytest.raises(ValueError, match="needs at least"):
        passkey.make_prompt(tokenizer, passkey.min_length(tokenizer) - 1, 0.5, "12345")


def test_trials_are_seeded_and_scored(tokenizer):
    a = passkey.make_trials(tokenizer, [300, 600], [0.1, 0.9], 3, seed=5)
    b = passkey.make_trials(tokenizer, [300, 600], [0.1, 0.9], 3, seed=5)
    assert [t.key for t in a] == [t.key for t in b] and len(a) == 12
    assert len({t.key for t in a}) > 1
    t = a[0]
    assert passkey.is_correct(t, f" {t.key}. Remember") and not passkey.is_correct(t, " 00000")
    assert passkey.extract_key("no digits") is None


def test_accuracy_by_length_and_depth():
    outcomes = {("a", 100, 0.5, "1"): True, ("a", 100, 0.9, "2"): False, ("b", 100, 0.5, "1"): True, ("b", 100, 0.9, "2"): True,
                ("a", 200, 0.5, "3"): True, ("b", 200, 0.5, "3"): False}
    by_len = passkey.accuracy_by(outcomes, ("a", "b"), "length")
    assert by_len == [{"length": 100, "a": 0.5, "b": 1.0, "delta": 0.5}, {"length": 200, "a": 1.0, "b": 0.0, "delta": -1.0}]
    by_depth = passkey.accuracy_by(outcomes, ("a", "b"), "depth")
    assert [r["depth"] for r in by_depth] == [0.5, 0.9] and by_depth[1]["a"] == 0.0
