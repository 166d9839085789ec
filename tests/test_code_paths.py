"""10_code_paths: the statistic tells a path as noisy as its control from one twice as noisy; on the SGLang stand-in,
the right backend and the baseline against itself pass every path they exercise, and each deliberately wrong variant
(tests/faults) fails its own path."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from sagecheck.engines.sglang import SGLangEngine
from sagecheck.engines.sglang.servers import ServerSet
from sagecheck.metrics import code_paths as C
from sagecheck.params import NotebookParams
from sagecheck.sources import load
from tests.conftest import ROOT

STANDIN = ROOT / "tests" / "standin"
FAULT_SITE = ROOT / "tests" / "faults" / "site"
SGLANG_PARAMS = ROOT / "tests" / "params_sglang.yaml"


# ------------------------------------------------------------------ the statistic


def noisy(scale: float, n: int = 2000, seed: int = 0) -> C.Aligned:
    """A path whose candidate deviates ``scale`` times as much as a correct one would, and a correct reference."""
    rng = np.random.default_rng(seed)
    truth = -rng.uniform(0.5, 5, n)
    b_ref = truth + rng.normal(0, 1e-4, n)
    b_path = truth + rng.normal(0, 1e-4, n)
    c_ref = truth + rng.normal(0, 0.02, n)
    c_path = truth + rng.normal(0, 0.02 * scale, n)
    return C.Aligned(c_path, c_ref, b_path, b_ref)


def test_a_path_as_noisy_as_its_reference_passes_and_twice_as_noisy_fails():
    same = C.judge(noisy(1.0), ratio_max=1.5)
    assert same["passed"] and same["ratio_vs_baseline"] < 1.2
    twice = C.judge(noisy(2.0), ratio_max=1.5)
    assert not twice["passed"] and twice["ratio_vs_baseline_low"] > 1.5
    few = C.judge(noisy(2.0, n=8), ratio_max=1.5)  # eight positions cannot show it: the lower bound stays below
    assert few["ratio_vs_baseline_low"] < few["ratio_vs_baseline"]


def test_the_baseline_against_itself_is_exactly_one():
    rng = np.random.default_rng(1)
    base, path = -rng.uniform(0, 5, 300), -rng.uniform(0, 5, 300)
    got = C.judge(C.Aligned(path, base, path.copy(), base.copy()), ratio_max=1.5)
    assert got["ratio_vs_baseline"] == 0 / 1 + 1e-6 / (np.abs(path - base).mean() + 1e-6) and got["passed"]
    zeros = C.judge(C.Aligned(base, base, base, base), ratio_max=1.5)  # nothing differs anywhere: no difference
    assert zeros["ratio_vs_baseline"] == 1 and zeros["ratio_vs_self"] == 1 and zeros["passed"]


# ------------------------------------------------------------------ the stand-in's paths and the wrong variants

VARIANTS = {  # candidate: (extra parameters, the path it must fail)
    "sage_attn": ([], None),
    "fa3": ([], None),  # the baseline against itself
    "sage_attn_prefix_fault": ([], "prefix"),
    "sage_attn_stale_graph": ([], "decode_graphs"),
    "sage_attn_padded_decode": (["sglang.disable_cuda_graph=true", "sglang.sage_attn_decode=sage"], "decode_eager"),
    "sage_attn_head_split": (["sglang.tp=2"], "tp_ranks"),
}
# defects of the kernel call itself: the paths whose kernel check (the census held to the contract, its configurations
# replayed) each must fail, and no other path may fail
CENSUS_VARIANTS = {
    "sage_attn_causal_prefix": ([], {"prefix"}),
    "sage_attn_prefix_fallback": ([], {"prefix"}),
    "sage_attn_wrong_scale": ([], {"cold", "prefix", "chunked", "batch"}),  # decode runs on Triton (the default)
    "sage_attn_padded_kernel": (["sglang.disable_cuda_graph=true", "sglang.sage_attn_decode=sage"], {"decode_eager"}),
}


def judge_on_the_standin(tmp_path_factory, control, groups: dict[tuple[str, ...], list[tuple[str, list[str]]]]) -> dict:
    """Each candidate against a baseline server on the stand-in, judged: {label: (plan, results)}. ``groups``: per
    baseline's overrides, the candidates (``name`` or ``label=name``: the backend, their overrides) that share that
    baseline server (each gets its own candidate server)."""
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(STANDIN), str(FAULT_SITE), str(ROOT / "lib"), old])
    out = {}
    try:
        for overrides, candidates in groups.items():
            with ServerSet(load(SGLANG_PARAMS, list(overrides)), tmp_path_factory.mktemp("baseline"), ["baseline"]) as baseline:
                for spec, own in candidates:
                    label, _, name = spec.rpartition("=")
                    params = load(SGLANG_PARAMS, [f"sglang_attention_backend={name}", *own])
                    cand_dir = tmp_path_factory.mktemp(name)
                    with ServerSet(params, cand_dir, ["candidate"]) as candidate:
                        engine = SGLangEngine(params, cand_dir, servers={**baseline.as_dicts(), **candidate.as_dicts()})
                        out[label or name] = C.measure(engine, NotebookParams(params, "10_code_paths"), control)
    finally:
        os.environ["PYTHONPATH"] = old
    return out


@pytest.fixture(scope="module")
def judged(tmp_path_factory, builtin):
    """Every variant against the baseline server on the stand-in, judged: {candidate: (plan, results)}. Variants whose
    servers take the same arguments share one baseline server. The accepted-precision control runs in process on the
    same model (as the notebook measures it)."""
    groups: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
    for name, (overrides, _) in {**VARIANTS, **CENSUS_VARIANTS}.items():
        groups.setdefault(tuple(overrides), []).append((name, list(overrides)))
    return judge_on_the_standin(tmp_path_factory, builtin, groups)


def verdicts(results: list[C.PathResult]) -> dict[str, bool | None]:
    return {r.path: r.passed for r in results}


@pytest.mark.slow
def test_the_right_backend_and_the_baseline_against_itself_pass_every_path(judged):
    for name in ("sage_attn", "fa3"):
        plan, results = judged[name]
        got = verdicts(results)
        assert all(v is not False for v in got.values()), (name, got, [r.figures for r in results])
        # every path but the tensor-parallel one runs on the stand-in at tp 1
        assert [p for p, v in got.items() if v is None] == ["tp_ranks"], (name, {r.path: r.why_not for r in results})
    plan, results = judged["sage_attn"]
    rows = {r.path: r for r in results}
    assert f"cached tokens reported: [{plan.prefix}]" in rows["prefix"].evidence
    assert "extend_batches_with_prefix" in rows["prefix"].evidence and "decode_graph_replays" in rows["decode_graphs"].evidence
    assert "chunks of 512 (3 chunks)" in rows["chunked"].evidence and "above the largest CUDA-graph batch 4" in rows["decode_eager"].evidence
    assert rows["batch"].figures["ratio_vs_self"] == pytest.approx(1e-6 / (np.mean([0]) + 1e-6)) or rows["batch"].passed


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (_, path) in VARIANTS.items() if path])
def test_each_wrong_variant_fails_its_own_path(judged, name):
    _, path = VARIANTS[name]
    plan, results = judged[name]
    got = verdicts(results)
    assert got[path] is False, (name, got, {r.path: (r.figures, r.why_not) for r in results})
    others = {p: v for p, v in got.items() if p != path}
    if name == "sage_attn_head_split":
        # a wrong head split corrupts every forward on the ranks, the cold prefill's too: the cold row (judged against the
        # baseline alone) fails with the rank row, and so does every other path against a correct integration's error
        # (the emulation through the same path): compared only with the candidate's own cold path, corrupted alike,
        # they would show nothing
        assert got["cold"] is False and all(v is False for v in others.values() if v is not None), got
        rows = {r.path: r for r in results}
        assert all(rows[p].figures["integration"]["passed"] is False for p, v in others.items() if v is False and p != "cold"
                   and "integration" in rows[p].figures)
    else:
        assert all(v is not False for v in others.values()), (name, got)
    if name == "sage_attn_padded_decode":
        assert got["decode_graphs"] is None  # kernel decode needs CUDA graphs off: that path is not exercised


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CENSUS_VARIANTS))
def test_each_wrong_kernel_call_fails_the_kernel_check_of_its_own_paths_and_no_other(judged, name):
    """The census of the server's kernel calls: a causal call over fewer queries than keys, a fallback with no kernel
    call, a wrong softmax scale, a kernel that counts padding (its configuration replayed): each fails the kernel check
    of its own paths, nothing else fails."""
    _, paths = CENSUS_VARIANTS[name]
    plan, results = judged[name]
    kernel = {r.path: r.figures.get("kernel") for r in results}
    failing = {r.path for r in results if r.figures.get("kernel") is not None and (
        r.figures["kernel"]["violating_calls"] or not r.figures["kernel"]["step_calls"]
        or (r.figures.get("replay") or {}).get("flagged"))}
    assert failing == paths, (name, failing, kernel)
    # by their output, the defects reach where they reach: a decode path's prompts are prefilled as an extend over the
    # cached BOS token (so a causal-prefix call or a wrong scale shows there too, though decode itself runs on Triton)
    got = verdicts(results)
    reach = paths | ({"decode_graphs", "decode_eager"} if name in ("sage_attn_causal_prefix", "sage_attn_wrong_scale") else set())
    assert {p for p, v in got.items() if v is False} <= reach, (name, got)


@pytest.fixture(scope="module")
def judged_plugin(tmp_path_factory, builtin):
    """Against one baseline server: sage_attn's prefill with SageAttention 2 (SAGE_ATTN_PREFILL=batched: on the
    stand-in, the plugin's own split on the emulated SA2 kernel) and the variant with a defect in the split; sage_attn
    with a dispatch rule that sends short requests to Triton (SAGE_ATTN_DISPATCH=100: the batch path's 32-token
    requests) and the variant that runs them on the kernel, counted as Triton's."""
    batched, routed = ["sglang.sage_attn_prefill=batched"], ["sglang.sage_attn_dispatch=100"]
    return judge_on_the_standin(tmp_path_factory, builtin, {(): [
        ("split=sage_attn", batched), ("sage_attn_split_own_means", batched),
        ("routed=sage_attn", routed), ("sage_attn_route_miscount", routed)]})


