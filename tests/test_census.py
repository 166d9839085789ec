"""The census of kernel calls (sagecheck.census): what it records, how it reads sageattention's calls wherever a backend
bound them, the kernel's contract, the replay of the configurations, and 10's verdicts on deliberately wrong backends
in process (the stand-in server's are in tests/test_code_paths.py)."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from sagecheck import census
from sagecheck import params as sp
from sagecheck.engines.hf import HFEngine
from sagecheck.metrics import code_paths as C
from sagecheck.metrics import kernel_replay
from sagecheck.sources import load
from tests.conftest import CI_PARAMS
from tests.faults import in_process


def fresh() -> census.Census:
    return census.Census()


def test_a_call_is_counted_by_configuration_and_its_sequences_by_class():
    c = fresh()
    c.record("sageattn_varlen", "k", causal=True, sm_scale=None, head_dim=64, q_heads=8, kv_heads=2, dtype="float16",
             layout="varlen", q_lens=[5, 70], k_lens=[5, 200])
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # three decode sequences, as a varlen call packs them
    c.record("sageattn_varlen", "k", causal=False, sm_scale=0.125, head_dim=64, q_heads=8, kv_heads=2, dtype="float16",
             layout="varlen", q_lens=cu[1:] - cu[:-1], k_lens=torch.tensor([64, 65, 1000]))
    snap = c.snapshot()
    causal, decode = sorted(snap.values(), key=lambda e: not e["config"]["causal"])
    assert causal["calls"] == 1 and causal["sequences"] == 2 and causal["causal_short_q"] == 1  # 70 queries over 200 keys
    assert causal["k_classes"] == {"2-15 partial": 1, "128-511 partial": 1}
    assert decode["sequences"] == 3 and decode["q_classes"] == {"1": 3}
    assert decode["k_classes"] == {"64-127": 1, "64-127 partial": 1, "512-2047 partial": 1}
    assert census.difference(snap, {}).keys() == snap.keys() and census.difference(snap, snap) == {}


@pytest.mark.parametrize("bound", [None, 3])
def test_device_counts_are_classified_when_read_as_host_counts_are(monkeypatch, bound):
    """A packed call's counts stay unread until the census is read (or, with nobody reading, until ``bound`` calls wait);
    then they count exactly as the same lengths given on the host."""
    import random

    if bound is not None:
        monkeypatch.setattr(census, "PENDING_CALLS", bound)
    rng = random.Random(0)
    calls = [([rng.choice([1, 5, 64, 70, 300]) for _ in range(rng.randint(1, 4))]) for _ in range(20)]
    host, device = fresh(), fresh()
    for causal in (True, False):
        for q in calls:
            k = [n + rng.choice([0, 0, 37, 128]) for n in q]
            for c, lens in ((host, (q, k)), (device, (torch.tensor(q, dtype=torch.int32), torch.tensor(k, dtype=torch.int32)))):
                c.record("sageattn_varlen", "k", causal=causal, sm_scale=None, head_dim=64, q_heads=8, kv_heads=2,
                         dtype="float16", layout="varlen", q_lens=lens[0], k_lens=lens[1])
        if bound is None:
            assert sum(len(c.pending) for c in device._counts.values()) == 20 * (1 + (not causal))  # nothing read yet
    assert device.snapshot() == host.snapshot()
    assert all(not c.pending for c in device._counts.values())
    assert sum(e["causal_short_q"] for e in host.snapshot().values()) > 0


def test_the_contract_of_a_configuration():
    def entry(**config):
        base = {"entry": "sageattn", "kernel": "k", "causal": False, "layout": "HND", "dtype": "bfloat16", "head_dim": 128,
                "q_heads": 32, "kv_heads": 8, "sm_scale": None, "emulated": False, "ref": "sageattention:sageattn"}
        return {"config": {**base, **config}, "calls": 3, "causal_short_q": 0}

    assert census.violations(entry()) == []
    assert "fewer queries than keys in 2" in census.violations({**entry(causal=True), "causal_short_q": 2})[0]
    assert "sm_scale 0.1, the model's is 0.0883883" in census.violations(entry(sm_scale=0.1))[0]  # 128 ** -0.5
    assert "head dim 80" in census.violations(entry(head_dim=80))[0]
    assert "dtype float32" in census.violations(entry(dtype="float32"))[0]
    assert census.violations(entry(dtype="float32", emulated=True)) == []  # an emulation on a CPU runs in float32


FAKE = '''
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
        from sageattention import core
        return core.sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                                                    sm_scale=sm_scale)
'''
CORE = '''
    def sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        return q
'''


@pytest.fixture
def fake_sageattention(tmp_path, monkeypatch):
    pkg = tmp_path / "sageattention"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE) + "\nfrom sageattention.core import sageattn_qk_int8_pv_fp16_triton\n")
    (pkg / "core.py").write_text(textwrap.dedent(CORE))
    (tmp_path / "a_fork_backend.py").write_text("from sageattention import sageattn\n\ndef attend(q, k, v):\n"
                                                "    return sageattn(q, k, v, is_causal=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sageattention", "sageattention.core", "a_fork_backend"):
        sys.modules.pop(name, None)
    yield
    for name in ("sageattention", "sageattention.core", "a_fork_backend"):
        sys.modules.pop(name, None)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, census._Finder)]


def test_a_backend_that_bound_sageattn_at_import_is_recorded_with_the_kernel_it_dispatched_to(fake_sageattention):
    fork = importlib.import_module("a_fork_backend")  # bound the original sageattn before the census started
    before = census.snapshot()
    assert census.install() >= 2
    q = torch.zeros(2, 4, 16, 64, dtype=torch.float16)
    fork.attend(q, q, q)
    (entry,) = census.difference(census.snapshot(), before).values()
    assert entry["config"]["entry"] == "sageattn" and entry["config"]["kernel"] == "sageattn_qk_int8_pv_fp16_triton"
    assert entry["config"]["causal"] and entry["sequences"] == 2 and entry["config"]["q_heads"] == 4


def test_a_server_in_production_wraps_nothing_one_sagecheck_started_wraps_every_binding(fake_sageattention, monkeypatch,
                                                                                       tmp_path):
    """The plugin's census costs a server nothing unless sagecheck asked for it (SAGE_ATTN_STATS_DIR)."""
    from sagecheck import sglang_plugin

    fork = importlib.import_module("a_fork_backend")
    monkeypatch.delenv("SAGE_ATTN_STATS_DIR", raising=False)
    sglang_plugin.start_census()
    assert not getattr(fork.sageattn, census._WRAPPED, False)
    assert not any(isinstance(f, census._Finder) for f in sys.meta_path)
    monkeypatch.setenv("SAGE_ATTN_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setattr(census, "start_writer", lambda path, interval: None)  # no thread left writing after the test
    monkeypatch.setattr(sglang_plugin.start_census, "started", False, raising=False)  # undone after the test
    sglang_plugin.start_census()
    assert getattr(fork.sageattn, census._WRAPPED, False)


def test_a_paused_census_records_nothing_and_reads_no_arguments(fake_sageattention, monkeypatch):
    sa = importlib.import_module("sageattention")
    census.install()
    read = []
    facts = census._shape_facts
    monkeypatch.setattr(census, "_shape_facts", lambda *a: read.append(a[0]) or facts(*a))
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    before = census.snapshot()
    with census.CENSUS.paused():
        sa.sageattn(q, q, q)
    assert census.difference(census.snapshot(), before) == {} and read == []  # not even the call's facts are read
    sa.sageattn(q, q, q)  # the same call unpaused: read and recorded
    assert read == ["sageattn"] and census.calls(census.difference(census.snapshot(), before)) == 1


def test_a_sageattention_imported_after_the_census_started_is_recorded(fake_sageattention):
    census.install()  # no sageattention yet: the import hook waits for it
    sa = importlib.import_module("sageattention")
    assert getattr(sa.sageattn, census._WRAPPED, False)
    before = census.snapshot()
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    sa.sageattn(q, q, q, sm_scale=0.2)
    (entry,) = census.difference(census.snapshot(), before).values()
    assert entry["config"]["sm_scale"] == 0.2 and census.violations(entry)  # not the model's scale


def test_the_replay_flags_a_kernel_that_counts_padding_and_not_the_emulation():
    entry = {"config": {"entry": "sageattn_varlen", "kernel": "padding-counting kernel (test)", "causal": False,
                        "layout": "HND", "dtype": "float32", "head_dim": 64, "q_heads": 4, "kv_heads": 2, "sm_scale": None,
                        "emulated": True, "ref": "tests.faults.in_process:padded_kernel"},
             "calls": 1, "q_classes": {"1": 1}, "k_classes": {"16-63 partial": 1, "64-127": 1}}
    good = {"config": {**entry["config"], "ref": "sagecheck.attention.sage_emulated:sage_emulated"}, **{
        k: v for k, v in entry.items() if k != "config"}}
    rows = kernel_replay.replay({"bad": entry, "good": good}, 5e-3, torch.device("cpu"))
    flags = {(r["key"], r["shape"].split()[3]): r["flagged"] for r in rows}
    assert flags[("bad", "k49")] and not flags[("bad", "k64")]  # a partial block: its masked slots counted
    assert not any(f for (key, _), f in flags.items() if key == "good")
    real = {"config": {**entry["config"], "ref": "sageattention:sageattn_varlen", "emulated": False}, **{
        k: v for k, v in entry.items() if k != "config"}}
    (row,) = kernel_replay.replay({"real": real}, 5e-3, torch.device("cpu"))
    assert row["status"] == "not replayed" and "CUDA" in row["why"]


@pytest.fixture(scope="module")
def judged_in_process(builtin):
    """10's paths in process on the built-in model for the correct scheme, the baseline against itself and every
    deliberately wrong candidate of tests/faults/in_process.py."""
    in_process.register()
    out = {}
    for name in ("sage-emulated", "sdpa", *in_process.CENSUS_VARIANTS, *in_process.VARIANTS):
        params = load(CI_PARAMS, [f"candidate={name}"])
        engine = HFEngine(builtin.model, builtin.tokenizer, torch.device("cpu"), torch.float32, "sdpa", name,
                          ("prefill", "decode"), "sdpa-fp8kv")
        out[name] = C.measure(engine, sp.NotebookParams(params, "10_code_paths"), engine)[1]
    return out


def failing(results):
    return {r.path for r in results if r.passed is False or (r.figures.get("kernel") and not r.figures["kernel"]["step_calls"])}


def kernel_failing(results):
    return {r.path for r in results if r.figures.get("kernel") is not None and (
        r.figures["kernel"]["violating_calls"] or not r.figures["kernel"]["step_calls"]
        or (r.figures.get("replay") or {}).get("flagged"))}


def test_the_correct_scheme_and_the_baseline_against_itself_pass_in_process(judged_in_process):
    for name in ("sage-emulated", "sdpa"):
        assert not failing(judged_in_process[name]), (name, {r.path: r.figures for r in judged_in_process[name]})
    assert "every one inside the kernel's contract" in C.census_sentence(judged_in_process["sage-emulated"])
    assert "no kernel calls" in C.census_sentence(judged_in_process["sdpa"])


@pytest.mark.parametrize("name", sorted(in_process.CENSUS_VARIANTS))
def test_each_wrong_kernel_call_fails_the_kernel_check_of_its_paths_and_no_other_in_process(judged_in_process, name):
    _, paths = in_process.CENSUS_VARIANTS[name]
    results = judged_in_process[name]
    assert kernel_failing(results) == paths, (name, {r.path: r.figures.get("kernel") for r in results})
    assert failing(results) <= paths, (name, failing(results))


@pytest.mark.parametrize("name", sorted(in_process.VARIANTS))
def test_defects_of_the_output_fail_their_path_and_the_chunked_row_no_longer_hides_one(judged_in_process, name):
    """The prefix defect reaches chunked prefill (its chunks extend over a cached prefix); judged against its own
    reference it passed (3.29 nats/token off the baseline); anchored to the cold prefill it fails. The padded decode,
    caught on short prompts only before, fails against a correct integration's error on the same path."""
    _, path = in_process.VARIANTS[name]
    got = failing(judged_in_process[name])
    assert path in got and got <= {path, "chunked"}, got
    if name == "sage-prefix-top-left":
        chunked = next(r for r in judged_in_process[name] if r.path == "chunked")
        assert chunked.passed is False and chunked.figures["reference_fails"]
    if name == "sage-padded-decode":
        decode = next(r for r in judged_in_process[name] if r.path == "decode_eager")
        assert decode.figures["integration"]["passed"] is False
