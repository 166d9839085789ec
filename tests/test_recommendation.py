"""The report's opening sentences are computed from the run's results: crossover, accuracy figures, failures."""

from __future__ import annotations

from sagecheck.report import recommendation as rec
from sagecheck import results as R
from sagecheck.thresholds import from_control

CONTROL = from_control("sdpa-fp8kv", "the same positions", "0.001 nats")


def _throughput(tmp_path, speedups: dict[tuple[int, int], tuple[float, str]], aa_pct: float = 1.0) -> R.Results:
    """04's results of an SGLang run: the candidate's prefill speedup and its class against the A/A control per point."""
    res = R.Results("04_throughput", tmp_path)
    rows = []
    for (batch, length), (speedup, verdict) in speedups.items():
        rows.append({"batch": batch, "input_length": length, "implementation": "triton", "status": "ok"})
        rows.append({"batch": batch, "input_length": length, "implementation": "sage_attn", "status": "ok",
                     "prefill_speedup": speedup, "prefill_vs_aa": verdict, "decode_speedup": 1.0, "decode_vs_aa": "no difference"})
    res.table("throughput", rows)
    res.metric("labels", {"baseline": "triton", "candidate": "sage_attn", "copy": "triton copy"})
    # the display name is not what the recommendation reads: the id and the kind are
    res.verdict("throughput.aa.prefill", "control", "any words at all", aa_pct, "<=", 3.0, unit="%")
    return res


SGLANG = {"engine": "sglang", "candidate": "sage", "baseline": "sdpa", "sglang_attention_backend": "sage_attn",
          "sglang_baseline_backend": "triton"}


def test_crossover_is_where_every_longer_length_is_faster():
    pts = [{"batch": 1, "input_length": n, "verdict": v, "speedup": 1.0} for n, v in
           [(128, "slower"), (512, "faster"), (2048, "no difference"), (8192, "faster"), (16384, "faster")]]
    pts += [{"batch": 4, "input_length": n, "verdict": "slower", "speedup": 0.5} for n in (128, 8192)]
    assert rec.crossover(pts) == {1: 8192}  # 512 is faster but 2048 is not: the crossover is 8192; batch 4 never


def test_sentences_name_the_crossover_and_the_worst_point(tmp_path):
    tp = _throughput(tmp_path, {(1, 128): (0.4, "slower"), (1, 8192): (1.08, "faster"), (4, 128): (0.6, "slower"),
                                (4, 8192): (1.12, "faster")})
    logits = R.Results("02_logits", tmp_path)
    logits.verdict("logits.kl_mean", "accuracy", "mean KL(baseline || candidate)", 0.0004, "<=", 0.001, unit="nats", source=CONTROL)
    out = rec.sentences([tp, logits], SGLANG)
    assert 3 <= len(out) <= 6 and out[2].startswith("Code paths were not judged one by one")
    speed = out[0]
    assert "sage_attn against triton" in speed and "faster at 2 of 4 points, slower at 2" in speed
    assert "best 1.12x at input 8192, batch 4" in speed and "faster from input 8192 on at batch 1 and 4" in speed
    assert "worst 0.4x at input 128, batch 1" in speed
    assert "all 1 checks pass" in out[1] and "0.0004 nats" in out[1]
    assert out[-1].startswith("Reading: accurate by these checks, and worth enabling")


