"""Which SageAttention the 'sage' implementation runs: the importable package (a source build of SageAttention 2 has no
metadata and shadows an installed 1.0.6), the entry point the ``sage_kernel`` parameter selects, and the kernel that
entry point dispatched to, recorded by a probe call (here through a plain-torch stand-in of a SageAttention 2 build)."""

from __future__ import annotations

import sys

import pytest

from sagecheck import environment, sources
from sagecheck.attention import sage_kernel
from sagecheck.attention.contract import AttentionUnavailable
from sagecheck.params import ParamError
from tests.conftest import ROOT

FAKE_SA2 = ROOT / "tests" / "data" / "fake_sageattention2"


@pytest.fixture
def sa2_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_SA2))
    for mod in [m for m in sys.modules if m == "sageattention" or m.startswith("sageattention.")]:
        monkeypatch.delitem(sys.modules, mod)
    yield
    sage_kernel.select("auto")
    for mod in [m for m in sys.modules if m == "sageattention" or m.startswith("sageattention.")]:
        del sys.modules[mod]


def test_a_source_build_is_named_as_one_with_its_generation_and_entry_points(sa2_on_path):
    pkg = environment.sageattention_package()
    assert pkg["installed"] and pkg["generation"] == 2 and pkg["version"] == "2.x built from source (no package metadata)"
    assert pkg["entry_points"] == ["sageattn", "sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp8_cuda",
                                   "sageattn_qk_int8_pv_fp8_cuda_sm90"]
    assert environment.sageattention_label(pkg).endswith(f"at {FAKE_SA2 / 'sageattention'}")
    assert environment.brief()["sageattention"] == environment.sageattention_label(pkg)


def test_the_probe_records_the_kernel_auto_dispatched_to(sa2_on_path):
    got = sage_kernel.dispatch_probe(device="cpu")
    assert got == {"entry_point": "sageattn", "kernel": "sageattn_qk_int8_pv_fp8_cuda_sm90",
                   "kernel_kwargs": {"tensor_layout": "HND", "is_causal": False, "pv_accum_dtype": "fp32+fp32"},
                   "calls": ["sageattn_qk_int8_pv_fp8_cuda_sm90", "_sdpa"]}  # every function of core it called, in order
    import sageattention.core as core

    assert core.sageattn_qk_int8_pv_fp8_cuda_sm90.__name__ == "sageattn_qk_int8_pv_fp8_cuda_sm90"  # restored
    sage_kernel.select("sageattn_qk_int8_pv_fp16_triton")
    assert sage_kernel.dispatch_probe(device="cpu")["entry_point"] == "sageattn_qk_int8_pv_fp16_triton"
    facts = sage_kernel.facts({**sage_kernel.kernel_info(), "dispatched": got})
    assert facts["kernel that ran (probe)"] == "sageattn -> sageattn_qk_int8_pv_fp8_cuda_sm90 (tensor_layout=HND, " \
                                               "is_causal=False, pv_accum_dtype=fp32+fp32)"


def test_a_kernel_the_package_lacks_is_refused_naming_what_it_offers(sa2_on_path):
    with pytest.raises(ParamError, match=r"'sage_kernel' = 'sageattn_qk_int8_pv_fp8_cuda_sm100'.*offers: auto, sageattn, "):
        sources.check_sage_kernel("sageattn_qk_int8_pv_fp8_cuda_sm100")
    sources.check_sage_kernel("sageattn_qk_int8_pv_fp8_cuda")
    with pytest.raises(AttentionUnavailable, match="has no such|is not in the installed sageattention"):
        sage_kernel.entry_point("sageattn_nope")


def test_without_sageattention_a_named_kernel_is_refused():
    if environment.sageattention_package()["installed"]:
        pytest.skip("sageattention is installed here")
    with pytest.raises(ParamError, match="sageattention is not installed on this machine"):
        sources.check_sage_kernel("sageattn_qk_int8_pv_fp16_triton")
    sources.check_sage_kernel("auto")