@pytest.mark.slow
def test_the_plugins_split_passes_every_path_and_a_defect_in_it_fails_the_prefix_paths(judged_plugin):
    """With SageAttention 2 the plugin splits a prefix extend in two kernel calls merged by log-sum-exp: the split
    passes every path, inside the kernel's contract and as close to the baseline as a correct integration of the same
    kernel; each part smoothed by its own mean fails the paths that extend a cached prefix, by far."""
    _, results = judged_plugin["split"]
    rows = {r.path: r for r in results}
    assert all(r.passed is not False for r in results), {r.path: r.figures for r in results}
    assert "extend_batches_split" in rows["prefix"].evidence and "extend_batches_split" in rows["chunked"].evidence
    assert "extend_kernel_calls" in rows["prefix"].evidence  # the split's calls counted, as the plugin counts them
    for path in ("prefix", "chunked"):
        assert rows[path].figures["integration"]["emulation"] == "sage2-fp8-emulated"
        assert rows[path].figures["integration"]["passed"] and not rows[path].figures["kernel"]["violating_calls"]
    # the extend's two calls: the prefix part not causal, the new part causal (square: no violation above)
    kinds = {c["configuration"].split(": ")[1].split(",")[0] for c in rows["prefix"].figures["kernel"]["configurations"]}
    assert kinds == {"causal", "non-causal"}, rows["prefix"].figures["kernel"]["configurations"]
    _, wrong = judged_plugin["sage_attn_split_own_means"]
    got = verdicts(wrong)
    assert got["prefix"] is False and got["chunked"] is False and got["cold"] and got["batch"], got
    # decode prompts are prefilled as an extend over the cached BOS token: the defect reaches them too, nothing else
    assert {p for p, v in got.items() if v is False} <= {"prefix", "chunked", "decode_graphs", "decode_eager"}, got
    low = {r.path: r.figures["ratio_vs_baseline_low"] for r in wrong if r.path in ("prefix", "chunked")}
    assert min(low.values()) > 5, low  # not a near miss: 10-22x the baseline's own path-to-path difference on the stand-in


