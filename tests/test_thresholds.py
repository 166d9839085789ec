"""Where thresholds come from: the control of the run, or a published target where that allows more; every accuracy
verdict must say which."""

from __future__ import annotations

import pytest

from sagecheck import results as R
from sagecheck import thresholds as T


def test_the_accuracy_a_candidate_may_lose_is_the_controls_or_mlperfs_one_percent():
    # the control lost 3 points of 60% accuracy: more than MLPerf's 1% of 60 (0.6 points)
    t = T.accuracy_loss(3.0, 0.60, "sdpa-fp8kv", "the same 200 questions")
    assert t.value == 3.0 and t.source.startswith("control of this run: sdpa-fp8kv") and "+3 pp lost" in t.source
    # the control lost nothing (or gained, by chance): MLPerf's 99% of the baseline stands, and says so
    t = T.accuracy_loss(-1.0, 0.60, "sdpa-fp8kv", "the same 200 questions")
    assert t.value == pytest.approx(0.6) and t.source.startswith("published target: MLPerf")
    assert "more than the control allows" in t.source


def test_an_accuracy_verdict_without_a_source_is_refused(tmp_path):
    res = R.Results("02_logits", tmp_path)
    with pytest.raises(ValueError, match="must say where its threshold comes from"):
        res.verdict("logits.kl_mean", "accuracy", "mean KL", 0.001, "<=", 0.01)
    with pytest.raises(ValueError, match="must say where its threshold comes from"):
        res.verdict("code_path.cold", "code_path", "cold", 0.001, "<=", 0.01)
    v = res.verdict("logits.kl_mean", "accuracy", "mean KL", 0.001, "<=", 0.01, source=T.from_control("c", "x", "0.01"))
    assert v.passed and v.source == "control of this run: c (" + T.ACCEPTED_PRECISION_WORDS + ") on x: 0.01"
    # other kinds may name a parameter, or nothing (their threshold is the parameter of the same name)
    assert res.verdict("throughput.repeat", "control", "repeat", 1.0, "<=", 3.0).source == ""


def test_a_missing_control_fails_the_verdict_instead_of_passing_it(tmp_path):
    res = R.Results("02_logits", tmp_path)
    v = res.verdict("logits.kl_mean", "accuracy", "mean KL", 0.0, "<=", float("nan"), source="control of this run: none")
    assert not v.passed


def test_results_of_the_previous_schema_still_load(tmp_path):
    res = R.Results("02_logits", tmp_path)
    res.verdict("logits.kl_mean", "accuracy", "mean KL", 0.001, "<=", 0.01, source="control")
    data = res.to_dict()
    data["schema"] = 2
    for v in data["verdicts"]:
        del v["source"]
    (tmp_path / "02_logits.json").write_text(__import__("json").dumps(data))
    loaded = R.load(tmp_path / "02_logits.json")
    assert loaded.verdicts[0].source == "" and loaded.verdicts[0].passed


def test_a_source_in_a_few_words_for_tables():
    assert T.short(T.from_control("sdpa-fp8kv", "the same 10 positions", "0.01 nats")) == "control sdpa-fp8kv"
    assert T.short(T.accuracy_loss(-1.0, 0.5, "sdpa-fp8kv", "x").source) == "published target"
    assert T.short("control of this run: the baseline's own difference") == "control of this run"
    assert T.short(T.parameter("tasks.mcnemar_alpha", 0.05)) == "parameter"
    assert T.short("") == ""