# what the probe recorded on an H200 (SGLang kit, 2026-12-01): 1.0.6's sageattn, SageAttention 2's (auto) and its
# Triton FP16 P.V entry point
PROBED = {
    "1.0.6": {"entry_point": "sageattn", "kernel": "attn_false", "kernel_kwargs": {"tensor_layout": "HND"},
              "calls": ["per_block_int8", "attn_false"]},
    "2 auto": {"entry_point": "sageattn", "kernel": "sageattn_qk_int8_pv_fp8_cuda_sm90",
               "kernel_kwargs": {"pv_accum_dtype": "fp32+fp32"},
               "calls": ["get_cuda_arch_versions", "sageattn_qk_int8_pv_fp8_cuda_sm90", "per_thread_int8_triton", "per_channel_fp8"]},
    "2 triton": {"entry_point": "sageattn_qk_int8_pv_fp16_triton", "kernel": "attn_false", "kernel_kwargs": {},
                 "calls": ["per_block_int8_triton", "attn_false"]},
}


# not measured: what SageAttention 2's sageattn calls on an Ada GPU (core.py: the sm89 kernel, per-warp Q·K, FP8 P·V)
PROBED["2 ada"] = {"entry_point": "sageattn", "kernel": "sageattn_qk_int8_pv_fp8_cuda", "kernel_kwargs": {"pv_accum_dtype": "fp32+fp16"},
                   "calls": ["sageattn_qk_int8_pv_fp8_cuda", "per_warp_int8_cuda", "per_channel_fp8"]}


@pytest.mark.parametrize("name, emulation", [("1.0.6", "sage-emulated"), ("2 auto", "sage2-fp8-emulated"),
                                             ("2 triton", "sage-emulated"), ("2 ada", None)])
def test_each_probed_kernel_is_matched_with_the_emulation_of_its_scheme(name, emulation):
    got, why = sage_kernel.emulation_for({"dispatched": PROBED[name], "generation": 1 if name == "1.0.6" else 2})
    assert got == emulation, why
    if emulation is None:
        assert "sageattn_qk_int8_pv_fp8_cuda" in why and "per_warp" in why and "fp32+fp16" in why
    # the Hopper kernel with other settings than sageattn's is no longer the emulated scheme
    other = {**PROBED["2 auto"], "kernel_kwargs": {"pv_accum_dtype": "fp32"}}
    assert sage_kernel.emulation_for({"dispatched": other})[0] is None
    assert sage_kernel.emulation_for({"generation": 2})[0] is None and sage_kernel.emulation_for({"generation": 1})[0]


def test_a_kernel_whose_scheme_is_not_emulated_is_judged_against_float64_not_flagged(tmp_path):
    from sagecheck import results as R
    from sagecheck.metrics import kernel as K
    from sagecheck.params import NotebookParams, Params

    rows = [{"shape": f"s{i}", "sage_status": "ok", "sage_vs_emulated_rel_l2": 0.03, "sage_vs_ref_rel_l2": e,
             "sage_inputs_unchanged": True, "sdpa_status": "ok", "sdpa_vs_ref_rel_l2": 1e-3, "sage-emulated_status": "ok",
             "sage-emulated_vs_ref_rel_l2": 0.012} for i, e in enumerate((0.036, 0.039))]
    why = sage_kernel.emulation_for({"dispatched": PROBED["2 ada"]})[1]
    agreed = K.agreement(rows, 5e-3, (None, why, {"name": "sage"}))
    assert agreed["flagged"] == [] and agreed["kernel_vs_ref_max"] == 0.039
    res = R.Results(notebook="08_kernel", results_dir=tmp_path)
    K.record(res, rows, [], agreed, "", "H200", NotebookParams(Params(), "08_kernel"))
    assert res.find("kernel.vs_reference").passed and res.find("kernel.vs_reference").value == 0.039
    assert not [v for v in res.verdicts if v.id in ("kernel.vs_emulation", "kernel.agreement_ratio")]
    assert any("not judged" in n and "fp8" in n for n in res.notes)
    bad = [{**r, "sage_vs_ref_rel_l2": 0.2} for r in rows]  # a kernel far off float64: fails
    res = R.Results(notebook="08_kernel", results_dir=tmp_path)
    K.record(res, bad, [], K.agreement(bad, 5e-3, (None, why, {})), "", "H200", NotebookParams(Params(), "08_kernel"))
    assert not res.find("kernel.vs_reference").passed
    covered = K.agreement(rows, 5e-3, (True, "", {}))  # the same numbers for an emulated scheme: all flagged
    assert len(covered["flagged"]) == 2