@pytest.mark.slow
def test_a_path_on_the_dispatch_rules_triton_route_is_judged_as_that_route_and_a_miscounted_one_fails(judged_plugin):
    """The batch path's short requests go to Triton by the rule: the path is judged by its answers (the baseline's
    own kernel: no difference) and by the census agreeing with the counters; the variant that runs them on the kernel
    while counting them as Triton's gives near-baseline answers, and only that agreement shows it."""
    _, results = judged_plugin["routed"]
    rows = {r.path: r for r in results}
    assert rows["batch"].exercised and rows["batch"].passed and rows["batch"].figures["route"] == C.TRITON_ROUTE
    assert rows["batch"].figures["route_kernel_calls"] == 0 and "extend_batches_triton" in rows["batch"].evidence
    assert rows["prefix"].passed and "route" not in rows["prefix"].figures  # 160-token requests: on the kernel
    assert "On Triton by the dispatch rule** (batch invariance)" in C.sentence(results)
    _, wrong = judged_plugin["sage_attn_route_miscount"]
    got = verdicts(wrong)
    assert {p for p, v in got.items() if v is False} == {"batch"}, got
    bad = {r.path: r for r in wrong}["batch"].figures
    assert bad["output_passed"] and bad["route_kernel_calls"] > 0  # its answers pass: the census shows it
    assert "kernel call(s) where its counters say on Triton (dispatch rule)" in C.sentence(wrong)