def test_a_decode_at_a_lower_gpu_clock_is_said_beside_the_speed(tmp_path):
    """04's clock log found the candidate's decode at a lower SM clock: the PR's speed sentence says so, and only then."""
    tp = _throughput(tmp_path, {(1, 128): (1.0, "no difference"), (1, 8192): (1.24, "faster")})
    assert "lower SM clock" not in rec.sentences([tp], SGLANG)[0]
    tp.metric("gpu_clocks", {"logged": True, "lower_decode_clocks": [
        {"batch": 1, "input_length": 8192, "candidate_mhz": 1800.0, "baseline_mhz": 1965.0, "copy_mhz": 1950.0}]})
    speed = rec.sentences([tp], SGLANG)[0]
    assert ("At 1 point its GPU decoded at a lower SM clock than the baseline's (input 8192 batch 1: 1800 against 1965 "
            "MHz; 04's GPU clock log)") in speed  # a run recorded before the repeats were counted
    tp.metric("gpu_clocks", {"logged": True, "lower_decode_clocks": [
        {"batch": 1, "input_length": 8192, "candidate_mhz": 1800.0, "baseline_mhz": 1965.0, "copy_mhz": 1950.0,
         "lower_in_repeats": 6, "paired_repeats": 6}]})
    assert "(input 8192 batch 1: 1800 against 1965 MHz, in 6 of 6 repeats; 04's GPU clock log)" in rec.sentences([tp], SGLANG)[0]


def test_a_failed_aa_control_and_failing_accuracy_are_said(tmp_path):
    tp = _throughput(tmp_path, {(1, 128): (0.9, "faster")}, aa_pct=8.0)  # "faster" than a noisy A/A, yet below 1
    logits = R.Results("02_logits", tmp_path)
    logits.verdict("logits.top1", "accuracy", "top-1 agreement", 0.96, ">=", 0.97, source=CONTROL)
    out = rec.sentences([tp, logits], SGLANG)
    assert "faster at 0 of 1 points" in out[0]  # a point below 1 is never called faster
    assert "A/A control failed" in out[0] and "8 %" in out[0] and "limit 3 %" in out[0]
    assert "1 of 1 checks fail: top-1 agreement 0.96 (limit >= 0.97, the accepted-precision control's)" in out[1]
    assert "02_logits (1: its next-token distributions differ" in out[3] and "04_throughput (1: the speed figures are not conclusive)" in out[3]
    assert out[-1] == "Reading: not a drop-in replacement here; 1 accuracy check(s) fail."


def test_missing_and_failed_notebooks_are_said_not_guessed(tmp_path):
    failed = R.Results("03_perplexity", tmp_path, status="failed", reason="ConnectionError: no server")
    out = rec.sentences([failed], {"engine": "hf", "candidate": "sage", "baseline": "sdpa", "device": "cuda"})
    assert out[0] == "Speed was not measured in this run (04_throughput did not run)."
    assert out[1] == "Accuracy was not measured in this run."
    assert "1 notebook(s) failed (03_perplexity)" in out[3]
    assert "no accuracy check ran" in out[-1]


def test_in_process_points_are_classed_by_their_interval_around_one(tmp_path):
    tp = R.Results("04_throughput", tmp_path)
    tp.metric("labels", {"baseline": "sdpa", "candidate": "sage-emulated", "copy": None})
    tp.table("throughput", [{"batch": 1, "input_length": 64, "implementation": "sage-emulated", "status": "ok",
                             "prefill_speedup": 0.5, "prefill_speedup_p10": 0.45, "prefill_speedup_p90": 0.55},
                            {"batch": 2, "input_length": 64, "implementation": "sage-emulated", "status": "ok",
                             "prefill_speedup": 1.01, "prefill_speedup_p10": 0.97, "prefill_speedup_p90": 1.05}])
    env = R.Results("00_environment", tmp_path)
    env.metric("device", "cpu")
    out = rec.sentences([env, tp], {"engine": "hf", "candidate": "sage-emulated", "baseline": "sdpa", "device": "auto"})
    assert "faster at 0 of 2 points, slower at 1" in out[0] and "say nothing about the kernel's speed" in out[0]


def test_a_task_that_cannot_tell_right_from_wrong_is_not_blamed_on_the_candidate(tmp_path):
    tasks = R.Results("09_tasks", tmp_path)
    tasks.verdict("tasks.sums.loss", "accuracy", "sums: accuracy lost", 0.0, "<=", 2.0, unit="pp", source=CONTROL)
    tasks.verdict("tasks.sums.reference", "control", "sums: baseline above its reference level", 0.0, ">", 0.5)
    out = rec.sentences([tasks], SGLANG)
    assert "all 1 checks pass" in out[1]
    assert "09_tasks (1: a task the baseline cannot answer above its reference level" in out[3]
    assert not out[-1].startswith("Reading: not a drop-in")