def test_the_right_backend_and_the_baseline_have_no_kernel_violation(judged):
    plan, results = judged["sage_attn"]
    looked = [r for r in results if r.figures.get("kernel") is not None]
    assert {r.path for r in looked} == {"cold", "prefix", "chunked", "batch"}  # decode runs on Triton by default
    assert all(r.figures["kernel"]["calls"] and not r.figures["kernel"]["violating_calls"] for r in looked)
    assert "inside the kernel's contract" in C.census_sentence(results)
    _, results = judged["fa3"]  # the baseline against itself: no kernel at all
    assert not any(r.figures.get("kernel") for r in results)
    assert "no kernel calls: the candidate called neither sageattention" in C.census_sentence(results)


def test_a_path_the_engine_cannot_run_is_not_exercised_never_passed():
    results = C.judge_all(C.Ran(), C.Ran(), C.Plan(seqs=[[1, 2, 3]], prefix=1, long=None, chunk=None, tail=0, batch_seqs=[[1]],
                                                  decode_prompts=[], eager_prompts=[], graphs=False, graph_max_bs=None, tp=1,
                                                  why_not={p: "not here" for p in C.PATHS}), p=None)
    assert all(r.passed is None and r.why_not == "not here" for r in results)
    assert "Not exercised" in C.sentence(results) and "Passing" not in C.sentence(results)


def test_counters_that_contradict_the_path_make_it_not_exercised():
    assert "fell back" in C._counters_say_not("prefix", {"calls:sdpa": 4, "fallbacks:sage": 4}, "sage")
    assert "phases" in C._counters_say_not("decode_eager", {"calls:sdpa": 4}, "sage-emulated")
    assert "no batch with a cached prefix" in C._counters_say_not("prefix", {"extend_batches_kernel": 2}, "sage_attn")
    assert "replayed no CUDA graph" in C._counters_say_not("decode_graphs", {"decode_batches_triton": 7}, "sage_attn")
    assert C._counters_say_not("decode_graphs", {"decode_graph_replays": 7}, "sage_attn") is None
    # sage_attn's dispatch rule sent the path's batches to Triton: judged as that route (not "not exercised"), unless
    # its counters show no batch with a cached prefix on a prefix path
    on_triton = {"extend_batches_triton": 3, "extend_batches_with_prefix_triton": 2}
    assert C.triton_route("chunked", on_triton) and C._counters_say_not("chunked", on_triton, "sage_attn") is None
    assert "no batch with a cached prefix" in C._counters_say_not("prefix", {"extend_batches_triton": 3}, "sage_attn")
    mixed = {"extend_batches_triton": 1, "extend_batches_kernel": 2, "extend_batches_with_prefix": 2}
    assert not C.triton_route("chunked", mixed) and C._counters_say_not("chunked", mixed, "sage_attn") is None
    assert not C.triton_route("decode_eager", {"extend_batches_triton": 3})  # decode paths are not routed
    time.sleep(0)