def test_a_renamed_verdict_changes_nothing_in_the_reading(tmp_path):
    """The recommendation reads ids and kinds: the same run with every display name changed reads the same."""
    tp = _throughput(tmp_path, {(1, 128): (1.2, "faster")}, aa_pct=8.0)
    logits = R.Results("02_logits", tmp_path)
    logits.verdict("logits.top1", "accuracy", "top-1 agreement", 0.96, ">=", 0.97, source=CONTROL)
    before = rec.sentences([tp, logits], SGLANG)
    for res in (tp, logits):
        for v in res.verdicts:
            v.name = "renamed " + v.name[::-1]
    after = rec.sentences([tp, logits], SGLANG)
    assert [s.split(":")[0] for s in before] == [s.split(":")[0] for s in after]
    assert before[0] == after[0] and before[-1] == after[-1] and "A/A control failed" in after[0]


def _paths(tmp_path, failing: str | None = None) -> R.Results:
    """10's results: every path exercised and passing but ``failing``; decode in CUDA graphs not exercised."""
    res = R.Results("10_code_paths", tmp_path)
    rows = []
    for path, title in (("cold", "cold prefill"), ("prefix", "extend over a cached prefix"), ("decode_eager", "eager decode")):
        bad = path == failing
        rows.append({"id": path, "title": title, "exercised": True, "evidence": "ran", "why_not": "", "passed": not bad,
                     "excess": 7.5 if bad else 0.9} if path != "cold" else
                    {"id": path, "title": title, "exercised": True, "evidence": "ran", "why_not": "", "passed": True,
                     "vs_baseline_mean": 0.02})
        res.verdict(f"code_path.{path}", "code_path", title, 7.5 if bad else 0.9, "<=", 1.5, source="control of this run")
    rows.append({"id": "decode_graphs", "title": "decode in CUDA graphs", "exercised": False, "evidence": "",
                 "why_not": "the server runs with CUDA graphs off"})
    res.table("paths", rows)
    return res


def test_a_failing_code_path_is_never_a_drop_in_whatever_else_passes(tmp_path):
    tp = _throughput(tmp_path, {(1, 8192): (1.5, "faster")})
    logits = R.Results("02_logits", tmp_path)
    logits.verdict("logits.kl_mean", "accuracy", "mean KL(baseline || candidate)", 0.0004, "<=", 0.001, unit="nats", source=CONTROL)
    good = rec.sentences([tp, logits, _paths(tmp_path)], SGLANG)
    assert good[-1].startswith("Reading: accurate by these checks, and worth enabling")
    assert "Code paths: 3 of 3 exercised pass; not exercised: decode in CUDA graphs (the server runs with CUDA graphs off)" in good[2]
    bad = rec.sentences([tp, logits, _paths(tmp_path, failing="prefix")], SGLANG)
    assert bad[-1] == ("Reading: not a drop-in replacement, whatever the other checks say: the extend over a cached prefix "
                       "path fails (7.50× its control at least).")
    assert "failing: extend over a cached prefix (7.50× its control at least)" in bad[2]


def test_only_a_run_that_shows_the_candidate_accurate_is_marked_accurate(tmp_path):
    """The PR summary's mark reads this, never the reading's words: accuracy checks ran and pass, no code path fails."""
    logits = R.Results("02_logits", tmp_path)
    logits.verdict("logits.kl_mean", "accuracy", "mean KL(baseline || candidate)", 0.0004, "<=", 0.001, unit="nats", source=CONTROL)
    assert rec.accurate([logits])
    assert not rec.accurate([])  # nothing measured accuracy: no pass
    bad = R.Results("02_logits", tmp_path)
    bad.verdict("logits.top1", "accuracy", "top-1 agreement", 0.96, ">=", 0.97, source=CONTROL)
    assert not rec.accurate([logits, bad])
